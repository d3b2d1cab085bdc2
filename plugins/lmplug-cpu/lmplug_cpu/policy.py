"""Eviction orders for the host tier: LRU (default), LFU and FIFO."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Literal, Protocol

from lmplug.tierkit import ChunkKey

PolicyName = Literal["lru", "lfu", "fifo"]


class EvictionPolicy(Protocol):
    """Tracks resident keys and yields them in the order they should be evicted."""

    def inserted(self, key: ChunkKey) -> None: ...
    def accessed(self, key: ChunkKey) -> None: ...
    def removed(self, key: ChunkKey) -> None: ...
    def order(self) -> Iterator[ChunkKey]: ...


class FifoPolicy:
    """Evict in insertion order; hits do not matter."""

    def __init__(self) -> None:
        self._keys: OrderedDict[ChunkKey, None] = OrderedDict()

    def inserted(self, key: ChunkKey) -> None:
        self._keys[key] = None

    def accessed(self, key: ChunkKey) -> None:
        return None

    def removed(self, key: ChunkKey) -> None:
        self._keys.pop(key, None)

    def order(self) -> Iterator[ChunkKey]:
        return iter(self._keys)


class LruPolicy(FifoPolicy):
    """Evict the least recently stored or retrieved key first."""

    def accessed(self, key: ChunkKey) -> None:
        self._keys.move_to_end(key)


class LfuPolicy:
    """Evict the least frequently retrieved key first (ties: least recently used first)."""

    def __init__(self) -> None:
        self._counts: dict[ChunkKey, int] = {}
        self._buckets: dict[int, OrderedDict[ChunkKey, None]] = {}

    def inserted(self, key: ChunkKey) -> None:
        self._counts[key] = 1
        self._buckets.setdefault(1, OrderedDict())[key] = None

    def accessed(self, key: ChunkKey) -> None:
        count = self._counts[key]
        self._unbucket(key, count)
        self._counts[key] = count + 1
        self._buckets.setdefault(count + 1, OrderedDict())[key] = None

    def removed(self, key: ChunkKey) -> None:
        count = self._counts.pop(key, None)
        if count is not None:
            self._unbucket(key, count)

    def _unbucket(self, key: ChunkKey, count: int) -> None:
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]

    def order(self) -> Iterator[ChunkKey]:
        for count in sorted(self._buckets):
            yield from self._buckets[count]


_POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LruPolicy, "lfu": LfuPolicy, "fifo": FifoPolicy}


def make_policy(name: PolicyName) -> EvictionPolicy:
    return _POLICIES[name]()
