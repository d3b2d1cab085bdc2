"""The scheduler side of the connector: what lmplug can supply, and what each step loads and saves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmplug.integrations.vllm.lookup import LookupClient


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Load KV for tokens ``[start, end)`` of ``tokens`` into the request's blocks."""

    request_id: str
    tokens: list[int]
    block_ids: list[int]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class SaveSpec:
    """Store the KV of tokens ``[start, end)`` (chunk-aligned ``start``) from the request's blocks."""

    request_id: str
    tokens: list[int]
    block_ids: list[int]
    start: int
    end: int


@dataclass(slots=True)
class StepPlan:
    """What the worker does in one step (the connector metadata's payload)."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Request:
    tokens: list[int]
    block_ids: list[int]
    saved: int


class SchedulerSide:
    """Tracks requests from lookup to finish and plans each step's loads, saves and releases."""

    def __init__(self, client: LookupClient, chunk_size: int, save_partial_chunks: bool) -> None:
        self.client = client
        self.chunk_size = chunk_size
        self.save_partial_chunks = save_partial_chunks
        self._hits: dict[str, int] = {}
        self._requests: dict[str, _Request] = {}
        self._plan = StepPlan()

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        tokens = list(request.prompt_token_ids or ())
        # vLLM must compute at least the last prompt token itself.
        hit = self.client.lookup(request.request_id, tokens[: max(len(tokens) - 1, 0)]) if len(tokens) > 1 else 0
        if hit <= num_computed_tokens:
            if hit:
                self._plan.releases.append(request.request_id)
            return 0
        self._hits[request.request_id] = hit
        return hit - num_computed_tokens

    def after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        request_id = request.request_id
        tokens = list(request.prompt_token_ids or ())
        hit = self._hits.pop(request_id, 0)
        if num_external_tokens > 0 and hit:
            start = request.num_computed_tokens
            end = start + num_external_tokens
            self._plan.loads.append(LoadSpec(request_id, tokens[:end], list(block_ids), start, end))
            saved = end
        else:
            if hit:
                self._plan.releases.append(request_id)
            saved = 0
        self._requests[request_id] = _Request(tokens, list(block_ids), saved)

    def build(self, scheduler_output: Any) -> StepPlan:
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                state = self._requests[new.req_id] = _Request(list(new.prompt_token_ids or ()), [], 0)
            state.block_ids = list(new.block_ids[0])
            self._plan_save(new.req_id, state, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for index, request_id in enumerate(cached.req_ids):
            state = self._requests.get(request_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[index]
            if request_id in cached.resumed_req_ids:
                state.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                state.block_ids.extend(new_blocks[0])
            self._plan_save(request_id, state, cached.num_computed_tokens[index], scheduler_output)
        plan, self._plan = self._plan, StepPlan()
        return plan

    def _plan_save(self, request_id: str, state: _Request, computed: int, scheduler_output: Any) -> None:
        done = min(computed + scheduler_output.num_scheduled_tokens.get(request_id, 0), len(state.tokens))
        end = done - done % self.chunk_size
        if self.save_partial_chunks and done == len(state.tokens):
            end = done
        if end > state.saved:
            start = state.saved - state.saved % self.chunk_size
            self._plan.saves.append(SaveSpec(request_id, state.tokens[:end], list(state.block_ids), start, end))
            state.saved = end

    def finished(self, request_id: str) -> None:
        """The request finished or was aborted: its lease goes now, not with a later step (there may be none)."""
        self._requests.pop(request_id, None)
        self._hits.pop(request_id, None)
        self.client.release(request_id)
