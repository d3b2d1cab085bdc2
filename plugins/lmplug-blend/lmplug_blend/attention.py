"""Attention for the tokens a blend recomputes, with exact causal masks.

A recomputed token at position ``p`` attends to the keys at positions ``<= p`` (and, with a
sliding window ``w``, ``> p - w``), whatever else is recomputed with it. (LMCache's dense path
aligns a causal mask to the bottom right, so its selected tokens see later keys.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROWS_PER_BLOCK = 256
"""Queries per SDPA call: bounds the ``[heads, rows, keys]`` score tensor (256 rows over 8k keys
and 9 heads is 73 MB in float32)."""


def causal_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean ``[queries, keys]``: True where the query may attend to the key."""
    allowed = key_positions[None, :] <= query_positions[:, None]
    if window is not None:
        allowed &= key_positions[None, :] > query_positions[:, None] - window
    return allowed


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of ``q`` ``[n, heads, dim]`` over ``k``, ``v`` ``[m, kv_heads, dim]`` (grouped-query:
    ``heads`` a multiple of ``kv_heads``), each query at its position over the keys at theirs.
    Returns ``[n, heads * dim]`` in ``q``'s dtype.

    ``key_positions`` must be increasing and ``query_positions`` non-decreasing: each block of
    queries then reads only the keys its positions can reach (about half the work of masking
    every key).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads")
    keys = k.transpose(0, 1).unsqueeze(0)  # [1, kv_heads, m, dim]
    values = v.transpose(0, 1).unsqueeze(0)
    out = torch.empty(q.shape[0], heads * q.shape[2], dtype=q.dtype, device=q.device)
    # The reach of each block: keys from the first one its earliest query sees (with a window)
    # to the last one its latest query sees.
    blocks = range(0, q.shape[0], ROWS_PER_BLOCK)
    firsts = query_positions[list(blocks)]
    lasts = query_positions[[min(b + ROWS_PER_BLOCK, q.shape[0]) - 1 for b in blocks]]
    stops = torch.searchsorted(key_positions, lasts, right=True).tolist()
    starts = [0] * len(stops)
    if window is not None:
        starts = torch.searchsorted(key_positions, firsts - window + 1).tolist()
    for begin, first, stop in zip(blocks, starts, stops, strict=True):
        end = min(begin + ROWS_PER_BLOCK, q.shape[0])
        mask = causal_mask(query_positions[begin:end], key_positions[first:stop], window)
        queries = q[begin:end].transpose(0, 1).unsqueeze(0)  # [1, heads, rows, dim]
        result = F.scaled_dot_product_attention(
            queries,
            keys[:, :, first:stop],
            values[:, :, first:stop],
            attn_mask=mask,
            scale=scale,
            enable_gqa=heads != kv_heads,
        )
        out[begin:end] = result[0].transpose(0, 1).reshape(end - begin, -1)
    return out
