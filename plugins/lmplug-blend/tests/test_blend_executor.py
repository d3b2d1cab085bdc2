"""The executor against full prefill: r = 1 is a full prefill, masks are exactly causal, full
reuse keeps the reused KV, selection keeps what it should, and wrong KV is refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmplug import SyncCache
from lmplug_blend.adapters import TransformersLlamaAdapter
from lmplug_blend.config import SelectionConfig
from lmplug_blend.executor import BlendInput, BlendRejected, blend
from lmplug_blend.reference import ReferenceBlender
from lmplug_blend.segments import Span

from blend_testing import LAYERS, passage

SYSTEM, A, B, C, QUESTION = passage(1, 12), passage(2, 40), passage(3, 56), passage(4, 33), passage(5, 9)


def prompt(*parts: list[int]) -> tuple[list[int], list[Span]]:
    """The concatenation of ``parts``, with a span for every part but the first and the last."""
    tokens: list[int] = []
    spans: list[Span] = []
    for index, part in enumerate(parts):
        if 0 < index < len(parts) - 1:
            spans.append((len(tokens), len(tokens) + len(part)))
        tokens += part
    return tokens, spans


def blender(model: Any, cache: SyncCache, **selection: Any) -> ReferenceBlender:
    return ReferenceBlender(model, cache, SelectionConfig(**selection))


def test_recomputing_every_token_is_a_full_prefill(model: Any, cache: SyncCache) -> None:
    reference = blender(model, cache, check_layers=(1,), ratios=(1.0,))
    reference.ingest(*prompt(SYSTEM, A, B, C, QUESTION))
    tokens, spans = prompt(SYSTEM, C, A, B, QUESTION)  # the passages elsewhere, in another order
    blended = reference.blended(tokens, spans)
    assert blended.blend is not None
    assert blended.blend.reused == len(A) + len(B) + len(C)
    assert blended.blend.recomputed == blended.blend.reused
    exact = reference.prefill(tokens)
    torch.testing.assert_close(blended.kv, exact.kv, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(blended.logits, exact.logits, atol=1e-4, rtol=1e-4)
    assert reference.continue_greedy(blended, 8) == reference.continue_greedy(exact, 8)


def test_full_reuse_keeps_the_reused_kv_and_computes_the_rest(model: Any, cache: SyncCache) -> None:
    reference = blender(model, cache, check_layers=(), ratios=())
    ingested, ingested_spans = prompt(SYSTEM, A, B, QUESTION)
    source = reference.ingest(ingested, ingested_spans)
    tokens, spans = prompt(passage(6, 5), B, A, QUESTION)
    blended = reference.blended(tokens, spans)
    assert blended.blend is not None
    assert blended.blend.recomputed == 0
    exact = reference.prefill(tokens)
    # B's KV is the KV the first prompt computed for it, moved from position 52 to 5: V as is...
    start, end = ingested_spans[1]
    torch.testing.assert_close(blended.kv[:, 1, 5 : 5 + len(B)], source.kv[:, 1, start:end], atol=1e-6, rtol=1e-6)
    # ... and K rotated (layer 0's K depends on the token and position only: the exact K here).
    torch.testing.assert_close(blended.kv[0, 0, 5 : 5 + len(B)], exact.kv[0, 0, 5 : 5 + len(B)], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(blended.kv[1:, 1, 5 : 5 + len(B)], exact.kv[1:, 1, 5 : 5 + len(B)], atol=1e-3)
    # The system line before it is computed, exactly.
    torch.testing.assert_close(blended.kv[:, :, :5], exact.kv[:, :, :5], atol=1e-5, rtol=1e-5)


def test_a_recomputed_token_never_sees_a_later_key(model: Any) -> None:
    adapter = TransformersLlamaAdapter(model)
    n, later = 64, 40
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(3, 400, (n,), generator=generator)
    exact: list[tuple[torch.Tensor, torch.Tensor]] = []
    blend(
        adapter,
        BlendInput(tokens, 0, lambda layer: _zeros(adapter, n), torch.zeros(n, dtype=torch.bool), torch.zeros(n)),
        SelectionConfig(check_layers=(1,), ratios=(1.0,)),
        lambda layer, k, v: exact.append((k, v)),
    )
    # Reused KV a little off the exact KV (as KV from another context is), past layer 0.
    noise = [
        (k + (0.01 if layer else 0.0) * torch.randn(k.shape, generator=generator), v)
        for layer, (k, v) in enumerate(exact)
    ]

    def fused(reused: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        # head: the selection does not depend on the KV, so only attention can carry a change back;
        # these offsets make it recompute the tokens right before `later` and reuse those after it.
        offsets = torch.where(torch.arange(n) < later, later - torch.arange(n), n)
        request = BlendInput(tokens, 0, lambda layer: reused[layer], torch.ones(n, dtype=torch.bool), offsets)
        blend(adapter, request, SelectionConfig(strategy="head", ratios=(0.5,)), lambda layer, k, v: out.append((k, v)))
        return out

    # Reused KV that differs only after token `later` (from layer 2 on: layers 0 and 1 are computed).
    changed = [pair if layer < 2 else _perturbed(pair, later) for layer, pair in enumerate(noise)]
    first, second = fused(noise), fused(changed)
    for layer in range(LAYERS):
        assert torch.equal(first[layer][0][:later], second[layer][0][:later]), layer
        assert torch.equal(first[layer][1][:later], second[layer][1][:later]), layer
    assert not torch.equal(first[-1][0][later:], second[-1][0][later:])


def _zeros(adapter: TransformersLlamaAdapter, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (n, adapter.geometry.num_kv_heads, adapter.geometry.head_size)
    return torch.zeros(shape), torch.zeros(shape)


def _perturbed(pair: tuple[torch.Tensor, torch.Tensor], later: int) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = pair[0].clone(), pair[1].clone()
    k[later:] += 1.0
    v[later:] -= 1.0
    return k, v


@pytest.mark.parametrize(
    ("check_layers", "ratios", "kept"),
    [((1,), (0.25,), 25), ((1, 2), (0.5, 0.25), 25), ((1,), (0.0,), 0), ((2,), (0.1,), 10)],
)
def test_the_last_check_layer_sets_how_many_reused_tokens_are_recomputed(
    model: Any, check_layers: tuple[int, ...], ratios: tuple[float, ...], kept: int
) -> None:
    adapter = TransformersLlamaAdapter(model)
    n = 100
    tokens = torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(3))
    reused = [(0.1 * torch.randn(n, 2, 32), 0.1 * torch.randn(n, 2, 32)) for _ in range(LAYERS)]
    request = BlendInput(tokens, 0, lambda layer: reused[layer], torch.ones(n, dtype=torch.bool), torch.arange(n))
    selection = SelectionConfig(check_layers=check_layers, ratios=ratios)
    written: list[torch.Tensor] = []
    with pytest.raises(BlendRejected, match="layer 0"):  # random KV is not this model's KV
        blend(adapter, request, selection, lambda layer, k, v: written.append(k))
    result = blend(adapter, request, selection, lambda layer, k, v: written.append(k), tolerance=float("inf"))
    assert result.recomputed == kept
    assert result.reused == n
    assert result.forced == 0
    # Rows neither recomputed nor forced keep the reused KV in the last layer.
    last = written[-1]
    unchanged = (last == reused[-1][0]).flatten(1).all(dim=1)
    assert int(unchanged.sum()) == n - kept


def test_hkvd_recomputes_the_tokens_that_deviate_most(model: Any) -> None:
    adapter = TransformersLlamaAdapter(model)
    n = 60
    tokens = torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(5))
    exact: list[tuple[torch.Tensor, torch.Tensor]] = []
    no_reuse = BlendInput(tokens, 0, lambda layer: _zeros(adapter, n), torch.zeros(n, dtype=torch.bool), torch.zeros(n))
    blend(adapter, no_reuse, SelectionConfig(), lambda layer, k, v: exact.append((k.clone(), v.clone())))
    wrong = [10, 20, 30, 40, 50, 55]
    reused = [(k.clone(), v.clone()) for k, v in exact]
    for layer in range(1, LAYERS):
        reused[layer][1][wrong] += 3.0  # these tokens' reused V is far from what this prompt computes
    written: list[torch.Tensor] = []
    request = BlendInput(tokens, 0, lambda layer: reused[layer], torch.ones(n, dtype=torch.bool), torch.arange(n))
    blend(adapter, request, SelectionConfig(ratios=(0.1,)), lambda layer, k, v: written.append(v))
    fixed = (written[-1] != reused[-1][1]).flatten(1).any(dim=1).nonzero().flatten().tolist()
    assert fixed == wrong


def test_a_passage_split_by_the_exact_prefix_is_reused_after_it(model: Any, cache: SyncCache) -> None:
    reference = blender(model, cache, check_layers=(1,), ratios=(1.0,))
    reference.ingest(*prompt(SYSTEM, A, B, QUESTION))
    tokens, spans = prompt(SYSTEM, B, A, QUESTION)
    exact = reference.prefill(tokens)
    # The first 30 tokens (the system line and some of B) are an exact prefix, computed already.
    start = 30
    blended = reference.blended(tokens, spans, exact=exact.kv[:, :, :start])
    assert blended.blend is not None
    assert blended.blend.tokens == len(tokens) - len(QUESTION) - start
    assert blended.blend.reused == len(A) + len(B) - (start - len(SYSTEM))
    torch.testing.assert_close(blended.logits, exact.logits, atol=1e-4, rtol=1e-4)


def test_wrong_passage_kv_is_refused_and_the_prompt_computed(model: Any, cache: SyncCache) -> None:
    reference = blender(model, cache)
    tokens, spans = prompt(SYSTEM, A, B, QUESTION)
    exact = reference.prefill(tokens)
    # A's KV stored as computed at position 12, not rotated back to 0: at any other position it is wrong.
    start, end = spans[0]
    stored = torch.stack([exact.kv[:, 0, start:end], exact.kv[:, 1, start:end]]).flatten(3).contiguous()
    cache.store(A, stored, domain=reference.domain)
    moved_tokens, moved_spans = prompt(passage(9, 30), A, QUESTION)
    blended = reference.blended(moved_tokens, moved_spans)
    assert blended.blend is None
    assert blended.rejected is not None
    assert "layer 0" in blended.rejected
    torch.testing.assert_close(blended.logits, reference.prefill(moved_tokens).logits)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_executor_runs_on_cuda_tensors(model: Any) -> None:
    n = 48
    tokens = torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(11))
    exact: list[tuple[torch.Tensor, torch.Tensor]] = []
    cpu = TransformersLlamaAdapter(model)
    blend(cpu, BlendInput(tokens, 0, lambda layer: _zeros(cpu, n), torch.zeros(n, dtype=torch.bool), torch.zeros(n)),
          SelectionConfig(), lambda layer, k, v: exact.append((k, v)))  # fmt: skip
    results: dict[str, list[torch.Tensor]] = {"cpu": [], "cuda": []}
    selection = SelectionConfig(strategy="head", ratios=(0.5,), head_tokens=2)
    for device in ("cpu", "cuda"):
        adapter = TransformersLlamaAdapter(model.to(device))
        reused = [(k.to(device), v.to(device)) for k, v in exact]
        request = BlendInput(
            tokens.to(device), 0, lambda layer, reused=reused: reused[layer],
            torch.ones(n, dtype=torch.bool, device=device), torch.arange(n, device=device),
        )  # fmt: skip
        result = blend(adapter, request, selection, lambda layer, k, v, out=results[device]: out.append(v.cpu()))
        assert result.recomputed == n // 2 + 2  # the half chosen, and the 2 head tokens always computed
    model.to("cpu")
    for on_cpu, on_cuda in zip(results["cpu"], results["cuda"], strict=True):
        torch.testing.assert_close(on_cuda, on_cpu, atol=1e-3, rtol=1e-3)
