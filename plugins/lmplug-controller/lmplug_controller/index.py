"""The registry of workers and the index of which worker holds which chunk key in which tier.

Pure data structures, no I/O. Every (worker, tier) pair is a *slot* with a small integer id;
the index maps a key to the bit mask of the slots that hold it, so that a longest-prefix
lookup across all holders is one dict probe and one integer AND per key:
O(len(keys) x holders) at worst, O(len(keys)) in practice.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmplug_controller.protocol import Holder, TierInfo

__all__ = ["Index", "Worker"]


@dataclass(eq=False)
class Worker:
    """One registered worker: one process of one instance at one TP rank."""

    uid: int
    instance_id: str
    fingerprint: bytes
    rank: int
    tiers: tuple[TierInfo, ...]
    endpoint: str
    incarnation: str
    registered_at: float
    last_heard: float
    slots: dict[str, int] = field(default_factory=dict)
    """Tier name -> slot id, in the worker's order of preference."""
    last_seq: int = 0
    """Sequence number of the last EVENTS batch applied."""
    dirty: bool = True
    """Its entries may be stale: a snapshot was asked for and has not ended yet."""
    resync_epoch: int = 0
    """Bumped whenever the controller asks for a snapshot; the worker echoes it."""
    stats: dict[str, Any] = field(default_factory=dict)
    """What the worker reported in its last heartbeat (usage and hits per tier)."""
    lookups_served: int = 0
    """Lookups in which this worker was the best holder."""
    chunks_served: int = 0
    """Chunks of those lookups."""

    @property
    def key(self) -> tuple[str, bytes]:
        return (self.instance_id, self.fingerprint)


