"""What ``lmplug-server`` keeps: a memory store with a byte capacity and LRU eviction, and
an optional disk store beneath it that evicted values spill into.

The memory store never holds more than its capacity: a writer first *reserves* the bytes
of a value (evicting least recently used entries, spilling them to disk when there is a
disk store, and waiting while other writers' reservations fill the rest), then receives
the value into its own buffer and *commits* it, which replaces any older value at once:
readers see the old value or the new one, never part of one. A value larger than the whole
capacity is refused. Stored buffers are never written again while anyone else refers to
them, so a reader may send a view of one while it is replaced or evicted.

Receiving a large value into a new buffer costs a page fault per 4 KiB (the kernel zeroes
every page on first touch), which halves what a PUT can move. So the buffer of a value that
is dropped, replaced or evicted, once nothing else refers to it, goes to a free list by
size, and the next value of that size is received into it. Free buffers count against the
capacity: values in memory, reservations and free buffers together never exceed it (free
buffers are dropped first when room is needed).

The disk store is one file per key (a header naming the key, then the value), written to a
temporary name and renamed into place, bounded by its own capacity (LRU, files deleted).
It is a spill area owned by this server process: its files are removed at start and at
close. File I/O runs in worker threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

__all__ = ["DiskStore", "Entry", "KVStore", "StoreCounters"]

_FILE = struct.Struct("<8sHQd")
"""A spill file's header: magic, key length, value length, expiry (0.0: none); the key and value follow."""
_FILE_MAGIC = b"LMKVSPL1"
_SUFFIX = ".lmkv"
_POOL_MIN = 64 << 10
"""Smallest buffer worth keeping on the free list (smaller ones are cheap to allocate)."""


@dataclass(slots=True)
class Entry:
    """A stored value and when it expires (``time.monotonic()`` seconds; ``None``: never)."""

    value: bytearray | bytes
    expires: float | None

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires


@dataclass(slots=True)
class StoreCounters:
    """Running totals the server exports as metrics."""

    hits: int = 0
    misses: int = 0
    disk_hits: int = 0
    evictions: int = 0
    spilled: int = 0
    disk_evictions: int = 0
    expired: int = 0
    refused: int = 0
    disk_errors: int = 0
    reused: int = 0
    """Values received into a freed buffer instead of a new one."""


