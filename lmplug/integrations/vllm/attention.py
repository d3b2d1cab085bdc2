"""Attention over a request's blocks with vLLM's own CPU attention kernel.

An engine extension that computes (CacheBlend) attends queries at chosen positions of a
request to the KV in the request's blocks: each query sees the keys at or before its position.
vLLM's CPU kernel does that for "requests" whose queries are the last tokens of their sequence,
so each run of consecutive query positions becomes one such request over the same blocks. The
kernel reads vLLM's paged layout for its ISA (vec or AMX tiles) itself: no gather, no copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class CpuPagedAttention:
    """vLLM's CPU attention for ISA ``isa`` over one layer's ``[blocks, kv_heads, block_size, 2 * head_size]`` cache."""

    def __init__(self, isa: str, num_kv_heads: int, head_size: int, block_size: int) -> None:
        from vllm import _custom_ops

        self._ops = _custom_ops
        self.isa = isa
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.block_size = block_size

    def attend(
        self,
        layer: torch.Tensor,
        block_ids: Sequence[int],
        query: torch.Tensor,
        positions: torch.Tensor,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        """``query`` ``[n, heads, head_size]`` at increasing ``positions`` attended to the request's KV
        at positions ``<=`` each query's (within ``window``): ``[n, heads * head_size]``."""
        n, heads, size = query.shape
        positions = positions.to(device="cpu", dtype=torch.int64)
        if n and bool((positions[1:] <= positions[:-1]).any()):
            raise ValueError("query positions must increase")
        breaks = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
        bounds = torch.cat([torch.zeros(1, dtype=torch.int64), breaks, torch.tensor([n])])
        query_start_loc = bounds.to(torch.int32)
        seq_lens = (positions[bounds[1:] - 1] + 1).to(torch.int32)
        needed = -(-int(seq_lens.max()) // self.block_size) if n else 0
        if needed > len(block_ids):
            raise ValueError(f"position {int(seq_lens.max()) - 1} is beyond the request's {len(block_ids)} blocks")
        runs = int(seq_lens.shape[0])
        table = torch.tensor(list(block_ids[:needed]), dtype=torch.int32).expand(runs, needed).contiguous()
        blocks = layer.shape[0]
        key_cache, value_cache = layer.view(blocks, self.num_kv_heads, 2 * self.block_size, size).chunk(2, dim=2)
        ops = self._ops
        scheduler = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=runs,
            num_heads=heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=size,
            seq_lens=seq_lens,
            dtype=query.dtype,
            query_start_loc=query_start_loc,
            causal=True,
            sliding_window_size=window if window is not None else -1,
            isa=self.isa,
            enable_kv_split=False,
        )
        out = torch.empty(n, heads, size, dtype=query.dtype)
        ops.cpu_attention_with_kv_cache(
            query=query.contiguous(),
            key_cache=key_cache,
            value_cache=value_cache,
            output=out,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            scale=scale,
            causal=True,
            alibi_slopes=None,
            sliding_window=window if window is not None else -1,
            block_table=table,
            softcap=0.0,
            scheduler_metadata=scheduler,
            s_aux=None,
        )
        return out.view(n, heads * size)
