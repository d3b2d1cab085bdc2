"""Which reused tokens a blend recomputes: deviations and the selection strategies."""

from __future__ import annotations

import math

import torch

from lmplug_blend.config import Metric, Strategy


def deviation(
    metric: Metric,
    fresh: tuple[torch.Tensor, torch.Tensor],
    reused: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Per token, the squared L2 distance (float32, over heads and dimensions) between fresh and
    reused KV: ``fresh`` and ``reused`` are ``(K, V)`` pairs of ``[n, kv_heads, head_size]``."""

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.float() - b.float()).square().flatten(1).sum(dim=1)

    if metric == "key":
        return distance(fresh[0], reused[0])
    if metric == "value":
        return distance(fresh[1], reused[1])
    return distance(fresh[0], reused[0]) + distance(fresh[1], reused[1])


def budget(ratio: float, reusable: int) -> int:
    """How many of ``reusable`` tokens a check layer with ``ratio`` keeps (rounded up: a ratio
    above 0 keeps at least one)."""
    return min(reusable, math.ceil(ratio * reusable - 1e-9))


def choose(
    strategy: Strategy,
    count: int,
    scores: torch.Tensor,
    offsets: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Indices (sorted) of the ``count`` candidates a strategy keeps; ``scores`` are their deviations
    (hkvd keeps the highest), ``offsets`` their positions within their passage (head keeps the
    lowest), random draws from ``generator``."""
    total = int(scores.shape[0])
    if count >= total:
        return torch.arange(total)
    if count <= 0:
        return torch.empty(0, dtype=torch.int64)
    if strategy == "hkvd":
        picked = torch.topk(scores.float(), count, sorted=False).indices
    elif strategy == "random":
        picked = torch.randperm(total, generator=generator)[:count]
    else:
        picked = torch.argsort(offsets, stable=True)[:count]
    return torch.sort(picked.cpu()).values
