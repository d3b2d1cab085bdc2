from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lmplug.tierkit import KVChunk, KVLayout
from lmplug_cpu.pool import HostPool

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_size=8, dtype=torch.float16)  # 64 bytes per token


def test_chunks_are_aligned_views_of_the_pool() -> None:
    pool = HostPool(LAYOUT, 64 * 1024, pin_memory=False)
    a, b = pool.allocate(16), pool.allocate(100)
    assert a is not None
    assert b is not None
    assert tuple(a.tensor.shape) == (2, 2, 16, 8)
    assert a.tensor.dtype == torch.float16
    assert {a.handle % 4096, b.handle % 4096} == {0}
    assert a.tensor.data_ptr() - pool.buffer.data_ptr() == a.handle
    assert pool.used_bytes == 4096 + 8192
    b.tensor.fill_(3)
    a.tensor.fill_(1)
    assert bool((b.tensor == 3).all())


def test_allocation_fails_cleanly_when_full() -> None:
    pool = HostPool(LAYOUT, 3 * 4096, pin_memory=False)
    chunks = [pool.allocate(64) for _ in range(3)]
    assert all(chunk is not None for chunk in chunks)
    assert pool.allocate(1) is None
    chunks[1].release()  # type: ignore[union-attr]
    assert pool.allocate(64) is not None
    assert not pool.fits(64 * 4)


def test_frees_coalesce_into_larger_blocks() -> None:
    pool = HostPool(LAYOUT, 4 * 4096, pin_memory=False)
    chunks = [pool.allocate(64) for _ in range(4)]
    for chunk in chunks[1:3]:
        chunk.release()  # type: ignore[union-attr]
    pool.check()
    assert pool.largest_free == 2 * 4096
    big = pool.allocate(128)
    assert big is not None
    assert big.handle == 4096


def test_bad_alignment_is_rejected() -> None:
    with pytest.raises(ValueError, match="power of two"):
        HostPool(LAYOUT, 4096, alignment=3000)


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 300), st.integers(0, 30)), max_size=80))
def test_random_allocations_and_frees_keep_the_books_balanced(operations: list[tuple[bool, int, int]]) -> None:
    pool = HostPool(LAYOUT, 40 * 4096, alignment=512, pin_memory=False)
    live: list[KVChunk] = []
    for allocate, tokens, pick in operations:
        if allocate or not live:
            chunk = pool.allocate(tokens)
            if chunk is not None:
                chunk.tensor.fill_(len(live))
                live.append(chunk)
            else:
                assert pool.largest_free < pool.aligned(LAYOUT.nbytes(tokens))
        else:
            live.pop(pick % len(live)).release()
        pool.check()
    spans = sorted((c.handle, c.handle + pool.aligned(c.nbytes)) for c in live)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    for chunk in live:
        chunk.release()
    pool.check()
    assert pool.used_bytes == 0
    assert pool.largest_free == pool.capacity
