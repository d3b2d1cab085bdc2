from __future__ import annotations

import itertools
import sys

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


def _resident_pages(memory: torch.Tensor) -> int:
    """How many of ``memory``'s pages are mapped (``/proc/self/pagemap``, bit 63 of each entry)."""
    page = 4096
    first, last = memory.data_ptr() // page, (memory.data_ptr() + memory.numel() - 1) // page
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = pagemap.read((last - first + 1) * 8)
    return sum(entries[i + 7] >> 7 for i in range(0, len(entries), 8))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prefaulting is Linux-only (madvise)")
def test_the_pool_is_mapped_in_the_background_without_touching_what_is_stored() -> None:
    """Fresh memory fills at page-fault speed: the pool maps its pages up front, in a thread,
    while stores may already be writing into it (contents are never changed)."""
    pool = HostPool(LAYOUT, 64 * 2**20, pin_memory=False)
    chunk = pool.allocate(16)
    assert chunk is not None
    chunk.tensor.fill_(3.5)  # a store racing the prefault
    assert pool.prefaulting is not None
    pool.prefaulting.thread.join(timeout=30)
    assert not pool.prefaulting.thread.is_alive()
    assert bool((chunk.tensor == 3.5).all())
    pages = pool.buffer.numel() // 4096
    assert _resident_pages(pool.buffer) >= pages - 1  # every page mapped (the first may be partial)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prefaulting is Linux-only (madvise)")
def test_stopping_the_prefault_ends_its_thread() -> None:
    """A cache closed right after it opened does not go on mapping the rest of its pool."""
    pool = HostPool(LAYOUT, 512 * 2**20, pin_memory=False)
    assert pool.prefaulting is not None
    pool.prefaulting.stop()
    pool.prefaulting.thread.join(timeout=10)
    assert not pool.prefaulting.thread.is_alive()
