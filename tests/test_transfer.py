from __future__ import annotations

import torch

from lmplug.core.memory import HeapAllocator
from lmplug.core.transfer import _runs, copy_from_chunks, copy_into_chunks
from lmplug.tierkit import KVLayout
from lmplug_cpu.pool import HostPool

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_size=8, dtype=torch.bfloat16)  # 192 bytes per token


def test_adjacent_pool_chunks_form_runs_and_round_trip() -> None:
    pool = HostPool(LAYOUT, 1 << 20, alignment=64, pin_memory=False)
    heap = HeapAllocator(LAYOUT, pin_memory=False)
    sizes = [(pool, 8), (pool, 8), (pool, 8), (heap, 8), (pool, 8), (pool, 5)]
    chunks = [allocator.allocate(tokens) for allocator, tokens in sizes]
    assert all(chunk is not None for chunk in chunks)
    runs = list(_runs(chunks))  # type: ignore[arg-type]
    assert runs == [(0, 3), (3, 1), (4, 1), (5, 1)]
    kv = torch.randn(2, 3, 60, 16).to(torch.bfloat16)[:, :, 10:, :]  # a strided source
    copy_into_chunks(kv, 3, chunks)  # type: ignore[arg-type]
    assert torch.equal(chunks[2].tensor, kv[:, :, 19:27])  # type: ignore[union-attr]
    out = torch.zeros(2, 3, 50, 16, dtype=torch.bfloat16)
    assert copy_from_chunks(chunks, out) == 45  # type: ignore[arg-type]
    assert torch.equal(out[:, :, :45], kv[:, :, 3:48])
    assert bool((out[:, :, 45:] == 0).all())