class DiskStore:
    """One file per key under ``root``, LRU-bounded by ``capacity`` bytes (file sizes).

    The index lives on the event loop's thread; only the file reads and writes run in worker
    threads (``limiter``), so index updates never race.
    """

    def __init__(self, root: Path, capacity: int, threads: int = 4) -> None:
        self.root = root
        self.capacity = capacity
        self.used = 0
        self._index: OrderedDict[bytes, tuple[Path, int, float | None]] = OrderedDict()
        self._limiter = anyio.CapacityLimiter(threads)
        self._serial = 0
        root.mkdir(parents=True, exist_ok=True)
        self._clear()

    def _clear(self) -> None:
        for path in self.root.glob(f"*{_SUFFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def _path(self, key: bytes) -> Path:
        return self.root / (hashlib.blake2b(key, digest_size=16).hexdigest() + _SUFFIX)

    async def write(self, key: bytes, entry: Entry) -> bool:
        """Spill ``entry``; False when it cannot be kept (larger than the capacity, or an I/O error)."""
        size = _FILE.size + len(key) + len(entry.value)
        if size > self.capacity:
            return False
        path = self._path(key)
        self._serial += 1
        temporary = path.with_name(f"{path.name}.{self._serial}.tmp")
        expires = 0.0 if entry.expires is None else time.time() + (entry.expires - time.monotonic())
        header = _FILE.pack(_FILE_MAGIC, len(key), len(entry.value), expires) + key
        await anyio.to_thread.run_sync(_write_file, temporary, path, header, entry.value, limiter=self._limiter)
        self.remove(key, unlink=False)  # the rename replaced any older file of this key
        self._index[key] = (path, size, entry.expires)
        self.used += size
        await self.unlink(self.evict_to_fit())  # concurrent spills may have overshot together
        return key in self._index

    def evict_to_fit(self, room: int = 0) -> list[Path]:
        """Drop least recently used files until ``room`` more bytes fit; the paths to unlink."""
        dropped: list[Path] = []
        while self._index and self.used + room > self.capacity:
            _, (path, size, _) = self._index.popitem(last=False)
            self.used -= size
            dropped.append(path)
        return dropped

    async def unlink(self, paths: Sequence[Path]) -> None:
        if paths:
            await anyio.to_thread.run_sync(_unlink_all, list(paths), limiter=self._limiter)

    def remove(self, key: bytes, *, unlink: bool = True) -> Path | None:
        """Forget ``key``; its path (to unlink) when it was held and ``unlink`` is set."""
        held = self._index.pop(key, None)
        if held is None:
            return None
        path, size, _ = held
        self.used -= size
        return path if unlink else None

    def present(self, key: bytes, now: float) -> bool:
        held = self._index.get(key)
        return held is not None and (held[2] is None or now < held[2])

    async def read(self, key: bytes, now: float) -> Entry | None:
        """The value of ``key`` read back from its file; ``None`` when absent, expired or unreadable."""
        held = self._index.get(key)
        if held is None:
            return None
        path, _, expires = held
        if expires is not None and now >= expires:
            await self.unlink([p for p in [self.remove(key)] if p is not None])
            return None
        self._index.move_to_end(key)
        value = await anyio.to_thread.run_sync(_read_file, path, key, limiter=self._limiter)
        if value is None:
            if self._index.get(key) is held:
                self.remove(key, unlink=False)
            return None
        return Entry(value, expires)

    def close(self) -> None:
        self._index.clear()
        self.used = 0
        self._clear()


def _write_file(temporary: Path, path: Path, header: bytes, value: bytearray | bytes) -> None:
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(value)
        os.write(fd, header)
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
    finally:
        os.close(fd)
    os.replace(temporary, path)


def _read_file(path: Path, key: bytes) -> bytearray | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        head = os.read(fd, _FILE.size + len(key))
        if len(head) != _FILE.size + len(key):
            return None
        magic, key_length, value_length, _ = _FILE.unpack_from(head)
        if magic != _FILE_MAGIC or key_length != len(key) or head[_FILE.size :] != key:
            return None
        if os.fstat(fd).st_size != len(head) + value_length:
            return None
        value = bytearray(value_length)
        view = memoryview(value)
        offset = 0
        while offset < value_length:
            got = os.readv(fd, [view[offset:]])
            if not got:
                return None
            offset += got
        return value
    finally:
        os.close(fd)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@dataclass(slots=True)
class _Spill:
    entry: Entry
    cancelled: bool = False


@dataclass(slots=True)
class KVStore:
    """The memory store (capacity, LRU) and the optional disk store beneath it."""

    capacity: int
    disk: DiskStore | None = None
    clock: Callable[[], float] = time.monotonic
    counters: StoreCounters = field(default_factory=StoreCounters)
    used: int = 0
    """Bytes of committed values in memory, including values being spilled."""
    reserved: int = 0
    """Bytes reserved by writers receiving values."""
    free: int = 0
    """Bytes of freed buffers kept for values of the same size."""
    _entries: OrderedDict[bytes, Entry] = field(default_factory=OrderedDict)
    _free: dict[int, list[bytearray]] = field(default_factory=dict)
    _spilling: dict[bytes, _Spill] = field(default_factory=dict)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def disk_items(self) -> int:
        return 0 if self.disk is None else len(self.disk)

    def _signal(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # ------------------------------------------------------------------ writes

    async def reserve(self, size: int) -> bool:
        """Make room for a value of ``size`` bytes and hold it; False when it can never fit."""
        if size > self.capacity:
            self.counters.refused += 1
            return False
        while self.used + self.reserved + size > self.capacity:
            if self._entries:
                await self._evict_one()
            else:
                await self._changed.wait()  # the rest is reserved or being spilled: wait for it
        self.reserved += size
        self._trim_free(size)
        return True

    def buffer(self, size: int) -> bytearray:
        """A buffer to receive a reserved value of ``size`` bytes into: a freed one when there is one."""
        pool = self._free.get(size)
        if not pool:
            return bytearray(size)
        buffer = pool.pop()
        if not pool:
            del self._free[size]
        self.free -= size
        self.counters.reused += 1
        return buffer

    def release(self, size: int, buffer: bytearray | None = None) -> None:
        """Give back a reservation that was not committed (the value never arrived) and its buffer."""
        self.reserved -= size
        if buffer is not None:
            self._keep_free(buffer)
        self._signal()

    def _recycle(self, entry: Entry) -> None:
        """Keep the buffer of a value that left memory for a later value of its size."""
        value, entry.value = entry.value, b""
        # Readers (a GET sending it, a spill writing it) hold references; the buffer is only
        # rewritten when this function's own two (``value`` and the argument) are all there are.
        if isinstance(value, bytearray) and sys.getrefcount(value) <= 2:
            self._keep_free(value)

    def _keep_free(self, buffer: bytearray) -> None:
        size = len(buffer)
        if size >= _POOL_MIN and self.used + self.reserved + self.free + size <= self.capacity:
            self._free.setdefault(size, []).append(buffer)
            self.free += size

    def _trim_free(self, keep: int) -> None:
        """Drop free buffers until they fit beside the values and reservations (one of ``keep`` bytes
        is about to become a reservation's buffer, so it does not count)."""
        spare = keep if keep in self._free else 0
        for size in sorted(self._free, key=lambda size: size == keep):
            pool = self._free[size]
            while pool and self.used + self.reserved + self.free - spare > self.capacity:
                if size == keep and len(pool) == 1:
                    break
                pool.pop()
                self.free -= size
            if not pool:
                del self._free[size]

    async def _evict_one(self) -> None:
        key, entry = self._entries.popitem(last=False)
        self.counters.evictions += 1
        size = len(entry.value)
        if self.disk is None or entry.expired(self.clock()):
            self.used -= size
            self._recycle(entry)
            self._signal()
            return
        spill = _Spill(entry)
        self._spilling[key] = spill
        kept = False
        try:
            await self.disk.unlink(self.disk.evict_to_fit(_FILE.size + len(key) + size))
            kept = await self.disk.write(key, entry)
        except OSError:
            self.counters.disk_errors += 1
        finally:
            if self._spilling.get(key) is spill:
                del self._spilling[key]
            self.used -= size
            self._recycle(entry)
            self._signal()
        if kept:
            self.counters.spilled += 1
            if spill.cancelled:  # replaced or deleted while it was being written
                await self.disk.unlink([p for p in [self.disk.remove(key)] if p is not None])

    async def commit(self, key: bytes, value: bytearray | bytes, ttl: float | None, reserved: int) -> None:
        """Store ``value`` (received into a reservation of ``reserved`` bytes) under ``key``."""
        self.reserved -= reserved
        self.used += len(value)
        old = self._entries.pop(key, None)
        if old is not None:
            self.used -= len(old.value)
            self._recycle(old)
        self._entries[key] = Entry(value, None if ttl is None else self.clock() + ttl)
        await self._forget_below(key)
        self._signal()

    async def _forget_below(self, key: bytes) -> None:
        spill = self._spilling.get(key)
        if spill is not None:
            spill.cancelled = True
            del self._spilling[key]
        if self.disk is not None:
            path = self.disk.remove(key)
            if path is not None:
                await self.disk.unlink([path])

    # ------------------------------------------------------------------ reads

    async def get(self, key: bytes) -> bytearray | bytes | None:
        """The value of ``key`` (never written again: safe to send a view of), or ``None``."""
        now = self.clock()
        entry = self._entries.get(key)
        if entry is not None:
            if entry.expired(now):
                self._drop(key)
                self.counters.expired += 1
            else:
                self._entries.move_to_end(key)
                self.counters.hits += 1
                return entry.value
        spill = self._spilling.get(key)
        if spill is not None and not spill.entry.expired(now):
            self.counters.hits += 1
            return spill.entry.value
        if self.disk is not None:
            try:
                found = await self.disk.read(key, now)
            except OSError:
                self.counters.disk_errors += 1
                found = None
            if found is not None:
                self.counters.hits += 1
                self.counters.disk_hits += 1
                return found.value
        self.counters.misses += 1
        return None

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        now = self.clock()
        return [self._present(key, now) for key in keys]

    def _present(self, key: bytes, now: float) -> bool:
        entry = self._entries.get(key)
        if entry is not None:
            return not entry.expired(now)
        spill = self._spilling.get(key)
        if spill is not None:
            return not spill.entry.expired(now)
        return self.disk is not None and self.disk.present(key, now)

    def _drop(self, key: bytes) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.used -= len(entry.value)
        self._recycle(entry)
        self._signal()
        return True

    async def delete(self, keys: Sequence[bytes]) -> list[bool]:
        """Remove each key from memory and disk; whether each held a live value."""
        now = self.clock()
        removed: list[bool] = []
        for key in keys:
            present = self._present(key, now)
            self._drop(key)
            await self._forget_below(key)
            removed.append(present)
        return removed

    def close(self) -> None:
        self._entries.clear()
        self._spilling.clear()
        self._free.clear()
        self.used = self.free = 0
        if self.disk is not None:
            self.disk.close()
