"""The blend executor: fuse reused KV with the KV of the tokens worth recomputing.

Input: a range of a prompt (tokens ``start .. start + n``), the KV of what came before it
(exact), and reused KV for some of its tokens (passages cached from other prompts, already
rotated to their positions here). Output: KV for every token of the range, layer by layer,
handed to a sink (the engine writes it into its paged cache).

Per layer, the tokens still *active* are computed (norm, projections, RoPE) and their fresh
KV replaces the reused KV; every other token keeps its reused KV. Every token is active up
to the first check layer; at each check layer the reused tokens whose fresh KV deviates most
from their reused KV stay active (CacheBlend's HKVD selection, gradual with several check
layers). Tokens with nothing reused (separators, gaps, missed passages: *forced*) are always
active. Attention of an active token covers exactly the keys at or before its position.

Layer 0 is also a free integrity check: there a token's K and V depend only on the token and
its position, so reused KV that differs from the fresh KV by more than rounding is not this
model's KV for these tokens (wrong tokens, wrong model, a broken rotation). The executor then
raises :class:`BlendRejected` and the caller recomputes the request instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmplug_blend.adapters import BlendAdapter
from lmplug_blend.attention import masked_attention
from lmplug_blend.config import SelectionConfig
from lmplug_blend.select import budget, choose, deviation

LayerKV = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""``layer -> (K, V)``, each ``[tokens, kv_heads, head_size]``."""

Sink = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``(layer, K, V)`` of the whole range, each ``[n, kv_heads, head_size]``; called once per layer, in order."""

Attend = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
"""``(layer, q, positions) -> [n, heads * head_size]``: attention of ``q`` over the KV the sink wrote for
this layer (and the context before the range), with the engine's own kernel; None: not available."""

ROPE_TOLERANCE = 0.02
"""Largest layer-0 difference between fresh and reused KV, relative to the largest fresh value,
that counts as rounding (bfloat16 is good to about 0.4 %; rounding through a rotation adds as much)."""


class BlendRejected(Exception):
    """The reused KV failed the layer-0 check: the request must be recomputed."""


@dataclass(frozen=True, slots=True)
class BlendInput:
    """One range to blend.

    ``tokens`` int64 ``[n]`` are the ids at positions ``start .. start + n``; ``reused`` is a
    :data:`LayerKV` over those ``n`` tokens (rows not in ``reusable`` are ignored);
    ``reusable`` bool ``[n]``; ``offsets`` int64 ``[n]``, each token's position inside its
    passage (the ``head`` strategy and ``head_tokens`` use it); ``context`` is a
    :data:`LayerKV` of the ``start`` tokens before the range (``None`` when ``start`` is 0);
    ``attend`` computes attention where the sink wrote (the engine's kernel over its own cache),
    else the executor attends to ``context`` and the fused KV itself.
    """

    tokens: torch.Tensor
    start: int
    reused: LayerKV
    reusable: torch.Tensor
    offsets: torch.Tensor
    context: LayerKV | None = None
    attend: Attend | None = None


@dataclass(frozen=True, slots=True)
class BlendResult:
    """What a blend did: tokens in the range, tokens with reused KV, how many of those were
    recomputed through the last layer, tokens with nothing reused (always computed), and the
    layer-0 difference (relative)."""

    tokens: int
    reused: int
    recomputed: int
    forced: int
    layer0_error: float
    seconds: dict[str, float] = field(default_factory=dict)
    """Time by phase: ``project`` (norms, projections, RoPE), ``select``, ``write`` (the sink),
    ``attend`` and ``mlp`` (output projection and MLP)."""


