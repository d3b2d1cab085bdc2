"""CacheBlend without an engine: transformers' model, lmplug's cache, the blend executor.

It serves as the oracle of the tests (full prefill is the reference every blend is measured
against) and as the harness of the quality benchmark. Passages are cached the way the
engine integration caches them: from an exact prefill of a prompt that contains them, K
rotated back to position 0, under the passage key domain (:func:`segment_domain`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmplug import SyncCache
from lmplug_blend.adapters import TransformersLlamaAdapter
from lmplug_blend.config import PolicyConfig, SelectionConfig
from lmplug_blend.executor import BlendInput, BlendRejected, BlendResult, blend
from lmplug_blend.segments import check_spans, moved, plan_blend, segment_domain, to_origin


@dataclass(frozen=True, slots=True)
class Prefill:
    """A prompt's KV ``[layers, 2, n, kv_heads, head_size]`` (positions ``0 .. n``), the logits
    ``[vocab]`` after its last token, and the blend that produced it (None: computed exactly;
    ``rejected`` says why when a blend was tried and refused)."""

    kv: torch.Tensor
    logits: torch.Tensor
    blend: BlendResult | None
    rejected: str | None = None


class ReferenceBlender:
    """Exact prefills, passage caching and blended prefills of one transformers Llama model."""

    def __init__(
        self, model: Any, cache: SyncCache, selection: SelectionConfig, policy: PolicyConfig | None = None
    ) -> None:
        self.model = model.eval()
        self.adapter = TransformersLlamaAdapter(model)
        self.cache = cache
        self.selection = selection
        self.policy = policy or PolicyConfig(min_reused_tokens=1, min_segment_tokens=1)
        self.domain = segment_domain(self.adapter.rope)
        geometry = self.adapter.geometry
        self._shape = (geometry.num_kv_heads, geometry.head_size)

    # ------------------------------------------------------------------ exact

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, kv: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """KV of ``kv``'s tokens then ``ids`` (``[layers, 2, m, heads, size]``), and the last logits."""
        from transformers import DynamicCache

        past = DynamicCache(config=self.model.config)
        if kv is not None:
            for layer in range(kv.shape[0]):
                past.update(kv[layer, 0].transpose(0, 1)[None], kv[layer, 1].transpose(0, 1)[None], layer)
        out = self.model(ids[None], past_key_values=past, use_cache=True)
        layers: list[Any] = list(past.layers)
        stacked = torch.stack(
            [torch.stack([entry.keys[0].transpose(0, 1), entry.values[0].transpose(0, 1)]) for entry in layers]
        )
        return stacked, out.logits[0, -1].float()

    def prefill(self, tokens: Sequence[int]) -> Prefill:
        """Full prefill: the reference."""
        kv, logits = self._forward(torch.tensor(tokens, dtype=torch.int64), None)
        return Prefill(kv, logits, None)

    def ingest(self, tokens: Sequence[int], spans: Sequence[Sequence[int]]) -> Prefill:
        """Full prefill of ``tokens``, caching the KV of each passage in ``spans``."""
        exact = self.prefill(tokens)
        for start, end in check_spans(spans, len(tokens)):
            keys = to_origin(exact.kv[:, 0, start:end], start, self.adapter.rope)
            values = exact.kv[:, 1, start:end]
            stored = torch.stack([keys, values], dim=0).flatten(3)  # [2, layers, n, hidden]
            self.cache.store(tokens[start:end], stored.contiguous(), domain=self.domain)
        return exact

    # ------------------------------------------------------------------ blended

    def blended(
        self, tokens: Sequence[int], spans: Sequence[Sequence[int]], exact: torch.Tensor | None = None
    ) -> Prefill:
        """Prefill of ``tokens`` with cached passages blended in (exact when nothing blends). ``exact``
        is the KV ``[layers, 2, m, kv_heads, head_size]`` of the first ``m`` tokens, computed already
        (an exact prefix hit: the blend starts after it)."""
        checked = check_spans(spans, len(tokens))
        hits = [self.cache.lookup(tokens[start:end], domain=self.domain) for start, end in checked]
        start_at = 0 if exact is None else int(exact.shape[2])
        plan = plan_blend(len(tokens), start_at, checked, hits, self.policy)
        if plan is None:
            return self.prefill(tokens)
        geometry = self.adapter.geometry
        n = plan.end - plan.start
        reused = torch.zeros(geometry.num_layers, 2, n, *self._shape, dtype=self.model.dtype)
        for start, _, hit in plan.passages:
            kv, got = self.cache.retrieve(tokens[start : start + hit], domain=self.domain)
            first = max(start, plan.start)
            if got < hit:  # evicted since the lookup: those tokens are computed instead
                plan.reusable[max(start + got, first) - plan.start : start + hit - plan.start] = False
            if start + got > first:
                passage = kv[:, :, first - start : got].reshape(2, kv.shape[1], -1, *self._shape).transpose(0, 1)
                rows = slice(first - plan.start, start + got - plan.start)
                reused[:, 0, rows] = moved(passage[:, 0], start, self.adapter.rope)
                reused[:, 1, rows] = passage[:, 1]
        fused = torch.empty_like(reused)

        def sink(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            fused[layer, 0], fused[layer, 1] = k, v

        request = BlendInput(
            tokens=torch.tensor(tokens[plan.start : plan.end], dtype=torch.int64),
            start=plan.start,
            reused=lambda layer: (reused[layer, 0], reused[layer, 1]),
            reusable=torch.from_numpy(plan.reusable),
            offsets=torch.from_numpy(plan.offsets),
            context=(lambda layer: (exact[layer, 0], exact[layer, 1])) if exact is not None else None,
        )
        try:
            result = blend(self.adapter, request, self.selection, sink)
        except BlendRejected as exc:
            full = self.prefill(tokens)
            return Prefill(full.kv, full.logits, None, rejected=str(exc))
        if exact is not None:
            fused = torch.cat([exact, fused], dim=2)
        kv, logits = self._forward(torch.tensor(tokens[plan.end :], dtype=torch.int64), fused)
        return Prefill(kv, logits, result)

    # ------------------------------------------------------------------ continuations

    @torch.inference_mode()
    def continue_greedy(self, prefill: Prefill, max_tokens: int) -> list[int]:
        """Greedy continuation after a prefill (``max_tokens`` ids)."""
        out: list[int] = []
        kv, logits = prefill.kv, prefill.logits
        for _ in range(max_tokens):
            token = int(torch.argmax(logits))
            out.append(token)
            if len(out) == max_tokens:
                break
            kv, logits = self._forward(torch.tensor([token]), kv)
        return out


def first_token_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(reference || other) of the next-token distributions of two logit vectors."""
    p = torch.log_softmax(reference.float(), dim=-1)
    q = torch.log_softmax(other.float(), dim=-1)
    return float((p.exp() * (p - q)).sum())


def token_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of positions where two continuations agree, up to the first difference (1.0: identical)."""
    same = np.cumprod([x == y for x, y in zip(a, b, strict=False)])
    return float(same.sum()) / max(len(a), 1)