class Index:
    """Workers and the chunk keys each of their tiers holds."""

    def __init__(self) -> None:
        self._masks: dict[bytes, int] = {}
        """Key -> bit mask of the slots that hold it."""
        self._slot_keys: dict[int, set[bytes]] = {}
        self._slot_owner: dict[int, tuple[Worker, str, int]] = {}
        """Slot id -> (worker, tier name, preference: the tier's position in the worker's list)."""
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._workers: dict[int, Worker] = {}
        self._by_key: dict[tuple[str, bytes], Worker] = {}
        self._uids = itertools.count(1)

    # ------------------------------------------------------------------ registry

    def register(
        self,
        instance_id: str,
        fingerprint: bytes,
        rank: int,
        tiers: Sequence[TierInfo],
        endpoint: str,
        incarnation: str,
        now: float,
    ) -> Worker:
        """Add a worker, or renew the one with the same ``(instance_id, fingerprint)``.

        A renewed worker keeps its entries (as hints, until its snapshot replaces them) if its
        incarnation is unchanged; a new incarnation (the process restarted) loses them. Either
        way the returned worker is dirty and its ``resync_epoch`` was bumped: ask it for a snapshot.
        """
        old = self._by_key.get((instance_id, fingerprint))
        if old is not None and (old.incarnation != incarnation or tuple(tiers) != old.tiers):
            self.drop(old)
            old = None
        if old is not None:
            old.endpoint, old.rank, old.last_heard = endpoint, rank, now
            self.want_snapshot(old)
            return old
        worker = Worker(next(self._uids), instance_id, fingerprint, rank, tuple(tiers), endpoint, incarnation, now, now)
        for tier in worker.tiers:
            self._slot(worker, tier.name)
        self._workers[worker.uid] = worker
        self._by_key[worker.key] = worker
        self.want_snapshot(worker)
        return worker

    def want_snapshot(self, worker: Worker) -> int:
        """Mark ``worker`` dirty and bump its resync epoch; the new epoch."""
        worker.dirty = True
        worker.resync_epoch += 1
        return worker.resync_epoch

    def worker(self, uid: int) -> Worker | None:
        return self._workers.get(uid)

    def find(self, instance_id: str, fingerprint: bytes) -> Worker | None:
        return self._by_key.get((instance_id, fingerprint))

    def workers(self) -> list[Worker]:
        """All workers, by instance then rank."""
        return sorted(self._workers.values(), key=lambda worker: (worker.instance_id, worker.rank, worker.fingerprint))

    def of_instance(self, instance_id: str) -> list[Worker]:
        return [worker for worker in self.workers() if worker.instance_id == instance_id]

    def drop(self, worker: Worker) -> None:
        """Forget ``worker`` and every entry of its tiers."""
        if self._workers.pop(worker.uid, None) is None:
            return
        del self._by_key[worker.key]
        for slot in worker.slots.values():
            self._clear_slot(slot)
            del self._slot_keys[slot]
            del self._slot_owner[slot]
            heapq.heappush(self._free_slots, slot)
        worker.slots.clear()

    def expire(self, now: float, deadline: float) -> list[Worker]:
        """Drop the workers not heard from for more than ``deadline`` seconds; those dropped."""
        silent = [worker for worker in self._workers.values() if now - worker.last_heard > deadline]
        for worker in silent:
            self.drop(worker)
        return silent

    # ------------------------------------------------------------------ entries

    def admit(self, worker: Worker, tier: str, keys: Iterable[bytes]) -> None:
        """``worker`` now holds ``keys`` in ``tier``."""
        slot = self._slot(worker, tier)
        bit = 1 << slot
        masks = self._masks
        get = masks.get
        held = self._slot_keys[slot]
        for key in keys:
            masks[key] = get(key, 0) | bit
            held.add(key)

    def evict(self, worker: Worker, tier: str, keys: Iterable[bytes]) -> None:
        """``worker`` no longer holds ``keys`` in ``tier`` (unknown keys are ignored)."""
        slot = worker.slots.get(tier)
        if slot is None:
            return
        keep = ~(1 << slot)
        masks = self._masks
        held = self._slot_keys[slot]
        for key in keys:
            if key in held:
                held.discard(key)
                mask = masks[key] & keep
                if mask:
                    masks[key] = mask
                else:
                    del masks[key]

    def replace(self, worker: Worker, snapshot: Mapping[str, Iterable[bytes]], seq: int) -> None:
        """A snapshot: ``worker`` holds exactly ``snapshot[tier]`` in each tier; its next batch is ``seq + 1``."""
        for slot in worker.slots.values():
            self._clear_slot(slot)
        for tier, keys in snapshot.items():
            self.admit(worker, tier, keys)
        worker.last_seq = seq
        worker.dirty = False

    def chunks(self, worker: Worker) -> dict[str, int]:
        """Keys indexed per tier of ``worker``."""
        return {tier: len(self._slot_keys[slot]) for tier, slot in worker.slots.items()}

    def __len__(self) -> int:
        """Distinct keys indexed."""
        return len(self._masks)

    def entries(self) -> int:
        """(key, slot) entries indexed: a key held in two tiers counts twice."""
        return sum(len(keys) for keys in self._slot_keys.values())

    # ------------------------------------------------------------------ lookup

    def lookup(self, keys: Sequence[bytes], exclude_instance: str | None = None) -> list[Holder]:
        """Every worker holding a prefix of ``keys`` in any of its tiers (a worker serves from all of
        them), longest prefix first, then by the preference of the tier holding the first key, then
        by instance id; ``exclude_instance``'s workers are left out."""
        if not keys:
            return []
        masks = self._masks
        first = masks.get(keys[0], 0)
        if not first:
            return []
        # Each candidate worker with the mask of all its tiers' slots.
        candidates: dict[int, tuple[Worker, int]] = {}
        for slot in _bits(first):
            worker = self._slot_owner[slot][0]
            if worker.instance_id != exclude_instance and id(worker) not in candidates:
                union = 0
                for owned in worker.slots.values():
                    union |= 1 << owned
                candidates[id(worker)] = (worker, union)
        live = list(candidates.values())
        runs: list[tuple[Worker, int]] = []
        position = 0
        for position, key in enumerate(keys):
            if not live:
                break
            mask = masks.get(key, 0)
            kept = [entry for entry in live if mask & entry[1]]
            if len(kept) != len(live):
                runs.extend((worker, position) for worker, union in live if not mask & union)
                live = kept
        else:
            position = len(keys)
        runs.extend((worker, position) for worker, _ in live)
        found = []
        for worker, chunks in runs:
            if chunks:
                preference, tier = min(
                    (self._slot_owner[slot][2], self._slot_owner[slot][1])
                    for slot in worker.slots.values()
                    if first >> slot & 1
                )
                found.append((-chunks, preference, worker.instance_id, worker.rank, tier, worker))
        if not found:
            return []
        found.sort(key=lambda entry: entry[:4])
        best = found[0][5]
        best.lookups_served += 1
        best.chunks_served -= found[0][0]
        return [Holder(worker.instance_id, tier, worker.endpoint, -minus) for minus, _, _, _, tier, worker in found]

    # ------------------------------------------------------------------ slots

    def _slot(self, worker: Worker, tier: str) -> int:
        slot = worker.slots.get(tier)
        if slot is None:
            if self._free_slots:
                slot = heapq.heappop(self._free_slots)
            else:
                slot, self._next_slot = self._next_slot, self._next_slot + 1
            worker.slots[tier] = slot
            self._slot_keys[slot] = set()
            self._slot_owner[slot] = (worker, tier, len(worker.slots) - 1)
        return slot

    def _clear_slot(self, slot: int) -> None:
        keep = ~(1 << slot)
        masks = self._masks
        for key in self._slot_keys[slot]:
            mask = masks[key] & keep
            if mask:
                masks[key] = mask
            else:
                del masks[key]
        self._slot_keys[slot] = set()


def _bits(mask: int) -> Iterable[int]:
    """The positions of the set bits of ``mask``."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low
