from __future__ import annotations

from typing import Any

import pytest
import torch

import lmplug
from lmplug.testing import make_config, reference_kv

CHUNK = 16
CHUNK_BYTES = 4096  # 16 tokens x 128 bytes, 4 KiB-aligned


def prompt(seed: int, chunks: int) -> list[int]:
    return [(seed * 997 + i * 31) % 20_000 for i in range(chunks * CHUNK)]


def config(capacity_chunks: int, **tier: Any) -> dict[str, Any]:
    return make_config([{"type": "cpu", "capacity": capacity_chunks * CHUNK_BYTES, **tier}], chunk_size=CHUNK)


async def test_in_use_chunks_are_never_evicted() -> None:
    cfg = config(2)
    async with lmplug.open_cache(cfg) as cache:
        a = prompt(1, 2)
        await cache.store(a, reference_kv(a, cfg))
        tier = cache.pipeline.slots[0]
        held = await tier.retrieve(cache.keys(a))  # a reader holds references
        assert cache.allocator.allocate(CHUNK) is None  # nothing evictable: a clean None
        assert await cache.lookup(a) == 2 * CHUNK
        for chunk in held:
            chunk.release()
        fresh = cache.allocator.allocate(CHUNK)
        assert fresh is not None
        fresh.release()


async def test_a_chunk_larger_than_the_pool_evicts_nothing() -> None:
    cfg = config(2)
    async with lmplug.open_cache(cfg) as cache:
        a = prompt(2, 2)
        await cache.store(a, reference_kv(a, cfg))
        assert cache.allocator.allocate(5 * CHUNK) is None  # 10 KiB > the 8 KiB pool
        assert await cache.lookup(a) == 2 * CHUNK


async def test_a_store_keeps_the_cached_prefix_it_extends() -> None:
    """Room for the new chunks comes from other chunks, not from the prefix the store builds on."""
    cfg = config(4)
    async with lmplug.open_cache(cfg) as cache:
        a, b = prompt(6, 2), prompt(7, 2)
        await cache.store(a, reference_kv(a, cfg))
        await cache.store(b, reference_kv(b, cfg))  # full; a's chunks are the oldest
        longer = a + prompt(8, 2)
        assert await cache.store(longer, reference_kv(longer, cfg)) == 4 * CHUNK
        assert await cache.lookup(longer) == 4 * CHUNK
        assert await cache.lookup(b) == 0


async def test_a_store_larger_than_the_pool_reports_what_stays_cached() -> None:
    """When the only room is the prefix itself, the store says its tokens are no longer cached."""
    cfg = config(2)
    async with lmplug.open_cache(cfg) as cache:
        a = prompt(9, 2)
        await cache.store(a, reference_kv(a, cfg))
        longer = a + prompt(10, 2)
        stored = await cache.store(longer, reference_kv(longer, cfg))
        assert stored == await cache.lookup(longer) == 0


@pytest.mark.parametrize(("eviction", "survivor"), [("lru", "a"), ("lfu", "a"), ("fifo", "b")])
async def test_eviction_policy_is_selectable(eviction: str, survivor: str) -> None:
    cfg = config(2, eviction=eviction)
    async with lmplug.open_cache(cfg) as cache:
        prompts = {"a": prompt(3, 1), "b": prompt(4, 1), "c": prompt(5, 1)}
        await cache.store(prompts["a"], reference_kv(prompts["a"], cfg))
        await cache.store(prompts["b"], reference_kv(prompts["b"], cfg))
        await cache.retrieve(prompts["a"])
        await cache.retrieve(prompts["a"])
        await cache.store(prompts["c"], reference_kv(prompts["c"], cfg))
        present = {name for name, tokens in prompts.items() if await cache.lookup(tokens)}
        assert present == {survivor, "c"}


async def test_statistics_and_allocator_agree() -> None:
    cfg = config(8)
    async with lmplug.open_cache(cfg) as cache:
        a = prompt(6, 3)
        await cache.store(a, reference_kv(a, cfg))
        async with await cache.lease(a[:CHUNK]):
            stats = cache.statistics().tiers[0]
            assert (stats.chunks, stats.used_bytes, stats.pinned) == (3, 3 * CHUNK_BYTES, 1)
            assert stats.capacity_bytes == 8 * CHUNK_BYTES
        assert cache.allocator.statistics().used_bytes == 3 * CHUNK_BYTES


async def test_pin_memory_can_be_forced_off() -> None:
    cfg = config(2, pin_memory="off")
    async with lmplug.open_cache(cfg) as cache:
        tier = cache.pipeline.slots[0].tier
        assert tier.pool.pinned is False  # type: ignore[attr-defined]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_pool_is_pinned_and_serves_cuda_tensors() -> None:
    import torch

    cfg = config(8)
    async with lmplug.open_cache(cfg) as cache:
        assert cache.pipeline.slots[0].tier.pool.buffer.is_pinned()  # type: ignore[attr-defined]
        a = prompt(7, 3)
        kv = reference_kv(a, cfg).cuda()
        await cache.store(a, kv)
        out = torch.empty_like(kv)
        view, count = await cache.retrieve(a, out=out)
        assert count == 3 * CHUNK
        assert torch.equal(view, kv)
