"""A blocking facade over :class:`lmplug.Cache` for engines that call synchronously.

The cache runs on an event loop in a portal thread (``anyio.from_thread``); each method
hands its call to that loop and waits. Any number of threads may share one SyncCache:
their calls are serialised on the loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
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

    def run_sync(self, function: Callable[[], T]) -> T:
        """Run ``function()`` on the cache's loop thread (to touch cache internals safely)."""
        return self._portal_or_raise().call(function)

    def call(self, function: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run ``await function(*args)`` on the cache's loop thread and return its result."""
        return self._portal_or_raise().call(function, *args)

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

    def lookup(self, tokens: object) -> int:
        return self._portal_or_raise().call(self._cache.lookup, tokens)

    def store(self, tokens: object, kv: torch.Tensor, *, start: int = 0) -> int:
        portal = self._portal_or_raise()
        return portal.call(lambda: self._cache.store(tokens, kv, start=start))

    def retrieve(self, tokens: object, *, out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        portal = self._portal_or_raise()
        return portal.call(lambda: self._cache.retrieve(tokens, out=out))

    def lease(self, tokens: object, *, ttl: float | None = None) -> Lease:
        portal = self._portal_or_raise()
        return portal.call(lambda: self._cache.lease(tokens, ttl=ttl))

    def release(self, lease: Lease) -> None:
        """Release a lease (on the cache's loop, where its chunks live)."""
        self._portal_or_raise().call(lease.release)

    def evict(self, tokens: object, *, tiers: Sequence[str] | None = None) -> dict[str, int]:
        portal = self._portal_or_raise()
        return portal.call(lambda: self._cache.evict(tokens, tiers=tiers))

    def drain(self) -> None:
        """Wait until every write-behind tier has finished the writes accepted so far."""
        self._portal_or_raise().call(self._cache.drain)

    def statistics(self) -> CacheStatistics:
        return self._portal_or_raise().call(self._cache.statistics)
