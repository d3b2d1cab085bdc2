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

    def lookup(self, request_id: str, tokens: list[int]) -> int | None:
        self.asked.append((request_id, len(tokens)))
        return None if self.hit is None else min(self.hit, len(tokens))

    def release(self, request_id: str) -> None:
        self.released.append(request_id)

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
    assert side.finished(req, []) is False  # aborted before allocation: nothing to save
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
    assert side.finished(req, [1, 2, 3, 4]) is True  # vLLM keeps the blocks for one more step
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
    assert side.finished(req, [1, 2, 3, 4]) is False


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
