"""Write-behind for slow tiers: a bounded queue of chunks that background writers drain,
and :class:`WriteBehindTier`, the base of tiers built on it (disk, remote stores).

A tier's ``lmplug_store`` offers chunks with :meth:`WriteBehind.offer`, which never waits:
when the queue is full the chunk is skipped and counted, so a slow store never blocks the
engine. Until its write is done a queued chunk is held (one reference) and can be served
from memory (:meth:`WriteBehind.queued`). An eviction on command cancels a queued chunk;
the tier's write function checks :meth:`WriteBehind.cancelled` after writing and undoes it.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Self

import anyio
import torch
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from lmplug.core.keys import ChunkKey
from lmplug.core.memory import KVChunk
from lmplug.core.reporting import ThrottledLog
from lmplug.core.tier import Capability, Tier, TierContext, TierStatistics

Batch = Sequence[tuple[ChunkKey, KVChunk]]


class WriteBehind:
    """The queue and its writers; an async context manager owned by the tier.

    ``write(batch)`` is awaited by up to ``writers`` tasks at once, each with up to ``batch``
    queued chunks (what was waiting when the writer woke). It reports its own failures; it
    must not raise for a failed write.
    """

    def __init__(self, write: Callable[[Batch], Awaitable[None]], *, size: int, writers: int, batch: int = 1) -> None:
        self._write = write
        self._size = size
        self._writers = writers
        self._batch = batch
        self.pending: dict[ChunkKey, KVChunk] = {}
        """Chunks queued or being written, each holding one reference."""
        self._cancelled: set[ChunkKey] = set()
        self.skipped = 0
        """Chunks not queued because the queue was full."""
        self._send: MemoryObjectSendStream[tuple[ChunkKey, KVChunk]] | None = None
        self._group: TaskGroup | None = None
        self._drained = anyio.Event()
        self._drained.set()

    async def __aenter__(self) -> WriteBehind:
        send, receive = anyio.create_memory_object_stream[tuple[ChunkKey, KVChunk]](self._size)
        self._send = send
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group = group
        with receive:
            for _ in range(self._writers):
                group.start_soon(self._writer, receive.clone())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Write what is queued, stop the writers and release every held chunk. Idempotent."""
        send, self._send = self._send, None
        group, self._group = self._group, None
        if send is not None:
            send.close()  # writers drain what is queued, then stop
        try:
            if group is not None:
                # The group's scope must exit as it was entered (no shield around it): when the
                # caller is cancelled, queued writes are dropped rather than awaited.
                await group.__aexit__(None, None, None)
        finally:
            for chunk in self.pending.values():
                chunk.release()
            self.pending.clear()
            self._drained.set()

    def offer(self, key: ChunkKey, chunk: KVChunk) -> bool:
        """Queue ``chunk`` unless it is already queued or the queue is full (then it is counted in ``skipped``)."""
        send = self._send
        if send is None or key in self.pending:
            return False
        self._cancelled.discard(key)
        try:
            send.send_nowait((key, chunk))
        except anyio.WouldBlock:
            self.skipped += 1
            return False
        self.pending[key] = chunk.acquire()
        if self._drained.is_set():
            self._drained = anyio.Event()
        return True

    def queued(self, key: ChunkKey) -> KVChunk | None:
        """The queued chunk of ``key`` (not cancelled), to be served from memory; no reference is taken."""
        if key in self._cancelled:
            return None
        return self.pending.get(key)

    def copy_queued(self, keys: Sequence[ChunkKey], out: torch.Tensor, chunk_size: int) -> int:
        """Copy the leading ``keys`` still queued into ``out`` (their tokens, key ``i`` from token
        ``i * chunk_size``), as a tier's ``lmplug_retrieve_into`` serves them from memory; how many."""
        total = int(out.shape[2])
        served = 0
        for key in keys:
            start = served * chunk_size
            chunk = self.queued(key) if start < total else None
            if chunk is None or chunk.num_tokens != min(chunk_size, total - start):
                break
            out.narrow(2, start, chunk.num_tokens).copy_(chunk.tensor)
            served += 1
        return served

    def cancel(self, key: ChunkKey) -> bool:
        """Cancel the queued write of ``key``; False when it is not queued."""
        if key not in self.pending:
            return False
        self._cancelled.add(key)
        return True

    def cancelled(self, key: ChunkKey) -> bool:
        """Whether ``key``'s queued write was cancelled (the write function skips or undoes it)."""
        return key in self._cancelled

    async def drain(self) -> None:
        """Wait until every chunk queued so far is written (or has failed and been reported)."""
        await self._drained.wait()

    async def _writer(self, receive: MemoryObjectReceiveStream[tuple[ChunkKey, KVChunk]]) -> None:
        async with receive:
            async for first in receive:
                batch = [first]
                while len(batch) < self._batch:
                    try:
                        batch.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                try:
                    await self._write(batch)
                finally:
                    for key, chunk in batch:
                        if self.pending.pop(key, None) is not None:
                            chunk.release()
                        self._cancelled.discard(key)
                    if not self.pending:
                        self._drained.set()


