from __future__ import annotations

import pytest
import torch

from lmplug import LmplugError
from lmplug.core.memory import HeapAllocator
from lmplug.tierkit import KVChunk, KVLayout


def test_reference_counting_frees_on_the_last_release() -> None:
    freed: list[KVChunk] = []
    chunk = KVChunk(torch.zeros(2, 1, 4, 2), freed.append)
    assert (chunk.refs, chunk.evictable) == (1, True)
    chunk.acquire()
    assert not chunk.evictable
    chunk.release()
    assert freed == []
    chunk.release()
    assert freed == [chunk]
    assert chunk.freed


def test_double_release_is_an_error() -> None:
    chunk = KVChunk(torch.zeros(1))
    chunk.release()
    with pytest.raises(LmplugError, match="double release"):
        chunk.release()
    with pytest.raises(LmplugError, match="freed"):
        chunk.acquire()


def test_pins_block_eviction_but_not_reads() -> None:
    chunk = KVChunk(torch.zeros(2, 1, 4, 2))
    chunk.pin()
    assert not chunk.evictable
    chunk.unpin()
    assert chunk.evictable
    with pytest.raises(LmplugError, match="not pinned"):
        chunk.unpin()


def test_raw_is_a_writable_view_of_the_same_bytes() -> None:
    chunk = KVChunk(torch.zeros(2, 1, 2, 2, dtype=torch.bfloat16))
    view = chunk.raw()
    assert view.nbytes == chunk.nbytes == 16
    view[:2] = b"\x80\x3f"  # bfloat16 1.0, little-endian
    assert chunk.tensor.reshape(-1)[0].item() == 1.0


def test_heap_allocator_accounts_for_its_chunks() -> None:
    allocator = HeapAllocator(KVLayout(2, 1, 4, torch.float16), pin_memory=False)
    chunk = allocator.allocate(3)
    assert tuple(chunk.tensor.shape) == (2, 2, 3, 4)
    assert chunk.owner is allocator
    assert allocator.statistics().used_bytes == chunk.nbytes == 2 * 2 * 3 * 4 * 2
    chunk.release()
    assert allocator.statistics().used_bytes == 0
