"""The example tier: chunks kept by reference in an ordered dictionary, least recently used
dropped first. Small on purpose: everything a tier must do, and nothing else."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pydantic import Field, PositiveInt

from lmplug.tierkit import ChunkKey, KVChunk, StrictModel, Tier, TierContext, TierStatistics, hookimpl, leading


class ExampleTierConfig(StrictModel):
    """Options of a ``type: example`` tier."""

    max_chunks: PositiveInt = Field(default=1024, description="Chunks kept; beyond it the least recently used go.")


class ExampleTier(Tier):
    """Holds one reference to each chunk it keeps; see the module docstring."""

    def __init__(self, context: TierContext, options: ExampleTierConfig) -> None:
        super().__init__(context)
        self.options = options
        self._chunks: OrderedDict[ChunkKey, KVChunk] = OrderedDict()
        self._hits = self._misses = self._stored = self._evictions = 0

    @hookimpl
    async def lmplug_contains(self, keys: Sequence[ChunkKey]) -> int:
        return leading(keys, self._chunks.__contains__)

    @hookimpl
    async def lmplug_retrieve(self, keys: Sequence[ChunkKey]) -> list[KVChunk]:
        found: list[KVChunk] = []
        for key in keys:
            chunk = self._chunks.get(key)
            if chunk is None:
                break
            self._chunks.move_to_end(key)
            found.append(chunk.acquire())  # the caller's reference
        self._hits += len(found)
        if len(found) < len(keys):
            self._misses += 1
        return found

    @hookimpl
    async def lmplug_store(self, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk]) -> None:
        for key, chunk in zip(keys, chunks, strict=True):
            if key not in self._chunks:
                self._chunks[key] = chunk.acquire()  # the caller keeps its own reference
                self._stored += 1
        dropped: list[ChunkKey] = []
        while len(self._chunks) > self.options.max_chunks:
            key, chunk = self._chunks.popitem(last=False)
            chunk.release()
            dropped.append(key)
        self._dropped(dropped)

    @hookimpl
    async def lmplug_evict(self, keys: Sequence[ChunkKey]) -> int:
        dropped = [key for key in keys if key in self._chunks]
        for key in dropped:
            self._chunks.pop(key).release()
        self._dropped(dropped)
        return len(dropped)

    def _dropped(self, keys: list[ChunkKey]) -> None:
        if keys:
            self._evictions += len(keys)
            self.context.report_evicted(keys)  # the cache forgets them too

    def statistics(self) -> TierStatistics:
        return TierStatistics(
            name=self.name,
            type=self.context.type,
            chunks=len(self._chunks),
            used_bytes=sum(chunk.nbytes for chunk in self._chunks.values()),
            capacity_bytes=None,
            hits=self._hits,
            misses=self._misses,
            stored=self._stored,
            evictions=self._evictions,
        )

    async def aclose(self) -> None:
        chunks, self._chunks = self._chunks, OrderedDict()
        for chunk in chunks.values():
            chunk.release()