class WriteBehindTier(Tier):
    """A tier whose stores are written behind: the queue, its lifecycle, and the counters.

    A subclass writes chunks in :meth:`_write_batch` (called by the queue's writers; it
    reports its failures with :meth:`_report` and never raises), offers chunks to
    ``self._queue`` in ``lmplug_store``, serves chunks still queued from memory
    (:meth:`queued`, ``self._queue.copy_queued``), counts reads with :meth:`_count`, and
    releases what it holds in :meth:`_release` (called once the queue has stopped).
    """

    capabilities = frozenset({Capability.WRITE_BEHIND})

    def __init__(
        self, context: TierContext, *, logger: logging.Logger, queue_size: int, writers: int, batch: int = 1
    ) -> None:
        super().__init__(context)
        self._queue = WriteBehind(self._write_batch, size=queue_size, writers=writers, batch=batch)
        self._log = ThrottledLog(logger)
        self._hits = self._misses = self._stored = self._evictions = self._errors = 0

    @abc.abstractmethod
    async def _write_batch(self, batch: Batch) -> None:
        """Write queued chunks (up to the queue's ``batch`` of them); report failures, never raise."""

    async def _open(self) -> None:
        """Acquire what the tier needs before its queue starts (a directory, a connection)."""

    async def _release(self) -> None:
        """Release what :meth:`_open` acquired; runs once the queue has stopped, even after a failure."""

    async def __aenter__(self) -> Self:
        await self._open()
        try:
            await self._queue.__aenter__()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._release()
            raise
        return self

    async def drain(self) -> None:
        """Wait until every queued write is done (or has failed and been reported)."""
        await self._queue.drain()

    async def aclose(self) -> None:
        """Finish queued writes, stop the writers, then release the tier's resources. Idempotent."""
        try:
            await self._queue.aclose()
        finally:
            with anyio.CancelScope(shield=True):
                await self._release()

    def queued(self, key: ChunkKey) -> bool:
        """Whether ``key`` is waiting to be written (and can be served from memory)."""
        return self._queue.queued(key) is not None

    def _count(self, served: int, wanted: int) -> None:
        """Count a read: ``served`` leading chunks of the ``wanted``; fewer is a miss."""
        self._hits += served
        if served < wanted:
            self._misses += 1

    def _report(self, kind: str, message: str) -> None:
        """Log a failure at WARNING once a minute per kind (DEBUG otherwise); the tier keeps serving."""
        self._log.report(kind, "%s tier %r: %s", self.context.type, self.name, message)

    def _statistics(
        self, *, chunks: int, used_bytes: int, capacity_bytes: int | None, errors: int = 0, skipped: int = 0
    ) -> TierStatistics:
        """The tier's statistics: the counters kept here plus what the subclass knows (extra
        ``errors`` and ``skipped`` writes are added to the base counts)."""
        return TierStatistics(
            name=self.name,
            type=self.context.type,
            chunks=chunks,
            used_bytes=used_bytes,
            capacity_bytes=capacity_bytes,
            hits=self._hits,
            misses=self._misses,
            stored=self._stored,
            evictions=self._evictions,
            errors=self._errors + errors,
            pending_writes=len(self._queue.pending),
            skipped_writes=self._queue.skipped + skipped,
        )
