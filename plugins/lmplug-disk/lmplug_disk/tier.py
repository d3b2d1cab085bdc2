"""The L3 local-disk tier: one file per chunk, write-behind, an index that survives restarts."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
import torch
from pydantic import Field, PositiveInt

from lmplug import ConfigError, CorruptChunk, TierUnavailable
from lmplug.tierkit import (
    Batch,
    ByteSize,
    Capability,
    ChunkHeader,
    ChunkKey,
    KVBytes,
    KVChunk,
    StrictModel,
    TierContext,
    TierStatistics,
    WriteBehindTier,
    hookimpl,
    leading,
    payload_checksum,
)
from lmplug_disk import files

logger = logging.getLogger("lmplug.disk")


class DiskTierConfig(StrictModel):
    """Options of a ``type: disk`` tier."""

    path: str = Field(min_length=1, description="Directory for chunk files (created if missing).")
    capacity: ByteSize = Field(default=16 * 1024**3, gt=0, description="Bytes of chunk files to keep.")
    io_mode: Literal["auto", "direct", "buffered"] = Field(
        default="auto", description="O_DIRECT, the page cache, or O_DIRECT where the filesystem supports it."
    )
    write_queue: PositiveInt = Field(default=256, description="Chunks waiting to be written; more are skipped.")
    writers: PositiveInt = Field(default=2, description="Files written at once.")
    readers: PositiveInt = Field(default=4, description="Files read at once.")
    fsync: Literal["never", "always"] = Field(
        default="never", description="'always' also survives power loss (a crash never leaves partial files)."
    )


@dataclass(slots=True)
class _Read:
    """One chunk file to read: where its payload goes (its views in order), and how it went."""

    key: ChunkKey
    tokens: int
    payload: list[memoryview]
    chunk: KVChunk | None
    """The chunk that owns ``payload`` (``lmplug_retrieve``); ``None`` when it is a caller's buffer."""
    header: bytes = b""
    failure: Exception | None = None
    verified: bool = False

    @property
    def nbytes(self) -> int:
        return sum(view.nbytes for view in self.payload)


