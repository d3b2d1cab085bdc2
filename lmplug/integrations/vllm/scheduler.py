"""The scheduler side of the connector: what lmplug can supply, and what each step loads and saves."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmplug.core.extension import ChannelCall, Claim, EngineExtension, EngineLoad, EngineRequest, EngineSave
from lmplug.integrations.vllm.pd import PDParams, finished_params, pd_params

logger = logging.getLogger("lmplug.vllm")

DECODE_POLL_SECONDS = 0.005
"""How often a decode request waiting for its pushed KV asks the caches again (vLLM itself
asks every step, about every millisecond while nothing else runs)."""


class Lookups(Protocol):
    """The scheduler's end of the lookup channel (:class:`lmplug.integrations.vllm.lookup.LookupClient`)."""

    def lookup(self, request_id: str, tokens: list[int]) -> int | None: ...

    def release(self, request_id: str) -> None: ...

    def transfer_state(self, transfer_id: str) -> str | None: ...

    def extension(self, name: str, message: bytes) -> bytes | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Span:
    """The KV of tokens ``[start, end)`` of ``tokens``, in the request's blocks ``block_ids``.

    A load writes it into those blocks; a save reads it out of them (a save's ``start`` is
    chunk-aligned).
    """

    request_id: str
    tokens: list[int]
    block_ids: list[int]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Push:
    """Send the cached KV of ``tokens`` to another instance (a PD prefill's prompt, to its decode)."""

    request_id: str
    tokens: list[int]
    destination: str
    transfer_id: str
    timeout: float


@dataclass(slots=True)
class StepPlan:
    """What the worker does in one step (the connector metadata's payload)."""

    loads: list[Span] = field(default_factory=list)
    saves: list[Span] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    """Requests whose last save is in ``saves``: vLLM keeps their blocks until the worker reports
    them sent (after the save), then frees them."""
    pushes: list[Push] = field(default_factory=list)
    """Pushes to start once this step's saves are stored."""
    extension_loads: list[tuple[str, EngineLoad]] = field(default_factory=list)
    """Tokens engine extensions supply (by extension name), written before the forward, after ``loads``."""
    extension_saves: list[tuple[str, EngineSave]] = field(default_factory=list)
    """Finished requests computed exactly that extensions keep something of (their blocks are held)."""


@dataclass(slots=True)
class _Request:
    tokens: list[int]
    block_ids: list[int]
    saved: int


