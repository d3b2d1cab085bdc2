"""The host pool: one flat allocation carved into chunks (best fit, coalescing frees).

The buffer is pinned when CUDA is present so that copies to and from the GPU can run
asynchronously. Every allocation is aligned (4 KiB by default) so that the same memory
can be handed to O_DIRECT and GPUDirect reads.
"""

from __future__ import annotations

import bisect

import torch

from lmplug.tierkit import AllocatorStatistics, KVChunk, KVLayout, aligned_empty, prefault


class HostPool:
    """A chunk allocator over ``capacity`` bytes of host memory; :meth:`allocate` never blocks."""

    def __init__(
        self, layout: KVLayout, capacity: int, *, alignment: int = 4096, pin_memory: bool | None = None
    ) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, not {alignment}")
        self.layout = layout
        self.alignment = alignment
        self.capacity = capacity - capacity % alignment
        self.pinned = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.buffer = aligned_empty(self.capacity, pin_memory=self.pinned, alignment=max(alignment, 64))
        # Mapped in the background: the first stores into the pool would otherwise run at page-fault speed.
        self.prefaulting = prefault(self.buffer)
        # Chunks are carved from a typed view with as_strided: one tensor op instead of three.
        self._typed = self.buffer[: self.capacity - self.capacity % layout.itemsize].view(layout.dtype)
        self._base = self._typed.storage_offset()  # as_strided offsets count from the storage's start
        self._by_start: dict[int, int] = {}
        self._by_end: dict[int, int] = {}
        self._by_size: dict[int, dict[int, None]] = {}
        self._sizes: list[int] = []
        self._used = 0
        self._allocations = 0
        if self.capacity:
            self._add_free(0, self.capacity)

    def aligned(self, nbytes: int) -> int:
        return -(-nbytes // self.alignment) * self.alignment

    def fits(self, num_tokens: int) -> bool:
        """Whether a chunk of ``num_tokens`` tokens could fit in the empty pool."""
        return self.aligned(self.layout.nbytes(num_tokens)) <= self.capacity

    def allocate(self, num_tokens: int) -> KVChunk | None:
        layout = self.layout
        nbytes = num_tokens * layout.bytes_per_token
        size = -(-nbytes // self.alignment) * self.alignment
        start = self._take(size)
        if start is None:
            return None
        self._used += size
        self._allocations += 1
        hidden = layout.hidden_size
        plane = num_tokens * hidden
        tensor = self._typed.as_strided(
            (2, layout.num_layers, num_tokens, hidden),
            (layout.num_layers * plane, plane, hidden, 1),
            self._base + start // layout.itemsize,
        )
        return KVChunk(tensor, self._free, owner=self, handle=start, nbytes=nbytes)

    def _free(self, chunk: KVChunk) -> None:
        size = self.aligned(chunk.nbytes)
        self._used -= size
        self._allocations -= 1
        self._add_free(chunk.handle, size)

    def _take(self, size: int) -> int | None:
        bucket = self._by_size.get(size)
        if bucket is None:
            index = bisect.bisect_left(self._sizes, size)
            if index == len(self._sizes):
                return None
            bucket = self._by_size[self._sizes[index]]
        start = next(iter(bucket))
        block = self._by_start[start]
        self._remove_free(start, block)
        if block > size:
            self._add_free(start + size, block - size)
        return start

    def _add_free(self, start: int, size: int) -> None:
        before = self._by_end.get(start)
        if before is not None:
            before_size = start - before
            self._remove_free(before, before_size)
            start, size = before, size + before_size
        after = self._by_start.get(start + size)
        if after is not None:
            self._remove_free(start + size, after)
            size += after
        self._by_start[start] = size
        self._by_end[start + size] = start
        bucket = self._by_size.get(size)
        if bucket is None:
            bucket = self._by_size[size] = {}
            bisect.insort(self._sizes, size)
        bucket[start] = None

    def _remove_free(self, start: int, size: int) -> None:
        del self._by_start[start]
        del self._by_end[start + size]
        bucket = self._by_size[size]
        del bucket[start]
        if not bucket:
            del self._by_size[size]
            del self._sizes[bisect.bisect_left(self._sizes, size)]

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def largest_free(self) -> int:
        return self._sizes[-1] if self._sizes else 0

    def statistics(self) -> AllocatorStatistics:
        return AllocatorStatistics(self.capacity, self._used, self._allocations)

    def check(self) -> None:
        """Assert the pool's bookkeeping is consistent (for tests): no overlap, no leak, coalesced."""
        free = sum(self._by_start.values())
        if free + self._used != self.capacity:
            raise AssertionError(f"pool accounting: free {free} + used {self._used} != capacity {self.capacity}")
        for start, size in self._by_start.items():
            if self._by_end.get(start + size) != start or start not in self._by_size.get(size, {}):
                raise AssertionError(f"pool free-list indexes disagree about block {start}+{size}")
            if start + size in self._by_start:
                raise AssertionError(f"free blocks at {start} and {start + size} were not coalesced")
        if self._sizes != sorted(self._by_size):
            raise AssertionError("pool size index is out of order")
