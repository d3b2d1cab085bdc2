"""The L1 host-memory tier: an index of chunks in the host pool, with eviction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from lmplug import ConfigError
from lmplug.tierkit import (
    AllocatorStatistics,
    ByteSize,
    Capability,
    ChunkKey,
    KVChunk,
    KVLayout,
    StrictModel,
    Tier,
    TierContext,
    TierStatistics,
    hookimpl,
    leading,
)
from lmplug_cpu.policy import PolicyName, make_policy
from lmplug_cpu.pool import HostPool


class CpuTierConfig(StrictModel):
    """Options of a ``type: cpu`` tier."""

    capacity: ByteSize = Field(default=2 * 1024**3, gt=0, description="Bytes of host memory for KV.")
    eviction: PolicyName = Field(default="lru", description="Which chunk goes first under pressure.")
    pin_memory: Literal["auto", "on", "off"] = Field(
        default="auto", description="Page-locked memory for async GPU copies; auto = when CUDA is present."
    )
    alignment: ByteSize = Field(default=4096, gt=0, description="Alignment of every chunk in the pool (power of two).")


class _EvictingAllocator:
    """The pipeline's allocator: the pool, making room by evicting when it is full."""

    def __init__(self, tier: CpuTier) -> None:
        self._tier = tier
        self.layout: KVLayout = tier.pool.layout

    def allocate(self, num_tokens: int) -> KVChunk | None:
        return self._tier.allocate(num_tokens)

    def statistics(self) -> AllocatorStatistics:
        return self._tier.pool.statistics()


class CpuTier(Tier):
    """L1: chunks live in the host pool; pinned and in-use chunks are never evicted."""

    capabilities = frozenset({Capability.PROVIDES_ALLOCATOR, Capability.LISTS_KEYS})

    def __init__(self, context: TierContext, options: CpuTierConfig) -> None:
        super().__init__(context)
        layout = context.layout
        pin = {"auto": None, "on": True, "off": False}[options.pin_memory]
        try:
            self.pool = HostPool(layout, options.capacity, alignment=options.alignment, pin_memory=pin)
        except ValueError as exc:
            raise ConfigError(f"tier {context.name!r}: {exc}") from None
        chunk_size = context.config.chunk_size
        if not self.pool.fits(chunk_size):
            raise ConfigError(
                f"tier {context.name!r}: capacity {options.capacity} bytes cannot hold one chunk of "
                f"{chunk_size} tokens ({layout.nbytes(chunk_size)} bytes for {layout.describe()}); "
                "raise capacity or lower chunk_size"
            )
        self.options = options
        self._index: dict[ChunkKey, KVChunk] = {}
        self._policy = make_policy(options.eviction)
        self._allocator = _EvictingAllocator(self)
        self._hits = self._misses = self._stored = self._evictions = 0

    @property
    def allocator(self) -> _EvictingAllocator:
        return self._allocator

    def allocate(self, num_tokens: int) -> KVChunk | None:
        """A chunk from the pool, evicting unpinned, unused chunks until one fits; ``None`` if none can."""
        pool = self.pool
        chunk = pool.allocate(num_tokens)
        if chunk is not None or not pool.fits(num_tokens):
            return chunk
        evicted: list[ChunkKey] = []
        while chunk is None:
            victim = self._victim()
            if victim is None:
                break
            self._drop(victim)
            evicted.append(victim)
            chunk = pool.allocate(num_tokens)
        if evicted:
            self._evictions += len(evicted)
            self.context.report_evicted(evicted)
        return chunk

    def _victim(self) -> ChunkKey | None:
        index = self._index
        for key in self._policy.order():
            if index[key].evictable:
                return key
        return None

    def _drop(self, key: ChunkKey) -> None:
        chunk = self._index.pop(key)
        self._policy.removed(key)
        chunk.release()

    @hookimpl
    async def lmplug_contains(self, keys: Sequence[ChunkKey]) -> int:
        found = leading(keys, self._index.__contains__)
        # Asked about means about to be used: a retrieve follows a lookup, and a store that
        # extends these chunks must not evict them to make room for the rest.
        accessed = self._policy.accessed
        for key in keys[:found]:
            accessed(key)
        return found

    @hookimpl
    async def lmplug_retrieve(self, keys: Sequence[ChunkKey]) -> list[KVChunk]:
        index = self._index
        accessed = self._policy.accessed
        chunks: list[KVChunk] = []
        for key in keys:
            chunk = index.get(key)
            if chunk is None:
                self._misses += 1
                break
            accessed(key)
            chunks.append(chunk.acquire())
        self._hits += len(chunks)
        return chunks

    @hookimpl
    async def lmplug_store(self, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk]) -> None:
        index = self._index
        policy = self._policy
        pool = self.pool
        admitted: list[ChunkKey] = []
        for key, chunk in zip(keys, chunks, strict=True):
            if key in index:
                continue
            if chunk.owner is not pool:
                # Memory from another allocator (a second pool, the heap): keep a copy in ours.
                own = self.allocate(chunk.num_tokens)
                if own is None:
                    break
                own.tensor.copy_(chunk.tensor)
                index[key] = own
            else:
                index[key] = chunk.acquire()
            policy.inserted(key)
            admitted.append(key)
        self._stored += len(admitted)
        self.context.report_admitted(admitted)

    @hookimpl
    async def lmplug_held_keys(self) -> list[ChunkKey]:
        return list(self._index)

    @hookimpl
    async def lmplug_evict(self, keys: Sequence[ChunkKey]) -> int:
        index = self._index
        dropped = [key for key in keys if key in index and index[key].evictable]
        for key in dropped:
            self._drop(key)
        self._evictions += len(dropped)
        self.context.report_evicted(dropped)
        return len(dropped)

    def statistics(self) -> TierStatistics:
        return TierStatistics(
            name=self.name,
            type=self.context.type,
            chunks=len(self._index),
            used_bytes=self.pool.used_bytes,
            capacity_bytes=self.pool.capacity,
            hits=self._hits,
            misses=self._misses,
            stored=self._stored,
            evictions=self._evictions,
            pinned=sum(1 for chunk in self._index.values() if chunk.pins),
        )

    async def aclose(self) -> None:
        if self.pool.prefaulting is not None:
            self.pool.prefaulting.stop()  # the pool is done with: no need to map the rest
        index, self._index = self._index, {}
        for key, chunk in index.items():
            self._policy.removed(key)
            chunk.release()