class SchedulerSide:
    """Tracks requests from lookup to finish and plans each step's loads, saves and releases.

    ``lookups`` holds one channel per tensor-parallel rank: a request gets what every rank
    can supply (each rank caches its own shard of the KV).

    A load may end inside one of vLLM's blocks: the worker writes it token by token where
    vLLM's own kernel would (on AMX CPUs vLLM tiles K and V within a block, and a layout that
    ignored that wrote a partial block's tokens over others that vLLM then computed).
    """

    def __init__(
        self,
        lookups: Sequence[Lookups] | Lookups,
        chunk_size: int,
        save_partial_chunks: bool,
        clock: Callable[[], float] = time.monotonic,
        extensions: Sequence[EngineExtension] = (),
    ) -> None:
        self.lookups: list[Lookups] = list(lookups) if isinstance(lookups, Sequence) else [lookups]
        self.extensions = list(extensions)
        self.chunk_size = chunk_size
        self.save_partial_chunks = save_partial_chunks
        self.clock = clock
        self._hits: dict[str, tuple[int, int]] = {}
        """request id -> (vLLM's own computed tokens when asked, tokens lmplug holds)."""
        self._requests: dict[str, _Request] = {}
        self._plan = StepPlan()
        self._waits: dict[str, tuple[float, float]] = {}
        """PD decode requests waiting for their KV: request id -> (first asked, next ask)."""
        self._decodes: dict[str, tuple[str, int]] = {}
        """PD decode requests: request id -> (transfer id, tokens lmplug loads)."""
        self._claims: dict[str, tuple[str, Claim, int]] = {}
        """Requests an engine extension claimed: request id -> (extension, claim, end of the exact prefix)."""
        self._extended: set[str] = set()
        """Requests an extension supplied tokens to: nothing they compute is saved under prefix keys."""

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int | None:
        """Tokens beyond ``num_computed_tokens`` that lmplug will load; ``None``: ask again next step."""
        tokens = list(request.prompt_token_ids or ())
        if len(tokens) <= 1:
            return 0
        if self._saving_a_prefix_of(tokens):
            return None  # the KV of an earlier turn is saved this coming step: wait for it
        if self._plan.extension_saves:
            return None  # what extensions keep of finished requests is saved this coming step: wait for it
        request_id = request.request_id
        pd = pd_params(request)
        decode = pd if pd is not None and pd.role == "decode" else None
        if decode is not None:
            # What the prefill pushes: the prompt but its last token, partial last chunk included.
            wanted = tokens[:-1]
            waiting = self._waits.get(request_id)
            if waiting is not None:
                if self.clock() < waiting[1]:
                    return None
                for lookup in self.lookups:  # a lookup answers from its first lease: ask afresh
                    lookup.release(request_id)
            # Asked before the lookup: once a transfer has ended, the lookup sees all it brought.
            states = [lookup.transfer_state(decode.xfer_id) for lookup in self.lookups]
        else:
            # The whole prompt is looked up, so that its last chunk can match whole; vLLM computes
            # at least the last token itself, so the load stops short of it, inside that chunk.
            wanted = tokens
        answers = [lookup.lookup(request_id, wanted) for lookup in self.lookups]
        if any(answer is None for answer in answers):
            return None  # lower tiers are being read: the request waits, holding no blocks
        hit = min(min(answer or 0 for answer in answers), len(tokens) - 1)
        if decode is not None:
            if self._awaits_transfer(request_id, decode, hit, len(tokens) - 1, _ended(states)):
                return None
            self._decodes[request_id] = (decode.xfer_id, 0)
        elif self.extensions:
            end = self._claim(request, tokens, num_computed_tokens, max(hit, num_computed_tokens))
            if end is not None:
                self._hits[request_id] = (num_computed_tokens, hit)
                return end - num_computed_tokens
        if hit <= num_computed_tokens:
            if any(answers):
                self._plan.releases.append(request_id)
            return 0
        # vLLM sets request.num_computed_tokens only after update_state_after_alloc: the load
        # starts where vLLM's own prefix hit ends, as it was when it asked.
        self._hits[request_id] = (num_computed_tokens, hit)
        return hit - num_computed_tokens

    def _claim(self, request: Any, tokens: list[int], computed: int, exact: int) -> int | None:
        """The end of what the first extension that claims the request supplies (recorded), else None."""
        self._claims.pop(request.request_id, None)
        view = _engine_request(request, tokens)
        for extension in self.extensions:
            try:
                claim = extension.claim(view, computed, exact, self._call(extension.name))
            except Exception:
                logger.exception("lmplug engine extension %r failed to claim a request", extension.name)
                continue
            if claim is not None and exact < claim.end <= len(tokens) - 1:
                self._claims[request.request_id] = (extension.name, claim, exact)
                return claim.end
        return None

    def _call(self, name: str) -> ChannelCall:
        def call(message: bytes) -> list[bytes] | None:
            answers = [lookup.extension(name, message) for lookup in self.lookups]
            return None if any(answer is None for answer in answers) else [a for a in answers if a is not None]

        return call

    def _awaits_transfer(self, request_id: str, decode: PDParams, hit: int, wanted: int, ended: str | None) -> bool:
        """Whether a PD decode request goes on waiting for the KV its prefill pushes: until the
        caches hold all of it, the receiver says the transfer ``ended`` (it failed, was refused, or
        brought all it had), or ``wait`` seconds after it first asked; then it computes the rest."""
        now = self.clock()
        first = self._waits.get(request_id, (now, now))[0]
        if hit >= wanted:
            self._waits.pop(request_id, None)
            return False
        if ended is not None:
            self._waits.pop(request_id, None)
            logger.info(
                "lmplug PD transfer %s %s with %d of %d prompt tokens here; the rest is computed here",
                decode.xfer_id, ended, hit, wanted,
            )  # fmt: skip
            return False
        if now - first < decode.seconds:
            self._waits[request_id] = (first, now + DECODE_POLL_SECONDS)
            return True
        self._waits.pop(request_id, None)
        logger.info(
            "lmplug PD transfer %s: %d of %d prompt tokens arrived within %.1f s; the rest is computed here",
            decode.xfer_id, hit, wanted, decode.seconds,
        )  # fmt: skip
        return False

    def _saving_a_prefix_of(self, tokens: list[int]) -> bool:
        """Whether a request's final save waiting for the next step starts with ``tokens``' first chunk."""
        head = tokens[: self.chunk_size]
        finishing = self._plan.finished
        return any(spec.tokens[: self.chunk_size] == head for spec in self._plan.saves if spec.request_id in finishing)

    def after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        request_id = request.request_id
        tokens = list(request.prompt_token_ids or ())
        start, hit = self._hits.pop(request_id, (0, 0))
        claim = self._claims.pop(request_id, None)
        if claim is not None and num_external_tokens > 0:
            name, claimed, exact = claim
            end = start + num_external_tokens
            if exact > start:
                self._plan.loads.append(Span(request_id, tokens[:exact], list(block_ids), start, exact))
            elif hit:
                self._plan.releases.append(request_id)
            load = EngineLoad(request_id, tokens[:end], list(block_ids), max(exact, start), end, claimed.payload)
            self._plan.extension_loads.append((name, load))
            self._extended.add(request_id)
            # Never saved under prefix keys: the KV after the exact prefix is an extension's, not vLLM's own.
            self._requests[request_id] = _Request(tokens, list(block_ids), len(tokens))
            return
        if num_external_tokens > 0 and hit:
            end = start + num_external_tokens
            self._plan.loads.append(Span(request_id, tokens[:end], list(block_ids), start, end))
            saved = end - end % self.chunk_size
            if request_id in self._decodes:
                self._decodes[request_id] = (self._decodes[request_id][0], end)
        else:
            if hit:
                self._plan.releases.append(request_id)
            saved = 0
        self._requests[request_id] = _Request(tokens, list(block_ids), saved)

    def build_step_plan(self, scheduler_output: Any) -> StepPlan:
        """This step's plan: what was planned since the last step, and saves of the prompt chunks it computes."""
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
        """Whole chunks of the prompt as they are computed (the rest is saved when the request finishes)."""
        done = min(computed + scheduler_output.num_scheduled_tokens.get(request_id, 0), len(state.tokens))
        end = done - done % self.chunk_size
        if end > state.saved:
            start = state.saved - state.saved % self.chunk_size
            self._plan.saves.append(Span(request_id, state.tokens[:end], list(state.block_ids), start, end))
            state.saved = end

    def finished(self, request: Any, block_ids: Sequence[int]) -> tuple[bool, dict[str, Any] | None]:
        """The request finished or was aborted: its lease goes now, not with a later step (there may be none).

        Returns whether vLLM must keep its blocks for a last save, and the ``kv_transfer_params``
        of its response (PD requests only). Every token whose KV was computed (the prompt and
        the answer, all but the last token) that is not saved yet, including a trailing partial
        chunk, is saved in the next step. A PD prefill saves its prompt but the last token
        instead, and pushes it to its decode instance once stored.
        """
        request_id = request.request_id
        state = self._requests.pop(request_id, None)
        self._hits.pop(request_id, None)
        self._waits.pop(request_id, None)
        self._claims.pop(request_id, None)
        if request_id in self._extended:
            self._extended.discard(request_id)
            for lookup in self.lookups:
                lookup.release(request_id)
            return False, None
        for lookup in self.lookups:
            lookup.release(request_id)
        decode = self._decodes.pop(request_id, None)
        if decode is not None:
            xfer_id, loaded = decode
            wanted = max(len(request.prompt_token_ids or ()) - 1, 0)
            status = "loaded" if loaded >= wanted else "partial" if loaded else "recomputed"
            return False, finished_params(xfer_id, status=status, loaded_tokens=loaded)
        pd = pd_params(request)
        if pd is not None and pd.role == "prefill":
            return self._finish_prefill(request, state, list(block_ids), pd)
        if state is None:
            return False, None
        all_tokens = list(getattr(request, "all_token_ids", None) or state.tokens)
        computed = self._computed(request, all_tokens)
        keep = self._plan_extension_saves(request, state, list(block_ids), computed)
        if self.save_partial_chunks and computed > state.saved:
            start = state.saved - state.saved % self.chunk_size
            self._plan.saves.append(Span(request_id, all_tokens[:computed], list(block_ids), start, computed))
            keep = True
        if keep:
            self._plan.finished.append(request_id)
        return keep, None

    def _plan_extension_saves(self, request: Any, state: _Request, block_ids: list[int], computed: int) -> bool:
        """Offer a finished request computed exactly to the extensions that want it: whether any does."""
        if not self.extensions or not block_ids:
            return False
        view = _engine_request(request, state.tokens)
        prompt = min(computed, len(state.tokens))
        wanted = False
        for extension in self.extensions:
            try:
                if not extension.wants_save(view):
                    continue
            except Exception:
                logger.exception("lmplug engine extension %r failed to look at a finished request", extension.name)
                continue
            save = EngineSave(view.request_id, view.tokens, block_ids, prompt, view.params)
            self._plan.extension_saves.append((extension.name, save))
            wanted = True
        return wanted

    @staticmethod
    def _computed(request: Any, all_tokens: list[int]) -> int:
        """Tokens of the request whose KV is in vLLM's blocks (the last token was sampled, never fed)."""
        computed = int(request.num_computed_tokens) - int(getattr(request, "num_in_flight_tokens", 0) or 0)
        return min(computed, len(all_tokens) - 1)

    def _finish_prefill(
        self, request: Any, state: _Request | None, block_ids: list[int], pd: PDParams
    ) -> tuple[bool, dict[str, Any] | None]:
        """A PD prefill ended: save the prompt but its last token and push it to the decode instance."""
        request_id = request.request_id
        prompt = list(request.prompt_token_ids or ())
        wanted = len(prompt) - 1
        all_tokens = list(getattr(request, "all_token_ids", None) or prompt)
        if state is None or wanted < 1 or self._computed(request, all_tokens) < wanted:
            return False, finished_params(pd.xfer_id, status="skipped", tokens=0)  # aborted before its prompt was done
        assert pd.destination is not None
        self._plan.pushes.append(Push(request_id, prompt[:wanted], pd.destination, pd.xfer_id, pd.seconds))
        keep = wanted > state.saved
        if keep:
            start = state.saved - state.saved % self.chunk_size
            self._plan.saves.append(Span(request_id, prompt[:wanted], block_ids, start, wanted))
            self._plan.finished.append(request_id)
        return keep, finished_params(pd.xfer_id, status="pushing", tokens=wanted)


def _ended(states: Sequence[str | None]) -> str | None:
    """How a transfer ended, from each rank's receiver (None: it may still bring KV)."""
    for state in ("failed", "rejected"):
        if state in states:
            return state
    if states and all(state == "completed" for state in states):
        return "completed"
    return None


def _engine_request(request: Any, tokens: list[int]) -> EngineRequest:
    """What an engine extension sees of a vLLM request."""
    params = getattr(request, "kv_transfer_params", None)
    return EngineRequest(request.request_id, tokens, params if isinstance(params, dict) else {})