class DiskTier(WriteBehindTier):
    """Chunk files under ``<path>/lmplug-<fingerprint>/``, owned by one process at a time."""

    capabilities = frozenset(
        {Capability.PERSISTENT, Capability.WRITE_BEHIND, Capability.RETRIEVE_INTO, Capability.LISTS_KEYS}
    )

    def __init__(self, context: TierContext, options: DiskTierConfig) -> None:
        super().__init__(context, logger=logger, queue_size=options.write_queue, writers=options.writers)
        self.options = options
        self.root = Path(options.path) / f"lmplug-{context.fingerprint.hex()}"
        largest = files.file_size(context.layout.nbytes(context.config.chunk_size))
        if largest > options.capacity:
            raise ConfigError(
                f"tier {context.name!r}: capacity {options.capacity} bytes cannot hold "
                f"one chunk file of {largest} bytes; raise capacity"
            )
        self.direct = False
        self._index: OrderedDict[ChunkKey, int] = OrderedDict()  # key -> tokens, least recently used first
        self._used = 0
        self._read_limiter = anyio.CapacityLimiter(options.readers)
        self._write_limiter = anyio.CapacityLimiter(options.writers)
        self._reads_in_flight = 0
        self._reads_done = anyio.Event()
        self._lock_fd = -1
        self.scan_seconds = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def _open(self) -> None:
        await anyio.to_thread.run_sync(self._open_directory)
        try:
            await anyio.to_thread.run_sync(files.remove_files, self._evict_to(self.options.capacity))
        except BaseException:
            self._unlock()
            raise

    async def _release(self) -> None:
        self._unlock()

    async def __aenter__(self) -> DiskTier:
        await super().__aenter__()
        logger.info(
            "disk tier %r: %s, %d chunks (%d bytes) indexed in %.3f s, %s I/O",
            self.name, self.root, len(self._index), self._used, self.scan_seconds,
            "O_DIRECT" if self.direct else "buffered",
        )  # fmt: skip
        return self

    def _size(self, tokens: int) -> int:
        return files.file_size(tokens * self.context.layout.bytes_per_token)

    def _open_directory(self) -> None:
        """Create and lock the directory, pick the I/O mode, and index what a past run left."""
        started = time.perf_counter()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise TierUnavailable(f"tier {self.name!r}: cannot use {self.root}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(lock_fd)
            raise TierUnavailable(
                f"tier {self.name!r}: {self.root} is in use by another lmplug process (pid {holder}); "
                "give each process its own disk path"
            ) from None
        self._lock_fd = lock_fd
        try:
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
            mode = self.options.io_mode
            supported = files.probe_direct_io(self.root)
            if mode == "direct" and not supported:
                raise TierUnavailable(f"tier {self.name!r}: the filesystem of {self.root} does not support O_DIRECT")
            self.direct = supported and mode != "buffered"
            keys, tokens = files.scan(self.root, self.context.layout.bytes_per_token)
        except OSError as exc:
            self._unlock()
            raise TierUnavailable(f"tier {self.name!r}: cannot use {self.root}: {exc.strerror or exc}") from exc
        except BaseException:
            self._unlock()
            raise
        self._index = OrderedDict(zip(keys, tokens, strict=True))
        self._used = sum(self._size(count) * files_of for count, files_of in Counter(tokens).items())
        self.scan_seconds = time.perf_counter() - started

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = -1

    # ------------------------------------------------------------------ data path

    @hookimpl
    async def lmplug_contains(self, keys: Sequence[ChunkKey]) -> int:
        index, queued = self._index, self.queued
        return leading(keys, lambda key: key in index or queued(key))

    @hookimpl
    async def lmplug_retrieve(self, keys: Sequence[ChunkKey]) -> list[KVChunk]:
        chunks: list[KVChunk] = []
        reads: list[_Read] = []
        for key in keys:
            waiting = self._queue.queued(key)
            if waiting is not None and not reads:
                chunks.append(waiting.acquire())  # still in memory, queued for writing
                continue
            tokens = self._index.get(key)
            if tokens is None:
                break
            chunk = self.context.allocator.allocate(tokens)
            if chunk is None:
                break
            reads.append(_Read(key, tokens, [chunk.raw()], chunk))
        if reads:
            good = await self._read(reads)
            for index, read in enumerate(reads):
                if read.chunk is not None:
                    if index < good:
                        chunks.append(read.chunk)
                    else:
                        read.chunk.release()
        self._count(len(chunks), len(keys))
        return chunks

    @hookimpl
    async def lmplug_retrieve_into(self, keys: Sequence[ChunkKey], out: torch.Tensor) -> int:
        """Files are read straight into ``out`` (O_DIRECT where it is 4 KiB-aligned, else through
        the reader thread's staging memory, copied into ``out`` by that thread while other reads
        go on); a CUDA ``out`` is served through chunks."""
        rows = KVBytes.of(out)
        if rows is None:
            return await self.retrieve_by_copy(keys, out)
        size = self.context.config.chunk_size
        total = int(out.shape[2])
        served = self._queue.copy_queued(keys, out, size)  # still in memory, queued for writing
        reads: list[_Read] = []
        for index in range(served, len(keys)):
            start = index * size
            tokens = min(size, total - start)
            if start >= total or self._index.get(keys[index]) != tokens:
                break
            reads.append(_Read(keys[index], tokens, rows.payload(start, tokens), None))
        if reads:
            served += await self._read(reads)
        self._count(served, len(keys))
        return served

    async def _read(self, reads: list[_Read]) -> int:
        """Read the files (large ones in segments), up to ``readers`` at once; how many leading ones are good."""
        parts = [
            (index, start, min(start + files.SEGMENT, read.nbytes))
            for index, read in enumerate(reads)
            for start in range(0, read.nbytes, files.SEGMENT)
        ]
        lanes = min(self.options.readers, len(parts))

        async def lane(first: int) -> None:
            # Lane i reads parts i, i + lanes, ...: each lane is one worker thread's queue.
            await anyio.to_thread.run_sync(self._read_parts, reads, parts[first::lanes], limiter=self._read_limiter)

        self._reads_in_flight += 1
        try:
            async with anyio.create_task_group() as group:
                for first in range(lanes):
                    group.start_soon(lane, first)
            good = await anyio.to_thread.run_sync(self._verify, reads, limiter=self._read_limiter)
        finally:
            self._reads_in_flight -= 1
            if not self._reads_in_flight:
                self._reads_done.set()
                self._reads_done = anyio.Event()
        for index, read in enumerate(reads):
            if index < good:
                if read.key in self._index:
                    self._index.move_to_end(read.key)
            elif index == good and read.failure is not None:
                self._failed_read(read.key, read.failure)
        return good

    def _read_parts(self, reads: list[_Read], parts: list[tuple[int, int, int]]) -> None:
        """Read some parts of some files (a worker thread's share); failures are recorded per file."""
        for index, start, end in parts:
            read = reads[index]
            if read.failure is not None:
                continue
            path = files.chunk_path(self.root, read.key, read.tokens)
            try:
                header = files.read_chunk_part(path, read.payload, read.nbytes, start, end, direct=self.direct)
            except (OSError, CorruptChunk) as exc:
                read.failure = exc
                continue
            if start == 0 and end == read.nbytes:
                # A one-part file is checked right here, overlapping other lanes' reads.
                read.failure = self._check(path, header, read)
                read.verified = read.failure is None
            elif start == 0:
                read.header = header

    def _verify(self, reads: list[_Read]) -> int:
        """Check the multi-part files' headers and checksums in order; how many leading files are good."""
        for index, read in enumerate(reads):
            if read.failure is None and not read.verified:
                read.failure = self._check(files.chunk_path(self.root, read.key, read.tokens), read.header, read)
            if read.failure is not None:
                return index
        return len(reads)

    def _check(self, path: Path, header: bytes, read: _Read) -> Exception | None:
        """Verify one file read into its memory and touch it; why it is bad, or ``None``."""
        try:
            files.verify_chunk(path, header, read.key, self.context.layout, read.tokens, read.payload)
            os.utime(path)  # recency survives a restart: the index is rebuilt in mtime order
        except (OSError, CorruptChunk) as exc:
            return exc
        return None

    def _failed_read(self, key: ChunkKey, failure: Exception) -> None:
        tokens = self._index.pop(key, None)
        if tokens is None:
            return
        self._used -= self._size(tokens)
        path = files.chunk_path(self.root, key, tokens)
        if isinstance(failure, CorruptChunk) or (isinstance(failure, OSError) and failure.errno == errno.ENOENT):
            # Never served: the file is dropped (deleted here, on the loop: it is one unlink).
            with contextlib.suppress(OSError):
                path.unlink()
            self._report("read", f"dropped {path.name}: {failure}")
        else:
            self._report("read", f"cannot read {path}: {failure}")
        self.context.report_evicted([key])

    @hookimpl
    async def lmplug_store(self, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk]) -> None:
        for key, chunk in zip(keys, chunks, strict=True):
            if key not in self._index:
                self._queue.offer(key, chunk)  # a full queue skips it: the disk is behind, the engine is not

    async def _write_batch(self, batch: Batch) -> None:
        for key, chunk in batch:
            while self._reads_in_flight:
                await self._reads_done.wait()  # reads first: they are what an engine waits on
            await self._write(key, chunk)

    async def _write(self, key: ChunkKey, chunk: KVChunk) -> None:
        tokens = chunk.num_tokens
        size = files.file_size(chunk.nbytes)
        victims = self._evict_to(self.options.capacity - size)
        self._used += size  # reserved while the write is in flight
        path = files.chunk_path(self.root, key, tokens)
        try:
            await anyio.to_thread.run_sync(self._write_file, path, key, chunk, victims, limiter=self._write_limiter)
        except OSError as exc:
            self._used -= size
            self._errors += 1
            self._report(f"write-{exc.errno}", f"cannot write {path}: {exc.strerror or exc}; chunk skipped")
            return
        if self._queue.cancelled(key):  # evicted on command while it was being written
            self._used -= size
            await anyio.to_thread.run_sync(files.remove_files, [path], limiter=self._write_limiter)
            return
        self._index[key] = tokens
        self._stored += 1
        self.context.report_admitted([key])

    def _write_file(self, path: Path, key: ChunkKey, chunk: KVChunk, victims: list[Path]) -> None:
        files.remove_files(victims)
        payload = chunk.raw()
        header = ChunkHeader.for_chunk(key, self.context.layout, chunk.num_tokens, payload_checksum(payload))
        write = files.write_chunk_file
        try:
            write(
                path, header, payload, chunk.tensor.data_ptr(), direct=self.direct, fsync=self.options.fsync == "always"
            )
        except FileNotFoundError:
            # The directory vanished (cleaned up under us): recreate it once and retry.
            path.parent.mkdir(parents=True, exist_ok=True)
            write(
                path, header, payload, chunk.tensor.data_ptr(), direct=self.direct, fsync=self.options.fsync == "always"
            )

    def _evict_to(self, budget: int) -> list[Path]:
        """Drop least recently used entries until at most ``budget`` bytes are used; their paths."""
        victims: list[Path] = []
        dropped: list[ChunkKey] = []
        while self._used > budget and self._index:
            key, tokens = self._index.popitem(last=False)
            self._used -= self._size(tokens)
            victims.append(files.chunk_path(self.root, key, tokens))
            dropped.append(key)
        if dropped:
            self._evictions += len(dropped)
            self.context.report_evicted(dropped)
        return victims

    @hookimpl
    async def lmplug_held_keys(self) -> list[ChunkKey]:
        return list(self._index)

    @hookimpl
    async def lmplug_evict(self, keys: Sequence[ChunkKey]) -> int:
        victims: list[Path] = []
        dropped: list[ChunkKey] = []
        for key in keys:
            if self._queue.cancel(key):
                dropped.append(key)
                continue
            tokens = self._index.pop(key, None)
            if tokens is not None:
                self._used -= self._size(tokens)
                victims.append(files.chunk_path(self.root, key, tokens))
                dropped.append(key)
        if victims:
            await anyio.to_thread.run_sync(files.remove_files, victims, limiter=self._write_limiter)
        if dropped:
            self._evictions += len(dropped)
            self.context.report_evicted(dropped)
        return len(dropped)

    # ------------------------------------------------------------------ reporting

    def statistics(self) -> TierStatistics:
        return self._statistics(chunks=len(self._index), used_bytes=self._used, capacity_bytes=self.options.capacity)
