"""CacheBlend in vLLM: the ``blend`` engine extension.

- **Scheduler** (:meth:`BlendExtension.claim`): a request's passages come from its
  ``kv_transfer_params`` (``{"lmplug": {"blend": {"segments": [[start, end], ...]}}}``) or from
  the configured separator token ids. The worker says how many leading tokens of each passage
  its cache holds (one message on the lookup channel, no data moved); the plan
  (:func:`lmplug_blend.segments.plan_blend`) decides whether and how far to blend.
- **Worker, before the forward** (:meth:`BlendExtension.load`): the passages' KV is read,
  moved to its positions, and blended with the engine's own model; every layer's fused KV is
  written into the request's blocks. vLLM then computes the rest of the prompt over it.
- **Worker, when a request computed exactly finishes** (:meth:`BlendExtension.save`): each of
  its passages not cached yet is copied out of its blocks, K rotated back to position 0, and
  stored under the passage key domain. Blended requests store nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from lmplug import ConfigError
from lmplug.tierkit import (
    ChannelCall,
    Claim,
    EngineExtension,
    EngineLoad,
    EngineRequest,
    EngineSave,
    EngineWorker,
    ThrottledLog,
    config_error,
)
from lmplug_blend.adapters import BlendAdapter
from lmplug_blend.config import BlendConfig, SelectionConfig
from lmplug_blend.executor import BlendInput, BlendRejected, blend
from lmplug_blend.segments import (
    BlendPlan,
    Span,
    check_spans,
    moved,
    plan_blend,
    segment_domain,
    separator_ids,
    spans_between,
    to_origin,
)
from lmplug_blend.vllm_llama import VllmLlamaAdapter

logger = logging.getLogger("lmplug.blend")
_COUNTS = struct.Struct("<II")


@dataclass(slots=True)
class BlendCounters:
    """What blending did in this engine."""

    blends: int = 0
    """Requests blended (their passages' KV reused, the deviating tokens recomputed)."""
    blended_tokens: int = 0
    reused_tokens: int = 0
    """Tokens whose KV came from cached passages."""
    recomputed_tokens: int = 0
    """Of the reused tokens, those recomputed through the last layer (selected, or a passage's head)."""
    forced_tokens: int = 0
    """Tokens in blended ranges with nothing reused (separators, gaps, missed passages): computed."""
    rejected: int = 0
    """Blends refused by the layer-0 check (the request was computed in full)."""
    failures: int = 0
    """Blends that failed otherwise (also computed in full)."""
    saved_passages: int = 0
    saved_tokens: int = 0
    load_seconds: float = 0.0
    """Reading and moving passage KV."""
    blend_seconds: float = 0.0
    """The executor (selection, recompute, writing the fused KV): the ``*_seconds`` below."""
    project_seconds: float = 0.0
    select_seconds: float = 0.0
    write_seconds: float = 0.0
    attend_seconds: float = 0.0
    mlp_seconds: float = 0.0
    save_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class BlendJob:
    """What the scheduler sends the worker: the plan, and the selection to blend it with."""

    plan: BlendPlan
    selection: SelectionConfig


def _blend_params(request: EngineRequest) -> dict[str, Any] | None:
    lmplug = request.params.get("lmplug") if isinstance(request.params, dict) else None
    given = lmplug.get("blend") if isinstance(lmplug, dict) else None
    return given if isinstance(given, dict) else None


def request_selection(request: EngineRequest, default: SelectionConfig) -> SelectionConfig:
    """The request's own selection (``kv_transfer_params.lmplug.blend.selection``), else ``default``;
    ValueError naming the key when it is malformed."""
    given = _blend_params(request)
    if given is None or "selection" not in given:
        return default
    try:
        return SelectionConfig.model_validate(given["selection"])
    except ValidationError as exc:
        raise ValueError(str(config_error(exc, prefix="kv_transfer_params.lmplug.blend.selection"))) from None


def request_spans(request: EngineRequest, separators: Sequence[int]) -> list[Span]:
    """The request's passages: from its parameters, else between separator ids, else none."""
    given = _blend_params(request)
    if given is not None and "segments" in given:
        return check_spans(given["segments"], len(request.tokens))
    if separators:
        return spans_between(np.asarray(request.tokens, dtype=np.int32), separators)
    return []


def encode_query(tokens: Sequence[int], spans: Sequence[Span]) -> bytes:
    """The scheduler's question: how much of each passage is cached."""
    array = np.asarray(tokens, dtype="<i4")
    bounds = np.asarray(spans, dtype="<i4").reshape(-1)
    return _COUNTS.pack(array.size, len(spans)) + array.tobytes() + bounds.tobytes()


def decode_query(message: bytes) -> tuple[np.ndarray, list[Span]]:
    count, passages = _COUNTS.unpack_from(message)
    if len(message) != _COUNTS.size + 4 * (count + 2 * passages):
        raise ValueError("malformed blend query")
    tokens = np.frombuffer(message, dtype="<i4", count=count, offset=_COUNTS.size)
    bounds = np.frombuffer(message, dtype="<i4", count=2 * passages, offset=_COUNTS.size + 4 * count)
    return tokens, check_spans(bounds.reshape(-1, 2).tolist(), count)


class BlendExtension(EngineExtension):
    """CacheBlend for vLLM's connector (registered as engine extension ``blend``)."""

    def __init__(self, config: BlendConfig) -> None:
        self.config = config
        self.separators: tuple[int, ...] = config.separator_ids
        if config.separator is not None and config.tokenizer is not None:
            self.separators = _separator_ids(config.tokenizer, config.separator)
        self.counters = BlendCounters()
        self.disabled: str | None = None
        self._warnings = ThrottledLog(logger)
        self._worker: EngineWorker | None = None
        self._adapter: BlendAdapter | None = None
        self._domain = ""
        self._refusals = 0

    # ------------------------------------------------------------------ scheduler

    def _spans(self, request: EngineRequest) -> list[Span]:
        try:
            return request_spans(request, self.separators)
        except ValueError as exc:
            self._warnings.report("spans", "lmplug blend: request %s: %s; not blended", request.request_id, exc)
            return []

    def claim(self, request: EngineRequest, computed: int, exact: int, call: ChannelCall) -> Claim | None:
        spans = [span for span in self._spans(request) if span[1] > exact]
        if not spans:
            return None
        try:
            selection = request_selection(request, self.config.selection)
        except ValueError as exc:
            self._warnings.report("selection", "lmplug blend: request %s: %s; not blended", request.request_id, exc)
            return None
        answers = call(encode_query(request.tokens, spans))
        if not answers:
            return None
        hits = np.min([np.frombuffer(answer, dtype="<u4") for answer in answers], axis=0).tolist()
        if len(hits) != len(spans):
            return None
        plan = plan_blend(len(request.tokens), exact, spans, hits, self.config.policy)
        return Claim(plan.end, BlendJob(plan, selection)) if plan is not None else None

    def wants_save(self, request: EngineRequest) -> bool:
        return bool(self._spans(request))

    # ------------------------------------------------------------------ worker

    def attach(self, worker: EngineWorker) -> None:
        if worker.world_size != 1:
            raise RuntimeError("blending with tensor parallelism is not supported yet (every rank must select alike)")
        if worker.model is None:
            raise RuntimeError("vLLM's model was not found: blending needs the engine's own model")
        adapter = VllmLlamaAdapter(worker.model)
        self._worker, self._adapter = worker, adapter
        self._domain = segment_domain(adapter.rope)
        logger.info("lmplug blend: on, %d layers, passages keyed in %s", adapter.geometry.num_layers, self._domain)

    async def answer(self, message: bytes) -> bytes:
        tokens, spans = decode_query(message)
        hits = np.zeros(len(spans), dtype="<u4")
        worker = self._worker
        if worker is not None and self.disabled is None:
            cache = worker.cache.async_cache
            for index, (start, end) in enumerate(spans):
                if end - start >= self.config.policy.min_segment_tokens:
                    hits[index] = await cache.lookup(tokens[start:end], domain=self._domain)
        return hits.tobytes()

    def load(self, load: EngineLoad) -> None:
        worker, adapter, job = self._worker, self._adapter, load.payload
        if worker is None or adapter is None or self.disabled is not None:
            raise RuntimeError(f"blending is off in this engine: {self.disabled or 'not attached'}")
        if not isinstance(job, BlendJob) or (job.plan.start, job.plan.end) != (load.start, load.end):
            raise RuntimeError(f"the blend plan {job!r} does not match the load [{load.start}, {load.end})")
        plan = job.plan
        started = time.perf_counter()
        try:
            reused, reusable = self._reused(worker, adapter, plan, load.tokens)
        except Exception:
            self.counters.failures += 1
            raise
        geometry = adapter.geometry
        context = torch.empty(2, plan.start, geometry.num_kv_heads * geometry.head_size, dtype=worker.dtype)
        context = context.to(worker.device)
        shape = (geometry.num_kv_heads, geometry.head_size)

        def context_of(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
            worker.gather(layer, load.block_ids, 0, plan.start, context)
            return context[0].view(-1, *shape), context[1].view(-1, *shape)

        def sink(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            worker.scatter(layer, load.block_ids, plan.start, plan.end, torch.stack([k, v]).flatten(2))

        request = BlendInput(
            tokens=torch.tensor(load.tokens[plan.start : plan.end], dtype=torch.int64, device=worker.device),
            start=plan.start,
            reused=lambda layer: (reused[0, layer].view(-1, *shape), reused[1, layer].view(-1, *shape)),
            reusable=reusable,
            offsets=torch.from_numpy(plan.offsets),
            context=context_of if plan.start else None,
            attend=lambda layer, q, positions: worker.attend(
                layer, load.block_ids, q, positions, geometry.scale, geometry.window
            ),
        )
        loaded = time.perf_counter()
        self.counters.load_seconds += loaded - started
        try:
            result = blend(adapter, request, job.selection, sink, tolerance=self.config.layer0_tolerance)
        except BlendRejected as exc:
            self._refused(str(exc))
            raise
        except Exception:
            self.counters.failures += 1
            raise
        finally:
            self.counters.blend_seconds += time.perf_counter() - loaded
        self._refusals = 0
        counters = self.counters
        counters.blends += 1
        counters.blended_tokens += result.tokens
        counters.reused_tokens += result.reused
        counters.recomputed_tokens += result.recomputed
        counters.forced_tokens += result.forced
        for phase, spent in result.seconds.items():
            setattr(counters, f"{phase}_seconds", getattr(counters, f"{phase}_seconds") + spent)

    def _reused(
        self, worker: EngineWorker, adapter: BlendAdapter, plan: BlendPlan, tokens: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached passages' KV moved to their positions here, in lmplug's chunk layout
        ``[2, layers, n, kv_heads * head_size]``, and which tokens have it (a passage evicted since the
        lookup is computed instead). Rows without reused KV are left unset: they are always computed."""
        geometry = adapter.geometry
        n = plan.end - plan.start
        hidden = geometry.num_kv_heads * geometry.head_size
        with torch.inference_mode(mode=False):  # the cache's thread writes into it
            reused = torch.empty(2, geometry.num_layers, n, hidden, dtype=worker.dtype)
        reusable = torch.from_numpy(plan.reusable.copy())
        for start, _, hit in plan.passages:
            first = max(start, plan.start)  # the passage may begin inside the exact prefix
            if start >= plan.start and start + hit <= plan.end:
                out = reused.narrow(2, start - plan.start, hit)  # read straight into place
                _, got = worker.cache.retrieve(list(tokens[start : start + hit]), out=out, domain=self._domain)
                passage = out.narrow(2, 0, got)
            else:
                kv, got = worker.cache.retrieve(list(tokens[start : start + hit]), domain=self._domain)
                passage = kv.narrow(2, first - start, max(start + got - first, 0))
                reused.narrow(2, first - plan.start, passage.shape[2]).copy_(passage)
                passage = reused.narrow(2, first - plan.start, passage.shape[2])
            if start + got < start + hit:  # evicted since the lookup: computed instead
                reusable[max(start + got, first) - plan.start : start + hit - plan.start] = False
            if passage.shape[2]:
                keys = passage[0].view(geometry.num_layers, -1, geometry.num_kv_heads, geometry.head_size)
                keys.copy_(moved(keys, start, adapter.rope))
        return reused.to(worker.device), reusable

    def _refused(self, reason: str) -> None:
        self.counters.rejected += 1
        self._refusals += 1
        limit = self.config.disable_after
        if limit and self._refusals >= limit:
            self.disabled = f"{self._refusals} blends in a row failed the layer-0 check ({reason})"
            logger.error("lmplug blend is off in this engine: %s", self.disabled)
        else:
            self._warnings.report("refused", "lmplug blend refused a request, which is computed in full: %s", reason)

    def save(self, save: EngineSave) -> None:
        worker, adapter = self._worker, self._adapter
        if worker is None or adapter is None:
            return
        started = time.perf_counter()
        geometry = adapter.geometry
        hidden = geometry.num_kv_heads * geometry.head_size
        request = EngineRequest(save.request_id, save.tokens, save.params)
        for start, end in self._spans(request):
            tokens = list(save.tokens[start:end])
            if end > save.computed or end - start < self.config.policy.min_segment_tokens:
                continue
            if worker.cache.lookup(tokens, domain=self._domain) == len(tokens):
                continue
            kv = torch.empty(2, geometry.num_layers, end - start, hidden, dtype=worker.dtype, device=worker.device)
            for layer in range(geometry.num_layers):
                worker.gather(layer, save.block_ids, start, end, kv[:, layer])
            keys = kv[0].view(geometry.num_layers, end - start, geometry.num_kv_heads, geometry.head_size)
            kv[0] = to_origin(keys, start, adapter.rope).view_as(kv[0])
            stored = worker.cache.store(tokens, kv.cpu() if kv.is_cuda else kv, domain=self._domain)
            if stored:
                self.counters.saved_passages += 1
                self.counters.saved_tokens += stored
        self.counters.save_seconds += time.perf_counter() - started

    def statistics(self) -> dict[str, object]:
        return {"disabled": self.disabled, **dataclasses.asdict(self.counters)}


def _separator_ids(tokenizer: str, separator: str) -> tuple[int, ...]:
    """``separator``'s token ids with the tokenizer at ``tokenizer`` (files cached locally only)."""
    try:
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    except Exception as exc:
        raise ConfigError(f"extensions.blend.tokenizer: cannot load {tokenizer!r}: {exc}") from None
    try:
        return separator_ids(loaded, separator)
    except ValueError as exc:
        raise ConfigError(f"extensions.blend.separator: {exc}") from None


def make_blend(config: BlendConfig) -> BlendExtension:
    """The factory of engine extension ``blend``."""
    return BlendExtension(config)
