"""The connector's scheduler side: what each step loads, saves and releases (no vLLM needed).

vLLM's request and scheduler-output objects are stood in for by plain namespaces with the
fields the scheduler side reads; test_vllm_e2e.py runs the real thing.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from lmplug.integrations.vllm.scheduler import SchedulerSide

CHUNK = 16


class FixedLookup:
    """A lookup channel answering a fixed hit (the worker's side is tested in test_vllm_lookup)."""

    def __init__(self, hit: int | None) -> None:
        self.hit = hit
        self.asked: list[tuple[str, int]] = []
        self.released: list[str] = []
        self.states: dict[str, str] = {}
        self.states_asked: list[str] = []

    def lookup(self, request_id: str, tokens: list[int]) -> int | None:
        self.asked.append((request_id, len(tokens)))
        return None if self.hit is None else min(self.hit, len(tokens))

    def release(self, request_id: str) -> None:
        self.released.append(request_id)

    def transfer_state(self, transfer_id: str) -> str | None:
        self.states_asked.append(transfer_id)
        return self.states.get(transfer_id)

    def close(self) -> None:
        return None


def request(request_id: str, length: int, computed: int = 0, output: int = 0) -> Any:
    prompt = list(range(length))
    return SimpleNamespace(
        request_id=request_id,
        prompt_token_ids=prompt,
        all_token_ids=prompt + list(range(9000, 9000 + output)),
        num_computed_tokens=computed,
    )


def step(new: list[Any] = (), cached: Any = None, scheduled: dict[str, int] | None = None) -> Any:  # type: ignore[assignment]
    empty = SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
    return SimpleNamespace(
        scheduled_new_reqs=list(new), scheduled_cached_reqs=cached or empty, num_scheduled_tokens=scheduled or {}
    )


def planner(hit: int | None, *, partial: bool = False) -> tuple[SchedulerSide, FixedLookup]:
    lookup = FixedLookup(hit)
    return SchedulerSide(lookup, CHUNK, save_partial_chunks=partial), lookup


def test_a_hit_becomes_a_load_and_never_covers_the_last_token() -> None:
    side, lookup = planner(hit=10 * CHUNK)
    req = request("a", 3 * CHUNK)
    assert side.num_new_matched_tokens(req, 0) == 3 * CHUNK - 1  # the last prompt token is always computed by vLLM
    assert lookup.asked == [("a", 3 * CHUNK)]  # the whole prompt: its last chunk may match whole


def test_a_whole_prompt_hit_loads_into_its_last_chunk_up_to_the_last_token() -> None:
    lookup = FixedLookup(hit=10 * CHUNK)
    side = SchedulerSide(lookup, CHUNK, save_partial_chunks=False)
    req = request("a", 3 * CHUNK)
    # Every chunk is held; vLLM computes the last token: all of the last chunk but that token loads.
    assert side.num_new_matched_tokens(req, 0) == 3 * CHUNK - 1
    side.after_alloc(req, [1, 2, 3, 4, 5, 6], 3 * CHUNK - 1)
    new = SimpleNamespace(
        req_id="a", prompt_token_ids=req.prompt_token_ids, block_ids=([1, 2, 3, 4, 5, 6],), num_computed_tokens=40
    )
    (load,) = side.build_step_plan(step([new], scheduled={"a": 1})).loads
    assert (load.start, load.end) == (0, 3 * CHUNK - 1)


def test_load_then_save_only_what_was_computed() -> None:
    side, _ = planner(hit=2 * CHUNK)
    req = request("a", 5 * CHUNK + 3)
    assert side.num_new_matched_tokens(req, 0) == 2 * CHUNK
    side.after_alloc(req, [7, 8, 9], 2 * CHUNK)
    new = SimpleNamespace(
        req_id="a", prompt_token_ids=req.prompt_token_ids, block_ids=([7, 8, 9],), num_computed_tokens=2 * CHUNK
    )
    plan = side.build_step_plan(step([new], scheduled={"a": 3 * CHUNK + 3}))
    (load,) = plan.loads
    assert (load.request_id, load.start, load.end, load.block_ids) == ("a", 0, 2 * CHUNK, [7, 8, 9])
    (save,) = plan.saves
    assert (save.start, save.end) == (2 * CHUNK, 5 * CHUNK)  # full chunks only; loaded ones are not saved again
    assert plan.releases == []


def test_vllms_own_prefix_hit_makes_the_lease_unneeded() -> None:
    side, _ = planner(hit=2 * CHUNK)
    req = request("a", 4 * CHUNK)
    assert side.num_new_matched_tokens(req, 2 * CHUNK) == 0  # vLLM already has those tokens
    assert side.build_step_plan(step()).releases == ["a"]


def test_chunked_prefill_saves_step_by_step_and_block_lists_grow() -> None:
    side, _ = planner(hit=0)
    req = request("a", 4 * CHUNK)
    assert side.num_new_matched_tokens(req, 0) == 0
    side.after_alloc(req, [1], 0)
    new = SimpleNamespace(req_id="a", prompt_token_ids=req.prompt_token_ids, block_ids=([1],), num_computed_tokens=0)
    first = side.build_step_plan(step([new], scheduled={"a": CHUNK + 5}))
    assert [(s.start, s.end) for s in first.saves] == [(0, CHUNK)]
    cached = SimpleNamespace(
        req_ids=["a"], resumed_req_ids=set(), new_block_ids=[([2],)], num_computed_tokens=[CHUNK + 5]
    )
    second = side.build_step_plan(step(cached=cached, scheduled={"a": 3 * CHUNK - 5}))
    (save,) = second.saves
    assert (save.start, save.end, save.block_ids) == (CHUNK, 4 * CHUNK, [1, 2])


def test_a_resumed_request_gets_its_new_blocks() -> None:
    side, _ = planner(hit=0)
    req = request("a", 2 * CHUNK)
    side.num_new_matched_tokens(req, 0)
    side.after_alloc(req, [4], 0)
    cached = SimpleNamespace(req_ids=["a"], resumed_req_ids={"a"}, new_block_ids=[([9],)], num_computed_tokens=[0])
    (save,) = side.build_step_plan(step(cached=cached, scheduled={"a": 2 * CHUNK})).saves
    assert save.block_ids == [9]


def test_finished_and_aborted_requests_release_their_lease() -> None:
    side, lookup = planner(hit=2 * CHUNK)
    req = request("a", 4 * CHUNK)
    side.num_new_matched_tokens(req, 0)
    assert side.finished(req, []) == (False, None)  # aborted before allocation: nothing to save
    # Released at once over the lookup channel: no later step may come to carry it.
    assert lookup.released == ["a"]
    assert side.build_step_plan(step()).releases == []


def test_a_pending_lookup_asks_vllm_to_ask_again() -> None:
    side, lookup = planner(hit=None)
    req = request("a", 4 * CHUNK)
    assert side.num_new_matched_tokens(req, 0) is None  # lower tiers are being read
    lookup.hit = 2 * CHUNK
    assert side.num_new_matched_tokens(req, 0) == 2 * CHUNK


def test_every_tensor_parallel_rank_must_hold_the_tokens() -> None:
    ranks = [FixedLookup(3 * CHUNK), FixedLookup(CHUNK), FixedLookup(None)]
    side = SchedulerSide(ranks, CHUNK, save_partial_chunks=True)
    req = request("a", 4 * CHUNK)
    assert side.num_new_matched_tokens(req, 0) is None  # one rank still promoting
    ranks[2].hit = 4 * CHUNK
    assert side.num_new_matched_tokens(req, 0) == CHUNK  # what every rank can supply
    side.finished(req, [])
    assert [rank.released for rank in ranks] == [["a"]] * 3


def test_a_finished_request_saves_the_rest_of_its_prompt_and_its_answer() -> None:
    side, _ = planner(hit=0, partial=True)
    req = request("a", 2 * CHUNK + 5, output=20)
    assert side.num_new_matched_tokens(req, 0) == 0
    side.after_alloc(req, [1, 2], 0)
    new = SimpleNamespace(req_id="a", prompt_token_ids=req.prompt_token_ids, block_ids=([1, 2],), num_computed_tokens=0)
    plan = side.build_step_plan(step([new], scheduled={"a": 2 * CHUNK + 5}))
    assert [(s.start, s.end) for s in plan.saves] == [(0, 2 * CHUNK)]
    req.num_computed_tokens = 2 * CHUNK + 5 + 19  # the last answer token was sampled, never fed
    assert side.finished(req, [1, 2, 3, 4]) == (True, None)  # vLLM keeps the blocks for one more step
    # A new turn of the same conversation waits one step for that save.
    follow_up = request("b", 4 * CHUNK)
    assert side.num_new_matched_tokens(follow_up, 0) is None
    plan = side.build_step_plan(step())
    (save,) = plan.saves
    assert (save.start, save.end, save.block_ids) == (2 * CHUNK, 2 * CHUNK + 24, [1, 2, 3, 4])
    assert save.tokens == req.all_token_ids[:-1]
    assert plan.finished == ["a"]
    assert side.num_new_matched_tokens(follow_up, 0) == 0


def test_without_partial_chunks_a_finished_request_frees_its_blocks_at_once() -> None:
    side, _ = planner(hit=0)
    req = request("a", 2 * CHUNK + 5, output=20)
    side.num_new_matched_tokens(req, 0)
    side.after_alloc(req, [1, 2], 0)
    req.num_computed_tokens = 2 * CHUNK + 24
    assert side.finished(req, [1, 2, 3, 4]) == (False, None)


def test_a_load_starts_where_vllms_own_prefix_hit_ends() -> None:
    """vLLM sets ``request.num_computed_tokens`` only after ``update_state_after_alloc``: the load
    must start at the local hit vLLM reported when it asked, not at the request's stale count."""
    side, _ = planner(hit=4 * CHUNK)
    req = request("a", 5 * CHUNK, computed=0)  # as vLLM leaves it at allocation time
    assert side.num_new_matched_tokens(req, 2 * CHUNK) == 2 * CHUNK  # vLLM has the first two chunks
    side.after_alloc(req, [1, 2, 3, 4, 5], 2 * CHUNK)
    (load,) = side.build_step_plan(step()).loads
    assert (load.start, load.end) == (2 * CHUNK, 4 * CHUNK)


def test_loads_may_end_inside_a_block() -> None:
    """Every held token is loaded, up to the last block's middle (the worker writes it token by
    token where vLLM's kernel would): only the tokens lmplug lacks are recomputed."""
    side = SchedulerSide(FixedLookup(624), CHUNK, save_partial_chunks=True)
    assert side.num_new_matched_tokens(request("a", 640), 0) == 624
    assert side.num_new_matched_tokens(request("b", 640), 512) == 112  # beyond vLLM's own blocks
    short = SchedulerSide(FixedLookup(100), CHUNK, save_partial_chunks=True)
    assert short.num_new_matched_tokens(request("c", 300), 0) == 100


# ---------------------------------------------------------------------- prefill/decode (PD)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class GrowingLookup(FixedLookup):
    """The decode instance's cache while a push arrives: the hit grows as the test says."""

    def lookup(self, request_id: str, tokens: list[int]) -> int | None:
        self.asked.append((request_id, len(tokens)))
        return min(self.hit or 0, len(tokens))


def pd_request(request_id: str, length: int, pd: Any, computed: int = 0, output: int = 0) -> Any:
    req = request(request_id, length, computed, output)
    req.kv_transfer_params = {"lmplug": {"pd": pd}, "other": 1}
    return req


def test_a_decode_request_waits_for_its_pushed_kv_then_loads_all_but_the_last_token() -> None:
    clock = Clock()
    lookup = GrowingLookup(0)
    side = SchedulerSide(lookup, CHUNK, save_partial_chunks=True, clock=clock)
    length = 3 * CHUNK + 5
    req = pd_request("d", length, {"role": "decode", "xfer_id": "x1", "prefill": "p", "wait_ms": 2000})
    assert side.num_new_matched_tokens(req, 0) is None  # nothing arrived yet: vLLM asks again
    assert lookup.asked == [("d", length - 1)]  # what the prefill pushes: the prompt but its last token
    clock.now += 0.001
    assert side.num_new_matched_tokens(req, 0) is None  # asked again too soon: no lookup
    assert len(lookup.asked) == 1
    clock.now += 0.01
    lookup.hit = 2 * CHUNK  # part of the push is in
    assert side.num_new_matched_tokens(req, 0) is None
    assert lookup.released == ["d"]  # each new ask starts from a fresh lookup
    clock.now += 0.01
    lookup.hit = length - 1
    assert side.num_new_matched_tokens(req, 0) == length - 1
    side.after_alloc(req, [1, 2, 3, 4], length - 1)
    assert side.finished(req, [1, 2, 3, 4]) == (
        False, {"lmplug": {"pd": {"xfer_id": "x1", "status": "loaded", "loaded_tokens": length - 1}}}
    )  # fmt: skip


def test_a_decode_request_stops_waiting_after_wait_ms_and_computes_the_rest() -> None:
    clock = Clock()
    lookup = GrowingLookup(CHUNK)
    side = SchedulerSide(lookup, CHUNK, save_partial_chunks=True, clock=clock)
    req = pd_request("d", 3 * CHUNK, {"role": "decode", "xfer_id": "x2", "prefill": "p", "wait_ms": 50})
    assert side.num_new_matched_tokens(req, 0) is None
    clock.now += 0.051  # the push never completes (a prefill killed mid-transfer)
    assert side.num_new_matched_tokens(req, 0) == CHUNK  # the verified prefix loads; vLLM computes the rest
    side.after_alloc(req, [1, 2], CHUNK)
    assert side.finished(req, [1, 2])[1] == {
        "lmplug": {"pd": {"xfer_id": "x2", "status": "partial", "loaded_tokens": CHUNK}}
    }
    lookup.hit = 0
    other = pd_request("e", 3 * CHUNK, {"role": "decode", "xfer_id": "x3", "prefill": "p", "wait_ms": 0})
    assert side.num_new_matched_tokens(other, 0) == 0  # wait_ms 0: never waits
    assert side.finished(other, [])[1] == {
        "lmplug": {"pd": {"xfer_id": "x3", "status": "recomputed", "loaded_tokens": 0}}
    }


def test_a_prefill_saves_its_prompt_but_the_last_token_and_pushes_it() -> None:
    side, lookup = planner(hit=0, partial=True)
    length = 2 * CHUNK + 7
    pd = {"role": "prefill", "xfer_id": "x4", "decode": "127.0.0.1:7301", "deadline_ms": 3000}
    req = pd_request("p", length, pd)
    assert side.num_new_matched_tokens(req, 0) == 0
    assert lookup.asked == [("p", length)]  # a prefill looks up as any request does
    side.after_alloc(req, [1, 2, 3], 0)
    new = SimpleNamespace(
        req_id="p", prompt_token_ids=req.prompt_token_ids, block_ids=([1, 2, 3],), num_computed_tokens=0
    )
    (save,) = side.build_step_plan(step([new], scheduled={"p": length})).saves
    assert (save.start, save.end) == (0, 2 * CHUNK)  # whole chunks as they are computed
    done = pd_request("p", length, pd, computed=length, output=1)
    keep, params = side.finished(done, [1, 2, 3])
    assert keep is True  # the blocks stay until the tail is saved
    assert params == {"lmplug": {"pd": {"xfer_id": "x4", "status": "pushing", "tokens": length - 1}}}
    plan = side.build_step_plan(step())
    (tail,) = plan.saves
    assert (tail.start, tail.end, len(tail.tokens)) == (2 * CHUNK, length - 1, length - 1)
    (push,) = plan.pushes
    assert (push.tokens, push.destination, push.transfer_id, push.timeout) == (
        list(range(length - 1)), "127.0.0.1:7301", "x4", 3.0
    )  # fmt: skip
    assert plan.finished == ["p"]


def test_a_prefill_whose_prompt_is_saved_whole_pushes_without_keeping_blocks() -> None:
    side, _ = planner(hit=0, partial=True)
    length = 2 * CHUNK + 1  # the prompt but its last token is two whole chunks, saved as computed
    pd = {"role": "prefill", "xfer_id": "x5", "decode": "d:1"}
    req = pd_request("p", length, pd)
    side.num_new_matched_tokens(req, 0)
    side.after_alloc(req, [1, 2, 3], 0)
    new = SimpleNamespace(
        req_id="p", prompt_token_ids=req.prompt_token_ids, block_ids=([1, 2, 3],), num_computed_tokens=0
    )
    side.build_step_plan(step([new], scheduled={"p": length}))
    assert side.finished(pd_request("p", length, pd, computed=length, output=1), [1, 2, 3])[0] is False
    plan = side.build_step_plan(step())
    assert plan.saves == []
    assert [push.transfer_id for push in plan.pushes] == ["x5"]
    assert plan.pushes[0].timeout == 10.0  # deadline_ms defaults to 10 s


def test_an_aborted_prefill_pushes_nothing() -> None:
    side, _ = planner(hit=0, partial=True)
    pd = {"role": "prefill", "xfer_id": "x6", "decode": "d:1"}
    req = pd_request("p", 3 * CHUNK, pd)
    side.num_new_matched_tokens(req, 0)
    side.after_alloc(req, [1, 2, 3], 0)
    aborted = pd_request("p", 3 * CHUNK, pd, computed=CHUNK)
    assert side.finished(aborted, [1, 2, 3]) == (
        False,
        {"lmplug": {"pd": {"xfer_id": "x6", "status": "skipped", "tokens": 0}}},
    )
    assert side.build_step_plan(step()).pushes == []


def test_malformed_pd_params_are_ignored_with_a_warning(caplog: Any) -> None:
    side, lookup = planner(hit=CHUNK, partial=True)
    for index, pd in enumerate(
        [
            "prefill",
            {"role": "both", "xfer_id": "x"},
            {"role": "decode", "xfer_id": ""},
            {"role": "decode", "xfer_id": "x", "wait_ms": -1},
            {"role": "decode", "xfer_id": "x", "wait_ms": True},
            {"role": "prefill", "xfer_id": "x"},  # no decode endpoint
        ]
    ):
        req = pd_request(f"r{index}", 2 * CHUNK, pd)
        assert side.num_new_matched_tokens(req, 0) == CHUNK  # served as any other request
        assert lookup.asked[-1] == (f"r{index}", 2 * CHUNK)
    assert caplog.text.count("ignoring kv_transfer_params.lmplug.pd") == 6


def test_a_decode_request_stops_waiting_when_its_transfer_ends_short() -> None:
    """A push the decode's receiver refused or lost half-way: no waiting out wait_ms."""
    clock = Clock()
    lookup = GrowingLookup(0)
    side = SchedulerSide(lookup, CHUNK, save_partial_chunks=True, clock=clock)
    length = 4 * CHUNK
    req = pd_request("d", length, {"role": "decode", "xfer_id": "x7", "prefill": "p", "wait_ms": 60_000})
    assert side.num_new_matched_tokens(req, 0) is None  # nothing yet, the transfer unknown: wait
    clock.now += 0.01
    lookup.hit, lookup.states["x7"] = CHUNK, "receiving"
    assert side.num_new_matched_tokens(req, 0) is None
    clock.now += 0.01
    lookup.hit, lookup.states["x7"] = 2 * CHUNK, "failed"  # the prefill died after two chunks
    assert side.num_new_matched_tokens(req, 0) == 2 * CHUNK  # at once, not after 60 s
    assert lookup.states_asked == ["x7", "x7", "x7"]
    other = pd_request("e", length, {"role": "decode", "xfer_id": "x8", "prefill": "p", "wait_ms": 60_000})
    lookup.hit, lookup.states["x8"] = 0, "rejected"  # the receiver was full
    assert side.num_new_matched_tokens(other, 0) == 0
    third = pd_request("f", length, {"role": "decode", "xfer_id": "x9", "prefill": "p", "wait_ms": 60_000})
    lookup.hit, lookup.states["x9"] = 3 * CHUNK, "completed"  # the prefill had only three chunks
    assert side.num_new_matched_tokens(third, 0) == 3 * CHUNK


class Extending(FixedLookup):
    """A lookup channel whose worker side answers an engine extension's messages too."""

    def __init__(self, hit: int | None) -> None:
        super().__init__(hit)
        self.messages: list[tuple[str, bytes]] = []

    def extension(self, name: str, message: bytes) -> bytes | None:
        self.messages.append((name, message))
        return b"yes"


def extended(hit: int, claim_end: int | None) -> tuple[SchedulerSide, Extending, Any]:
    from lmplug.tierkit import Claim, EngineExtension

    class Passages(EngineExtension):
        name = "passages"

        def __init__(self) -> None:
            self.claims: list[tuple[int, int]] = []

        def claim(self, request: Any, computed: int, exact: int, call: Any) -> Claim | None:
            assert call(b"how much?") == [b"yes"]
            self.claims.append((computed, exact))
            return Claim(claim_end, "payload") if claim_end is not None else None

        def wants_save(self, request: Any) -> bool:
            return bool(request.params)

    lookup = Extending(hit)
    extension = Passages()
    return SchedulerSide(lookup, CHUNK, save_partial_chunks=True, extensions=[extension]), lookup, extension


def test_an_extension_supplies_tokens_past_the_exact_prefix_and_nothing_is_saved_under_prefix_keys() -> None:
    side, lookup, extension = extended(hit=CHUNK, claim_end=4 * CHUNK)
    req = request("a", 5 * CHUNK)
    assert side.num_new_matched_tokens(req, 0) == 4 * CHUNK
    assert extension.claims == [(0, CHUNK)]
    assert lookup.messages == [("passages", b"how much?")]
    side.after_alloc(req, [1, 2, 3, 4, 5], 4 * CHUNK)
    new = SimpleNamespace(
        req_id="a", prompt_token_ids=req.prompt_token_ids, block_ids=([1, 2, 3, 4, 5],), num_computed_tokens=4 * CHUNK
    )
    plan = side.build_step_plan(step([new], scheduled={"a": CHUNK}))
    (load,) = plan.loads  # the exact prefix, from the lease
    assert (load.start, load.end) == (0, CHUNK)
    ((name, extra),) = plan.extension_loads
    assert (name, extra.start, extra.end, extra.payload) == ("passages", CHUNK, 4 * CHUNK, "payload")
    assert plan.saves == []  # the prompt computed over an extension's KV is not vLLM's own
    finished = request("a", 5 * CHUNK, computed=5 * CHUNK + 3, output=4)
    assert side.finished(finished, [1, 2, 3, 4, 5]) == (False, None)
    assert side.build_step_plan(step()).saves == []
    assert "a" in lookup.released


def test_an_extension_keeps_what_it_wants_of_a_request_computed_exactly() -> None:
    side, _, _ = extended(hit=0, claim_end=None)
    req = request("b", 3 * CHUNK)
    req.kv_transfer_params = {"lmplug": {"passages": True}}
    assert side.num_new_matched_tokens(req, 0) == 0
    side.after_alloc(req, [4, 5, 6], 0)
    side.build_step_plan(
        step(
            [
                SimpleNamespace(
                    req_id="b", prompt_token_ids=req.prompt_token_ids, block_ids=([4, 5, 6],), num_computed_tokens=0
                )
            ],
            scheduled={"b": 3 * CHUNK},
        )
    )
    done = request("b", 3 * CHUNK, computed=3 * CHUNK + 1, output=2)
    done.kv_transfer_params = req.kv_transfer_params
    keep, _ = side.finished(done, [4, 5, 6])
    assert keep  # vLLM holds the blocks until the worker has saved from them
    # A new request waits one step for the save, so that it finds what the save keeps.
    assert side.num_new_matched_tokens(request("c", 3 * CHUNK), 0) is None
    plan = side.build_step_plan(step())
    ((name, save),) = plan.extension_saves
    assert (name, save.request_id, save.computed, list(save.block_ids)) == ("passages", "b", 3 * CHUNK, [4, 5, 6])
    assert "b" in plan.finished
    assert side.num_new_matched_tokens(request("c", 3 * CHUNK), 0) == 0
