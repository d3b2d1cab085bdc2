"""Per-call overhead of :class:`lmplug.SyncCache` (the blocking facade) over the async call.

A small lookup (one 16-token chunk, held) is timed awaited directly on the event loop and
called through the SyncCache portal thread, on each requested backend; for the split, a bare
anyio ``BlockingPortal.call`` of a no-op coroutine (the thread hop alone). Informational: no
target; the ratio column is SyncCache/async (and portal/SyncCache).
"""

from __future__ import annotations

import functools
from typing import Any

import anyio
import numpy as np
import torch
from anyio.from_thread import start_blocking_portal

import lmplug
from benchmarks.harness import (
    Backend,
    Result,
    Settings,
    Stats,
    per_call,
    per_call_async,
    sample_async,
    sample_sync,
)
from lmplug import tierkit

NAME = "sync_overhead"
SUMMARY = "SyncCache vs async per-call cost of a small lookup (info)"

CHUNK_TOKENS = 16
CONFIG: dict[str, Any] = {
    "chunk_size": CHUNK_TOKENS,
    "model": {"name": "bench-sync", "num_layers": 2, "num_kv_heads": 1, "head_size": 8, "dtype": "float16"},
    "tiers": [{"type": "cpu", "capacity": "16MiB"}],
}
TOKENS = np.arange(CHUNK_TOKENS, dtype=np.int32)


async def _noop() -> None:
    return None


def _kv(layout: tierkit.KVLayout) -> torch.Tensor:
    return torch.ones(layout.shape(CHUNK_TOKENS), dtype=layout.dtype)


async def _async_lookups(settings: Settings, calls: int) -> Stats:
    async with lmplug.open_cache(CONFIG) as cache:
        await cache.store(TOKENS, _kv(cache.layout))

        async def once() -> None:
            if await cache.lookup(TOKENS) != CHUNK_TOKENS:
                raise RuntimeError("lookup missed")

        async def case() -> float:
            return await per_call_async(once, calls)

        return (await sample_async({"async": case}, settings))["async"]


def _measure(settings: Settings, backend: Backend) -> list[Result]:
    calls = 100 if settings.quick else 500
    direct = anyio.run(functools.partial(_async_lookups, settings, calls), backend=backend).scaled(1e6)
    with lmplug.SyncCache(CONFIG, backend=backend) as cache:
        cache.store(TOKENS, _kv(cache.async_cache.layout))

        def once() -> None:
            if cache.lookup(TOKENS) != CHUNK_TOKENS:
                raise RuntimeError("lookup missed")

        def case() -> float:
            return per_call(once, calls)

        with start_blocking_portal(backend) as portal:

            def portal_case() -> float:
                return per_call(lambda: portal.call(_noop), calls)

            stats = sample_sync({"sync": case, "portal": portal_case}, settings)
    sync, bare = stats["sync"].scaled(1e6), stats["portal"].scaled(1e6)
    return [
        Result(NAME, f"lookup 1 chunk, async [{backend}]", "us/call", direct),
        Result(NAME, f"lookup 1 chunk, SyncCache [{backend}]", "us/call", sync, None, direct, "async"),
        Result(NAME, f"anyio portal.call(no-op) alone [{backend}]", "us/call", bare, None, sync, "SyncCache"),
    ]


def run(settings: Settings) -> list[Result]:
    results: list[Result] = []
    for backend in settings.backends:
        results += _measure(settings, backend)
    return results