def _layer0_error(fresh: tuple[torch.Tensor, torch.Tensor], reused: tuple[torch.Tensor, torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(fresh, reused, strict=True):
        a32, b32 = a.float(), b.float()
        scale = max(float(a32.abs().max()), 1e-6)
        worst = max(worst, float((a32 - b32).abs().max()) / scale)
    return worst


@torch.inference_mode()
def blend(
    adapter: BlendAdapter,
    request: BlendInput,
    selection: SelectionConfig,
    sink: Sink,
    *,
    tolerance: float = ROPE_TOLERANCE,
) -> BlendResult:
    """Blend ``request`` with ``adapter``'s model, handing each layer's fused KV to ``sink``."""
    geometry = adapter.geometry
    n = int(request.tokens.shape[0])
    device = request.tokens.device
    positions = request.start + torch.arange(n, device=device)
    key_positions = torch.arange(request.start + n, device=device)
    reusable = request.reusable.to(device=device, dtype=torch.bool)
    forced = ~reusable
    offsets = request.offsets.to(device)
    if selection.head_tokens:
        forced |= offsets < selection.head_tokens
    reusable_count = int(reusable.sum())
    checks = dict(zip(selection.check_layers, selection.ratios, strict=True))
    first_check = selection.check_layers[0] if selection.check_layers else -1
    generator = torch.Generator().manual_seed(selection.seed)

    active = torch.arange(n, device=device)  # rows whose stream is current at this layer
    stream = adapter.embed(request.tokens)
    layer0_error = 0.0
    seconds = dict.fromkeys(("project", "select", "write", "attend", "mlp"), 0.0)
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] += now - clock
        clock = now

    for layer in range(geometry.num_layers):
        q, k, v = adapter.attention_inputs(layer, stream, positions[active])
        lap("project")
        reused_k, reused_v = request.reused(layer)
        fused_k, fused_v = reused_k.clone(), reused_v.clone()
        if layer == 0:
            rows = reusable[active]
            if bool(rows.any()):
                held = active[rows]
                layer0_error = _layer0_error((k[rows], v[rows]), (reused_k[held], reused_v[held]))
                if layer0_error > tolerance:
                    raise BlendRejected(
                        f"reused KV differs from the fresh KV at layer 0 by {layer0_error:.3g} (tolerance "
                        f"{tolerance}): not this model's KV for these tokens at these positions"
                    )
        if first_check < 0 and layer == 0:
            # Full reuse: only the forced tokens are computed, from the first layer on.
            keep = forced[active]
            fused_k[active[keep]], fused_v[active[keep]] = k[keep], v[keep]
            q, stream, active = q[keep], stream[keep], active[keep]
        else:
            fused_k[active], fused_v[active] = k, v
        lap("select")
        sink(layer, fused_k, fused_v)
        lap("write")
        if layer == geometry.num_layers - 1:
            break
        keep_rows = None
        if layer in checks:
            candidates = (reusable & ~forced)[active]
            index = torch.nonzero(candidates).flatten()
            count = budget(checks[layer], reusable_count)
            rows = active[index]
            scores = deviation(selection.metric, (k[index], v[index]), (reused_k[rows], reused_v[rows]))
            chosen = index[choose(selection.strategy, count, scores, offsets[active[index]], generator)]
            keep = ~candidates
            keep[chosen] = True
            keep_rows = torch.nonzero(keep).flatten()
        if keep_rows is not None:
            q, stream, active = q[keep_rows], stream[keep_rows], active[keep_rows]
        lap("select")
        if not active.numel():
            for later in range(layer + 1, geometry.num_layers):
                sink(later, *request.reused(later))
            break
        attended = request.attend(layer, q, positions[active]) if request.attend is not None else None
        if attended is None:
            keys, values = fused_k, fused_v
            if request.context is not None and request.start:
                context_k, context_v = request.context(layer)
                keys, values = torch.cat([context_k, fused_k]), torch.cat([context_v, fused_v])
            attended = masked_attention(
                q, keys, values, positions[active], key_positions, scale=geometry.scale, window=geometry.window
            )
        lap("attend")
        stream = adapter.after_attention(layer, stream, attended)
        lap("mlp")
    recomputed = int(reusable[active].sum()) if active.numel() else 0
    return BlendResult(
        tokens=n,
        reused=reusable_count,
        recomputed=recomputed,
        forced=n - reusable_count,
        layer0_error=layer0_error,
        seconds=seconds,
    )
