"""The index: longest prefix across every holder, tier preference, exclusion, expiry, snapshots, gaps."""

from __future__ import annotations

import pytest

from lmplug_controller.index import Index, Worker
from lmplug_controller.protocol import KEY_SIZE, Holder, ProtocolError, TierInfo
from lmplug_controller.server import Controller, ControllerConfig
from lmplug_controller.testing import make_keys

TIERS = (TierInfo("cpu", "cpu", 1 << 30), TierInfo("disk", "disk", 1 << 34))
FP = b"fp-test0"
KEYS = make_keys("prompt", 10)


def register(
    index: Index, instance_id: str, now: float = 0.0, incarnation: str = "1", fingerprint: bytes = FP
) -> Worker:
    return index.register(instance_id, fingerprint, 0, TIERS, f"{instance_id}:7000", incarnation, now)


def test_the_longest_holder_wins_even_when_it_is_not_the_first_holder_of_the_first_key() -> None:
    index = Index()
    index.admit(register(index, "first"), "cpu", KEYS[:2])
    index.admit(register(index, "best"), "disk", KEYS[:9])
    index.admit(register(index, "middle"), "cpu", KEYS[:5])
    assert index.lookup(KEYS) == [
        Holder("best", "disk", "best:7000", 9),
        Holder("middle", "cpu", "middle:7000", 5),
        Holder("first", "cpu", "first:7000", 2),
    ]


def test_a_worker_is_one_holder_named_for_its_preferred_tier_holding_the_first_key() -> None:
    index = Index()
    worker = register(index, "a")
    index.admit(worker, "disk", KEYS[:4])
    index.admit(worker, "cpu", KEYS[:4])
    assert index.lookup(KEYS) == [Holder("a", "cpu", "a:7000", 4)]


def test_a_prefix_split_across_a_workers_tiers_counts_whole() -> None:
    """A worker serves from all its tiers: chunks 0-2 in memory and 3-6 on disk are 7 chunks."""
    index = Index()
    worker = register(index, "a")
    index.admit(worker, "cpu", KEYS[:3])
    index.admit(worker, "disk", KEYS[3:7])
    index.admit(register(index, "b"), "cpu", KEYS[:5])
    assert index.lookup(KEYS) == [Holder("a", "cpu", "a:7000", 7), Holder("b", "cpu", "b:7000", 5)]


def test_a_hole_ends_a_holders_prefix() -> None:
    index = Index()
    index.admit(register(index, "a"), "cpu", [*KEYS[:3], *KEYS[4:]])
    assert index.lookup(KEYS) == [Holder("a", "cpu", "a:7000", 3)]


def test_the_asking_instance_is_left_out() -> None:
    index = Index()
    index.admit(register(index, "self"), "cpu", KEYS)
    index.admit(register(index, "self", fingerprint=b"rank-one"), "cpu", KEYS)
    index.admit(register(index, "peer"), "cpu", KEYS[:3])
    assert [holder.instance_id for holder in index.lookup(KEYS, exclude_instance="self")] == ["peer"]
    assert index.lookup(KEYS[:1], exclude_instance="nobody")[0].chunks == 1


def test_a_miss_and_an_empty_lookup_find_nobody() -> None:
    index = Index()
    index.admit(register(index, "a"), "cpu", KEYS[1:])
    assert index.lookup(KEYS) == []
    assert index.lookup([]) == []


def test_evicting_shortens_a_prefix_and_forgets_keys_nobody_holds() -> None:
    index = Index()
    worker = register(index, "a")
    index.admit(worker, "cpu", KEYS)
    index.evict(worker, "cpu", [KEYS[6], make_keys("other", 1)[0]])
    assert index.lookup(KEYS)[0].chunks == 6
    assert len(index) == len(KEYS) - 1
    index.evict(worker, "nvme", KEYS)  # a tier it never named: nothing to do
    assert index.chunks(worker) == {"cpu": 9, "disk": 0}


def test_a_silent_worker_is_dropped_with_its_entries_and_its_slots_are_reused() -> None:
    index = Index()
    quiet, talking = register(index, "quiet", now=0.0), register(index, "talking", now=0.0)
    index.admit(quiet, "cpu", KEYS)
    index.admit(talking, "cpu", KEYS[:2])
    talking.last_heard = 5.0
    assert index.expire(now=6.5, deadline=3.0) == [quiet]
    assert index.lookup(KEYS) == [Holder("talking", "cpu", "talking:7000", 2)]
    assert len(index) == 2
    newcomer = register(index, "newcomer")
    assert set(newcomer.slots.values()) == set(range(2))  # the freed slots again: masks stay small


def test_a_snapshot_replaces_the_entries_and_sets_the_sequence() -> None:
    index = Index()
    worker = register(index, "a")
    index.admit(worker, "cpu", KEYS)
    index.replace(worker, {"disk": KEYS[:3]}, seq=41)
    assert index.lookup(KEYS) == [Holder("a", "disk", "a:7000", 3)]
    assert (worker.last_seq, worker.dirty) == (41, False)


def test_a_new_incarnation_loses_the_old_entries_a_reconnect_keeps_them_as_hints() -> None:
    index = Index()
    worker = register(index, "a", incarnation="1")
    index.admit(worker, "cpu", KEYS)
    index.replace(worker, {"cpu": KEYS}, seq=0)
    again = register(index, "a", incarnation="1")
    assert again is worker
    assert again.dirty
    assert again.resync_epoch == 2
    assert index.lookup(KEYS)[0].chunks == 10
    restarted = register(index, "a", incarnation="2")
    assert restarted is not worker
    assert index.lookup(KEYS) == []


def test_a_gap_in_event_batches_asks_for_a_snapshot() -> None:
    controller = Controller(ControllerConfig(port=0))
    worker = register(controller.index, "a")
    controller.index.replace(worker, {}, seq=0)
    epoch = worker.resync_epoch
    blob = b"".join(KEYS[:4])
    controller.absorb(worker, 1, [["+", "cpu", 4]], blob)
    assert (controller.counters.gaps, worker.dirty) == (0, False)
    controller.absorb(worker, 3, [["-", "cpu", 1], ["+", "disk", 3]], blob)  # batch 2 went missing
    assert controller.counters.gaps == 1
    assert worker.dirty
    assert worker.resync_epoch == epoch + 1
    assert controller.index.chunks(worker) == {"cpu": 3, "disk": 3}  # applied as hints all the same
    assert (controller.counters.admitted, controller.counters.evicted) == (7, 1)


def test_a_batch_whose_ops_do_not_match_its_blob_is_refused() -> None:
    controller = Controller(ControllerConfig(port=0))
    worker = register(controller.index, "a")
    with pytest.raises(ProtocolError, match="name 2 keys"):
        controller.absorb(worker, 1, [["+", "cpu", 2]], bytes(KEY_SIZE))
