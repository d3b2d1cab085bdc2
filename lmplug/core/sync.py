"""A blocking facade over :class:`lmplug.Cache` for engines that call synchronously.

The cache runs on an event loop in a portal thread (``anyio.from_thread``); each method
hands its call to that loop and waits. Any number of threads may share one SyncCache:
their calls are serialised on the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Literal, TypeVar

import torch
from anyio.from_thread import BlockingPortal, start_blocking_portal

from lmplug.core.cache import Cache, CacheStatistics
from lmplug.core.config import ConfigSource
from lmplug.core.leases import Lease
from lmplug.errors import CacheClosedError
from lmplug.hooks.manager import PluginHost

Backend = Literal["asyncio", "trio"]
T = TypeVar("T")


class SyncCache:
    """``with lmplug.SyncCache(config) as cache: cache.store(tokens, kv)``: the Cache API, blocking."""

    def __init__(
        self,
        config: ConfigSource = None,
        *,
        backend: Backend = "asyncio",
        plugins: PluginHost | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._cache = Cache(config, plugins=plugins, environ=environ)
        self._backend = backend
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._cache_cm: AbstractContextManager[Cache] | None = None
        self._background: list[Future[object]] = []

    def __enter__(self) -> SyncCache:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> None:
        """Start the portal thread and open the cache on it."""
        if self._portal is not None:
            raise RuntimeError("this SyncCache is already open")
        portal_cm = start_blocking_portal(self._backend)
        portal = portal_cm.__enter__()
        try:
            cache_cm = portal.wrap_async_context_manager(self._cache)
            cache_cm.__enter__()
        except BaseException as exc:
            portal_cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._portal_cm, self._portal, self._cache_cm = portal_cm, portal, cache_cm

    def close(self) -> None:
        """Cancel background tasks, close the cache and stop the portal thread. Idempotent."""
        cache_cm, portal_cm = self._cache_cm, self._portal_cm
        self._cache_cm = self._portal_cm = self._portal = None
        background, self._background = self._background, []
        for future in background:
            future.cancel()  # the portal would otherwise wait for them forever
        try:
            if cache_cm is not None:
                cache_cm.__exit__(None, None, None)
        finally:
            if portal_cm is not None:
                portal_cm.__exit__(None, None, None)

    @property
    def async_cache(self) -> Cache:
        """The underlying async cache (use it only from the portal's loop)."""
        return self._cache

    def _portal_or_raise(self) -> BlockingPortal:
        if self._portal is None:
            raise CacheClosedError("the SyncCache is not open (use `with lmplug.SyncCache(config) as cache`)")
        return self._portal

    @contextlib.contextmanager
    def _closing_is_closed(self, portal: BlockingPortal) -> Iterator[None]:
        """A call that reaches the portal as another thread closes it is a :class:`CacheClosedError`
        too, not the portal's own error."""
        try:
            yield
        except RuntimeError as exc:
            if self._portal is not portal:
                raise CacheClosedError("the SyncCache was closed during the call") from exc
            raise

    def _call(self, function: Callable[..., Awaitable[T]], *args: object) -> T:
        portal = self._portal_or_raise()
        with self._closing_is_closed(portal):
            return portal.call(function, *args)

    def run_sync(self, function: Callable[[], T]) -> T:
        """Run ``function()`` on the cache's loop thread (to touch cache internals safely)."""
        portal = self._portal_or_raise()
        with self._closing_is_closed(portal):
            return portal.call(function)

    def call(self, function: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run ``await function(*args)`` on the cache's loop thread and return its result."""
        return self._call(function, *args)

    def start_soon(self, function: Callable[..., Awaitable[T]], *args: object) -> Future[T]:
        """Start ``await function(*args)`` on the cache's loop thread without waiting for it; its future.

        The task runs until it returns or the cache closes (:meth:`close` cancels it).
        """
        future = self._portal_or_raise().start_task_soon(function, *args)
        self._background.append(future)  # type: ignore[arg-type]
        self._background = [f for f in self._background if not f.done()]
        return future

    def start_background(self, function: Callable[..., Awaitable[object]]) -> None:
        """Run ``await function(task_status=...)`` on the cache's loop until it returns or the cache
        closes; returns once the function calls ``task_status.started()`` (it is ready)."""
        future, _ = self._portal_or_raise().start_task(function)
        self._background.append(future)

    def lookup(self, tokens: object, *, domain: str | None = None) -> int:
        return self._call(lambda: self._cache.lookup(tokens, domain=domain))

    def store(self, tokens: object, kv: torch.Tensor, *, start: int = 0, domain: str | None = None) -> int:
        return self._call(lambda: self._cache.store(tokens, kv, start=start, domain=domain))

    def retrieve(
        self, tokens: object, *, out: torch.Tensor | None = None, domain: str | None = None
    ) -> tuple[torch.Tensor, int]:
        return self._call(lambda: self._cache.retrieve(tokens, out=out, domain=domain))

    def lease(self, tokens: object, *, ttl: float | None = None, domain: str | None = None) -> Lease:
        """A lease; ``lease.release()`` may be called from any thread (it is routed to the loop)."""
        lease = self._call(lambda: self._cache.lease(tokens, ttl=ttl, domain=domain))
        lease.route_releases(self._release_on_loop)
        return lease

    def _release_on_loop(self, lease: Lease) -> None:
        with contextlib.suppress(CacheClosedError):  # closing released every lease already
            self.run_sync(lease.release)

    def release(self, lease: Lease) -> None:
        """Release a lease (on the cache's loop, where its chunks live)."""
        self.run_sync(lease.release)

    def evict(self, tokens: object, *, tiers: Sequence[str] | None = None, domain: str | None = None) -> dict[str, int]:
        return self._call(lambda: self._cache.evict(tokens, tiers=tiers, domain=domain))

    def drain(self) -> None:
        """Wait until every write-behind tier has finished the writes accepted so far."""
        self._call(self._cache.drain)

    def statistics(self) -> CacheStatistics:
        return self.run_sync(self._cache.statistics)
