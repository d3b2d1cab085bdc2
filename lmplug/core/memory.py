"""KV chunks: reference-counted views of host memory, and the allocator contract.

A chunk is born with one reference, held by whoever allocated it. Every holder (a tier's
index, an in-flight write, a retrieve in progress, a lease) takes its own reference with
:meth:`KVChunk.acquire` and gives it back with :meth:`KVChunk.release`; the memory returns
to its allocator when the last reference goes. A pin marks a chunk that a tier must not
evict (leases pin what they promise); pins never free memory by themselves.

All of this runs on the cache's event-loop thread, so counts are plain integers.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from lmplug.core.layout import KVLayout
from lmplug.errors import LmplugError


class KVChunk:
    """The KV of one chunk: ``tensor`` is ``[2, layers, tokens, hidden]`` in host memory."""

    __slots__ = ("_free", "_pins", "_refs", "handle", "nbytes", "owner", "tensor")

    def __init__(
        self,
        tensor: torch.Tensor,
        free: Callable[[KVChunk], None] | None = None,
        *,
        owner: object = None,
        handle: int = -1,
        nbytes: int | None = None,
    ) -> None:
        self.tensor = tensor
        self.nbytes = tensor.numel() * tensor.element_size() if nbytes is None else nbytes
        self.owner = owner
        """The allocator whose memory this is (tiers use it to tell their own chunks)."""
        self.handle = handle
        """Allocator-private position of the memory (an offset in a pool)."""
        self._free = free
        self._refs = 1
        self._pins = 0

    @property
    def num_tokens(self) -> int:
        return int(self.tensor.shape[2])

    @property
    def refs(self) -> int:
        return self._refs

    @property
    def pins(self) -> int:
        return self._pins

    @property
    def evictable(self) -> bool:
        """True when the only reference is its tier's own and nothing pins it."""
        return self._refs == 1 and self._pins == 0

    @property
    def freed(self) -> bool:
        return self._refs == 0

    def acquire(self) -> KVChunk:
        if self._refs <= 0:
            raise LmplugError("acquire() on a freed KV chunk")
        self._refs += 1
        return self

    def release(self) -> None:
        if self._refs <= 0:
            raise LmplugError("release() on a freed KV chunk (double release)")
        self._refs -= 1
        if self._refs == 0:
            if self._pins:
                raise LmplugError("the last reference of a pinned KV chunk was released")
            if self._free is not None:
                self._free(self)

    def pin(self) -> None:
        if self._refs <= 0:
            raise LmplugError("pin() on a freed KV chunk")
        self._pins += 1

    def unpin(self) -> None:
        if self._pins <= 0:
            raise LmplugError("unpin() on a KV chunk that is not pinned")
        self._pins -= 1

    def raw(self) -> memoryview:
        """The chunk's bytes as a writable memoryview (host memory only; no copy)."""
        return self.tensor.view(torch.uint8).reshape(-1).numpy().data.cast("B")


@dataclass(frozen=True, slots=True)
class AllocatorStatistics:
    capacity_bytes: int | None
    used_bytes: int
    allocations: int


class ChunkAllocator(Protocol):
    """Hands out host memory for chunks of one :class:`KVLayout`."""

    layout: KVLayout

    def allocate(self, num_tokens: int) -> KVChunk | None:
        """A new chunk with one reference, or ``None`` when memory cannot be found (never blocks)."""
        ...

    def statistics(self) -> AllocatorStatistics: ...


def cuda_available() -> bool:
    return torch.cuda.is_available()


IO_ALIGNMENT = 4096
"""Chunk memory starts on this boundary, so O_DIRECT and GPUDirect transfers can use it as is."""


def aligned_empty(nbytes: int, *, pin_memory: bool, alignment: int = IO_ALIGNMENT) -> torch.Tensor:
    """``nbytes`` of uninitialised host memory as ``uint8``, starting on an ``alignment`` boundary."""
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, pin_memory=pin_memory)
    start = -raw.data_ptr() % alignment
    return raw[start : start + nbytes]


