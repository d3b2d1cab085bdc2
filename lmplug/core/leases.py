"""Leases: pins with a time-out.

A lease holds a reference to, and a pin on, each chunk it covers, so that no tier evicts
or frees them until the lease is released or its time-out passes. The table's sweeper
runs in the cache's task group and sleeps until the earliest deadline.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from types import TracebackType

import anyio

from lmplug.core.memory import KVChunk


class Lease:
    """A promise that the KV of the leading :attr:`num_tokens` tokens stays in host memory.

    A lease may grow after it is granted: :meth:`lmplug.Cache.lease` first pins what host
    memory holds, then extends the lease as chunks of lower tiers arrive (:meth:`extend`),
    and sets :attr:`ready` when nothing more will come.
    """

    __slots__ = ("_chunks", "_on_release", "_owner", "_route", "deadline", "lease_id", "num_tokens", "ready")

    def __init__(
        self,
        lease_id: int,
        chunks: list[KVChunk],
        num_tokens: int,
        deadline: float,
        on_release: Callable[[Lease], None],
    ) -> None:
        self.lease_id = lease_id
        self.num_tokens = num_tokens
        self.deadline = deadline
        self._chunks = chunks
        self._on_release = on_release
        self._owner = threading.get_ident()  # the cache's loop thread: chunk counts live there
        self._route: Callable[[Lease], None] | None = None
        self.ready = anyio.Event()
        """Set once the lease will not grow any more (promotion finished, failed or was cut short)."""
        for chunk in chunks:
            chunk.pin()

    @property
    def active(self) -> bool:
        return self._chunks is not None

    @property
    def chunks(self) -> tuple[KVChunk, ...]:
        return tuple(self._chunks or ())

    def extend(self, chunks: list[KVChunk], num_tokens: int) -> None:
        """Take over ``chunks`` (their references), which cover the next ``num_tokens`` tokens.

        On a released lease the chunks are released at once.
        """
        if self._chunks is None:
            for chunk in chunks:
                chunk.release()
            return
        for chunk in chunks:
            chunk.pin()
        self._chunks.extend(chunks)
        self.num_tokens += num_tokens

    def route_releases(self, route: Callable[[Lease], None]) -> None:
        """Release through ``route`` when :meth:`release` is called from another thread than the
        cache's loop (``SyncCache`` hands its leases out so: ``route`` runs the release on the loop)."""
        self._route = route

    def release(self) -> None:
        """Unpin and release every chunk. Idempotent. On the cache's loop thread; from another
        thread, through the route :class:`lmplug.SyncCache` gave the lease, else an error."""
        if threading.get_ident() != self._owner:
            if self._chunks is None:
                return
            if self._route is None:
                raise RuntimeError(
                    "a lease is released on the cache's event-loop thread (from other threads: SyncCache.release)"
                )
            self._route(self)
            return
        chunks = self._chunks
        self.ready.set()
        if chunks is None:
            return
        self._chunks = None  # type: ignore[assignment]
        for chunk in chunks:
            chunk.unpin()
            chunk.release()
        self._on_release(self)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "active" if self.active else "released"
        return f"<Lease {self.lease_id} {self.num_tokens} tokens {state}>"


class LeaseTable:
    """Active leases, expired by :meth:`run` when their deadline passes."""

    def __init__(self, on_expired: Callable[[Lease], None]) -> None:
        self._active: dict[int, Lease] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._ids = itertools.count(1)
        self._changed = anyio.Event()
        self._on_expired = on_expired

    def __len__(self) -> int:
        return len(self._active)

    def grant(self, chunks: list[KVChunk], num_tokens: int, timeout: float) -> Lease:
        """A new lease over ``chunks`` (whose references it takes over)."""
        lease_id = next(self._ids)
        deadline = anyio.current_time() + timeout
        lease = Lease(lease_id, chunks, num_tokens, deadline, self._forget)
        self._active[lease_id] = lease
        if len(self._deadlines) > 64 and len(self._deadlines) > 4 * len(self._active):
            # Released leases leave their deadline behind; drop those before the heap grows.
            self._deadlines = [entry for entry in self._deadlines if entry[1] in self._active]
            heapq.heapify(self._deadlines)
        heapq.heappush(self._deadlines, (deadline, lease_id))
        self._changed.set()
        return lease

    def _forget(self, lease: Lease) -> None:
        self._active.pop(lease.lease_id, None)

    def release_all(self) -> None:
        for lease in list(self._active.values()):
            lease.release()
        self._deadlines.clear()

    def expire(self, now: float) -> int:
        """Release every lease whose deadline is at or before ``now``; how many were."""
        expired = 0
        while self._deadlines and self._deadlines[0][0] <= now:
            _, lease_id = heapq.heappop(self._deadlines)
            lease = self._active.get(lease_id)
            if lease is not None:
                lease.release()
                self._on_expired(lease)
                expired += 1
        return expired

    async def run(self) -> None:
        """Expire leases as their deadlines pass, until cancelled."""
        while True:
            self.expire(anyio.current_time())
            delay = self._deadlines[0][0] - anyio.current_time() if self._deadlines else float("inf")
            with anyio.move_on_after(max(delay, 0.0)):
                await self._changed.wait()
            self._changed = anyio.Event()
