"""The tier conformance suite: behaviour every tier plugin must show.

Subclass :class:`TierConformance` in a plugin's tests and provide a ``tier_entry``
fixture (the tier's ``tiers:`` entry). Every test runs under asyncio and trio. A subclass
may override a standard test only to mark it ``pytest.mark.xfail(reason=...)``, which
states in the open what the tier cannot do; overriding one silently is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import anyio
import pytest
import torch

from lmplug.core.cache import Cache, open_cache
from lmplug.core.memory import empty_kv
from lmplug.core.pipeline import TierSlot
from lmplug.core.tier import Capability, TierStatistics
from lmplug.testing.kv import make_config, reference_kv


def _tokens(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(0, 32_000, (length,), generator=generator)]


class TierConformance:
    """Standard tests for one tier type; see the module docstring."""

    chunk_size: ClassVar[int] = 16
    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]

    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(self, request: pytest.FixtureRequest) -> str:
        """Every conformance test runs on both event loops, in any plugin's test suite."""
        return str(request.param)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in vars(cls).items():
            if name.startswith("test_") and name in vars(TierConformance):
                marks = getattr(value, "pytestmark", [])
                if not any(mark.name == "xfail" and mark.kwargs.get("reason") for mark in marks):
                    raise TypeError(
                        f"{cls.__qualname__}.{name} overrides a conformance test; mark it "
                        "@pytest.mark.xfail(reason=...) to declare what the tier cannot do"
                    )

    @pytest.fixture
    def tier_entry(self) -> Mapping[str, Any]:
        raise NotImplementedError("a TierConformance subclass must define a tier_entry fixture")

    @pytest.fixture
    def conformance_config(self, tier_entry: Mapping[str, Any]) -> dict[str, Any]:
        return make_config([dict(tier_entry)], chunk_size=self.chunk_size, save_partial_chunks=True)

    @staticmethod
    def _slot(cache: Cache) -> TierSlot:
        return cache.pipeline.slots[0]

    async def _settle(self, cache: Cache) -> None:
        await self._slot(cache).tier.drain()

    async def _store(self, cache: Cache, config: Mapping[str, Any], tokens: list[int]) -> None:
        await cache.store(tokens, reference_kv(tokens, config))
        await self._settle(cache)

    async def test_empty_tier_misses(self, conformance_config: dict[str, Any]) -> None:
        async with open_cache(conformance_config) as cache:
            tokens = _tokens(1, 100)
            assert await cache.lookup(tokens) == 0
            kv, count = await cache.retrieve(tokens)
            assert count == 0
            assert kv.shape[2] == 0
            assert await self._slot(cache).contains(cache.keys(tokens)) == 0

    async def test_round_trip_is_byte_identical(self, conformance_config: dict[str, Any]) -> None:
        async with open_cache(conformance_config) as cache:
            tokens = _tokens(2, 5 * self.chunk_size + 3)
            await self._store(cache, conformance_config, tokens)
            assert await cache.lookup(tokens) == len(tokens)
            kv, count = await cache.retrieve(tokens)
            assert count == len(tokens)
            assert torch.equal(kv, reference_kv(tokens, conformance_config))

    async def test_retrieve_into_a_view_of_a_larger_buffer(self, conformance_config: dict[str, Any]) -> None:
        """``out`` may be a token-strided view; the tier writes the KV into it and nothing outside it."""
        async with open_cache(conformance_config) as cache:
            tokens = _tokens(13, 3 * self.chunk_size + 5)
            await self._store(cache, conformance_config, tokens)
            kv = reference_kv(tokens, conformance_config)
            shape = list(kv.shape)
            shape[2] += 7 + 11
            buffer = torch.full(shape, -7.0, dtype=kv.dtype)
            out = buffer.narrow(2, 7, len(tokens) + 2)  # room for more tokens than asked for
            got, count = await cache.retrieve(tokens, out=out)
            assert count == len(tokens)
            assert got.data_ptr() == out.data_ptr()
            assert torch.equal(got, kv)
            untouched = torch.cat([buffer[:, :, :7], buffer[:, :, 7 + len(tokens) :]], dim=2)
            assert bool((untouched == -7.0).all())

    async def test_retrieve_into_an_aligned_buffer_stops_at_the_first_miss(
        self, conformance_config: dict[str, Any]
    ) -> None:
        async with open_cache(conformance_config) as cache:
            tokens = _tokens(14, 4 * self.chunk_size)
            await self._store(cache, conformance_config, tokens)
            await cache.evict(tokens[: 3 * self.chunk_size])  # chunks 0-2 go, chunk 3 stays
            await self._store(cache, conformance_config, tokens[: 2 * self.chunk_size])
            out = empty_kv(cache.layout, len(tokens))
            got, count = await cache.retrieve(tokens, out=out)
            assert count == 2 * self.chunk_size
            assert torch.equal(got, reference_kv(tokens, conformance_config)[:, :, :count])

    async def test_prompt_shorter_than_a_chunk(self, conformance_config: dict[str, Any]) -> None:
        async with open_cache(conformance_config) as cache:
            tokens = _tokens(3, self.chunk_size // 2)
            await self._store(cache, conformance_config, tokens)
            kv, count = await cache.retrieve(tokens)
            assert count == len(tokens)
            assert torch.equal(kv, reference_kv(tokens, conformance_config))

    async def test_shared_prefix_hits_only_the_shared_chunks(self, conformance_config: dict[str, Any]) -> None:
        async with open_cache(conformance_config) as cache:
            first = _tokens(4, 4 * self.chunk_size)
            second = first[: 2 * self.chunk_size] + _tokens(5, 2 * self.chunk_size)
            await self._store(cache, conformance_config, first)
            assert await cache.lookup(second) == 2 * self.chunk_size
            kv, count = await cache.retrieve(second)
            assert count == 2 * self.chunk_size
            assert torch.equal(kv, reference_kv(second, conformance_config)[:, :, :count])

    async def test_same_tokens_after_another_prefix_miss(self, conformance_config: dict[str, Any]) -> None:
        async with open_cache(conformance_config) as cache:
            chunk = _tokens(6, self.chunk_size)
            first = _tokens(7, self.chunk_size) + chunk
            second = _tokens(8, self.chunk_size) + chunk
            await self._store(cache, conformance_config, first)
            assert await cache.lookup(second) == 0
            _, count = await cache.retrieve(second)
            assert count == 0

    async def test_evict_drops_keys(self, conformance_config: dict[str, Any]) -> None:
        async with open_cache(conformance_config) as cache:
            tokens = _tokens(9, 3 * self.chunk_size)
            await self._store(cache, conformance_config, tokens)
            dropped = await cache.evict(tokens)
            assert dropped[self._slot(cache).name] == 3
            assert await cache.lookup(tokens) == 0

    async def test_transfer_admits_chunks(self, conformance_config: dict[str, Any]) -> None:
        async with open_cache(conformance_config) as cache:
            tokens = _tokens(10, 2 * self.chunk_size)
            kv = reference_kv(tokens, conformance_config)
            keys = cache.keys(tokens)
            chunks = []
            for index in range(len(keys)):
                chunk = cache.allocator.allocate(self.chunk_size)
                assert chunk is not None
                chunk.tensor.copy_(kv[:, :, index * self.chunk_size : (index + 1) * self.chunk_size])
                chunks.append(chunk)
            try:
                admitted = await self._slot(cache).transfer(keys, chunks, "elsewhere")
            finally:
                for chunk in chunks:
                    chunk.release()
            await self._settle(cache)
            assert admitted == len(keys)  # an empty tier has room for two chunks
            assert await cache.lookup(tokens) == len(tokens)
            retrieved, count = await cache.retrieve(tokens)
            assert count == len(tokens)
            assert torch.equal(retrieved, kv)

    async def test_statistics_describe_the_tier(self, conformance_config: dict[str, Any]) -> None:
        async with open_cache(conformance_config) as cache:
            tokens = _tokens(11, 2 * self.chunk_size)
            await self._store(cache, conformance_config, tokens)
            stats = self._slot(cache).tier.statistics()
            assert isinstance(stats, TierStatistics)
            assert stats.name == self._slot(cache).name
            assert stats.chunks >= 2
            assert stats.used_bytes >= 0
            assert stats.capacity_bytes is None or stats.capacity_bytes >= stats.used_bytes

    async def test_concurrent_stores_and_retrieves(self, conformance_config: dict[str, Any]) -> None:
        """Stores and retrieves racing each other serve no wrong KV, and every store lands."""
        async with open_cache(conformance_config) as cache:
            prompts = [_tokens(100 + i % 4, (2 + i % 3) * self.chunk_size) for i in range(16)]
            failures: list[str] = []

            async def worker(tokens: list[int]) -> None:
                await cache.store(tokens, reference_kv(tokens, conformance_config))
                kv, count = await cache.retrieve(tokens)
                if not torch.equal(kv, reference_kv(tokens, conformance_config)[:, :, :count]):
                    failures.append(f"wrong KV for a prompt of {len(tokens)} tokens")

            async with anyio.create_task_group() as group:
                for tokens in prompts:
                    group.start_soon(worker, tokens)
            assert failures == []
            await self._settle(cache)
            for tokens in prompts:
                assert await cache.lookup(tokens) == len(tokens)
                kv, count = await cache.retrieve(tokens)
                assert count == len(tokens)
                assert torch.equal(kv, reference_kv(tokens, conformance_config))

    async def test_concurrent_retrieves_hit(self, conformance_config: dict[str, Any]) -> None:
        """Many retrieves at once of stored prompts each get the whole prompt, byte for byte."""
        async with open_cache(conformance_config) as cache:
            stored = [_tokens(200 + seed, 4 * self.chunk_size) for seed in range(4)]
            for tokens in stored:
                await self._store(cache, conformance_config, tokens)
            prompts = [stored[i % 4][: (2 + i % 3) * self.chunk_size] for i in range(16)]
            failures: list[str] = []

            async def worker(tokens: list[int]) -> None:
                found = await cache.lookup(tokens)
                kv, count = await cache.retrieve(tokens)
                if (found, count) != (len(tokens), len(tokens)):
                    failures.append(f"found {found} and served {count} of {len(tokens)} stored tokens")
                elif not torch.equal(kv, reference_kv(tokens, conformance_config)):
                    failures.append(f"wrong KV for a prompt of {len(tokens)} tokens")

            async with anyio.create_task_group() as group:
                for tokens in prompts:
                    group.start_soon(worker, tokens)
            assert failures == []

    async def test_memory_is_returned(self, conformance_config: dict[str, Any]) -> None:
        cache = open_cache(conformance_config)
        async with cache:
            tokens = _tokens(12, 3 * self.chunk_size + 1)
            await self._store(cache, conformance_config, tokens)
            await cache.retrieve(tokens)
            async with await cache.lease(tokens):
                pass
        stats = cache.allocator.statistics()
        assert (stats.used_bytes, stats.allocations) == (0, 0)

    async def test_close_is_idempotent(self, conformance_config: dict[str, Any]) -> None:
        async with open_cache(conformance_config) as cache:
            tier = self._slot(cache).tier
        await tier.aclose()
        await tier.aclose()

    async def test_declares_capabilities(self, conformance_config: dict[str, Any]) -> None:
        async with open_cache(conformance_config) as cache:
            tier = self._slot(cache).tier
            assert all(isinstance(cap, Capability) for cap in tier.capabilities)
            if Capability.PROVIDES_ALLOCATOR in tier.capabilities:
                assert tier.allocator is not None
                assert cache.allocator is tier.allocator