_MADV_POPULATE_WRITE = 23  # Linux 5.14+: map pages as a write would, leaving their contents alone
_PREFAULT_STEP = 64 * 2**20


class Prefault:
    """The thread that maps a buffer's pages; :meth:`stop` ends it at its next step."""

    def __init__(self, memory: torch.Tensor) -> None:
        self.stopped = threading.Event()
        self.thread = threading.Thread(
            target=_populate, args=(memory, self.stopped), name="lmplug-prefault", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()


def prefault(memory: torch.Tensor) -> Prefault | None:
    """Map the pages of ``memory`` (host memory, contiguous) in a background thread, so that
    copies into it never stop on page faults (fresh memory fills at about 1 GB/s, a tenth of a
    copy). Contents are left as they are, so the memory may be in use meanwhile. Linux only
    (``madvise(MADV_POPULATE_WRITE)``); elsewhere, or on an older kernel, pages are mapped on
    first use as usual. Returns the running :class:`Prefault`, or None when there is nothing to do."""
    if not sys.platform.startswith("linux") or memory.is_cuda or memory.is_pinned() or not memory.numel():
        return None  # pinned memory is mapped when it is pinned
    return Prefault(memory)


def _populate(memory: torch.Tensor, stopped: threading.Event) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        page = 4096
        start = memory.data_ptr()
        end = start + memory.numel() * memory.element_size()
        address = -(-start // page) * page
        while address < end and not stopped.is_set():  # in steps: no kernel lock held long, and stoppable
            size = min(_PREFAULT_STEP, end - address)
            if libc.madvise(address, size, _MADV_POPULATE_WRITE) != 0:
                logging.getLogger("lmplug").debug("prefault stopped: errno %d", ctypes.get_errno())
                return
            address += size


def empty_kv(layout: KVLayout, num_tokens: int, *, pin_memory: bool = False) -> torch.Tensor:
    """An uninitialised KV tensor ``[2, layers, num_tokens, hidden]`` of ``layout`` in host memory
    aligned to :data:`IO_ALIGNMENT`: a ``Cache.retrieve(out=...)`` buffer that a disk tier can
    read into with O_DIRECT (rows of a chunk's tokens must be whole 4 KiB blocks too)."""
    memory = aligned_empty(layout.nbytes(num_tokens), pin_memory=pin_memory)
    return memory.view(layout.dtype).view(layout.shape(num_tokens))


class HeapAllocator:
    """One aligned allocation per chunk (pinned when CUDA is present), recycled when freed.

    The pipeline falls back to it when no configured tier provides a pool. Freed chunk
    memory is kept for reuse, up to ``keep_bytes``: fresh memory costs page faults (about
    1 GB/s), far more than the copy that fills it.
    """

    def __init__(self, layout: KVLayout, *, pin_memory: bool | None = None, keep_bytes: int = 256 * 2**20) -> None:
        self.layout = layout
        self._pin = cuda_available() if pin_memory is None else pin_memory
        self._keep_bytes = keep_bytes
        self._kept: dict[int, list[torch.Tensor]] = {}
        self._kept_bytes = 0
        self._used = 0
        self._allocations = 0

    def allocate(self, num_tokens: int) -> KVChunk:
        layout = self.layout
        nbytes = num_tokens * layout.bytes_per_token
        spare = self._kept.get(nbytes)
        if spare:
            memory = spare.pop()
            self._kept_bytes -= nbytes
        else:
            memory = aligned_empty(nbytes, pin_memory=self._pin)
        tensor = memory.view(layout.dtype).view(layout.shape(num_tokens))
        self._used += nbytes
        self._allocations += 1
        return KVChunk(tensor, self._free, owner=self, nbytes=nbytes)

    def _free(self, chunk: KVChunk) -> None:
        self._used -= chunk.nbytes
        self._allocations -= 1
        if self._kept_bytes + chunk.nbytes <= self._keep_bytes:
            self._kept.setdefault(chunk.nbytes, []).append(chunk.tensor.view(torch.uint8).reshape(-1))
            self._kept_bytes += chunk.nbytes

    def statistics(self) -> AllocatorStatistics:
        return AllocatorStatistics(None, self._used, self._allocations)
