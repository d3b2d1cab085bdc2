"""Test helpers: a throwaway third-party connector (``dict://``) and stacks that use it.

``DictConnector`` is how a third party adds a URL scheme: a small class and one hook. It
keeps blobs in a process-wide dict (named by the URL's host), so two caches in one test
share it as two engines share a real store; tests can make it fail, hang or lose data.
The real connectors (redis, s3, lm://) are tested against real servers; after a fault,
:func:`assert_nothing_leaked` checks what the cache still holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio
from pydantic import Field

import lmplug
import lmplug.tierkit
from lmplug.testing import make_config

STORES: dict[str, dict[str, bytes]] = {}


class DictOptions(lmplug.tierkit.StrictModel):
    latency: lmplug.tierkit.Duration = Field(default=0.0, description="Seconds each call waits.")


class DictConnector(lmplug.tierkit.RemoteConnector):
    def __init__(self, url: str, options: DictOptions) -> None:
        self.url = url
        self.options = options
        self.store = STORES.setdefault(urlsplit(url).netloc, {})
        self.down = False  # tests flip this to kill the "server"
        self.hang = False  # tests flip this to make every call hang
        self.calls: dict[str, int] = {}

    async def _enter(self, operation: str) -> None:
        self.calls[operation] = self.calls.get(operation, 0) + 1
        if self.hang:
            await anyio.sleep_forever()
        if self.options.latency:
            await anyio.sleep(self.options.latency)
        if self.down:
            raise lmplug.TierUnavailable(f"{self.url}: connection refused (test)")

    async def connect(self) -> None:
        await self._enter("connect")

    async def aclose(self) -> None:
        pass

    async def put_many(self, entries: Sequence[tuple[str, Sequence[memoryview]]], ttl: float | None) -> None:
        await self._enter("put")
        for key, parts in entries:
            self.store[key] = b"".join(bytes(part) for part in parts)

    async def get_into(self, key: str, parts: Sequence[memoryview]) -> int | None:
        await self._enter("get")
        value = self.store.get(key)
        if value is None:
            return None
        if len(value) > sum(len(part) for part in parts):
            raise lmplug.CorruptChunk(f"{key}: value of {len(value)} bytes is larger than expected")
        offset = 0
        for part in parts:
            piece = value[offset : offset + len(part)]
            part[: len(piece)] = piece
            offset += len(piece)
        return len(value)

    async def exists(self, keys: Sequence[str]) -> list[bool]:
        await self._enter("exists")
        return [key in self.store for key in keys]

    async def delete(self, keys: Sequence[str]) -> int:
        await self._enter("delete")
        return sum(self.store.pop(key, None) is not None for key in keys)


class DictPlugin:
    """The plugin object: one hook registers the scheme."""

    @lmplug.tierkit.hookimpl
    def lmplug_register_remote_schemes(self, register: Callable[[lmplug.tierkit.RemoteScheme[Any]], None]) -> None:
        register(lmplug.tierkit.RemoteScheme(("dict",), DictOptions, DictConnector, "test store: blobs in a dict"))


def dict_host() -> lmplug.PluginHost:
    """The installed plugins plus the dict scheme."""
    host = lmplug.PluginHost.from_environment({})
    host.register(DictPlugin(), "dict-scheme")
    return host


def two_tier_config(url: str, **remote: Any) -> dict[str, Any]:
    """A small L1 above a remote tier at ``url``."""
    return make_config(
        [{"type": "cpu", "capacity": "4MiB"}, {"type": "remote", "url": url, **remote}],
        chunk_size=16,
        save_partial_chunks=True,
    )


def remote_tier(cache: lmplug.Cache) -> Any:
    """The cache's remote tier object."""
    return next(slot.tier for slot in cache.pipeline.slots if slot.tier.context.type == "remote")


def leaks(cache: lmplug.Cache) -> list[str]:
    """What the open ``cache`` holds that nothing owns: active leases, pinned chunks, writes queued
    or in flight, and chunk memory beyond what the host-memory tiers hold."""
    stats = cache.statistics()
    found = [f"{stats.leases} leases active"] if stats.leases else []
    held_bytes = held_chunks = 0
    for slot in cache.pipeline.slots:
        tier = slot.tier.statistics()
        if tier.pending_writes:
            found.append(f"tier {tier.name!r}: {tier.pending_writes} writes queued or in flight")
        if tier.pinned:
            found.append(f"tier {tier.name!r}: {tier.pinned} chunks pinned")
        if lmplug.tierkit.Capability.PROVIDES_ALLOCATOR in slot.tier.capabilities:
            held_bytes += tier.used_bytes
            held_chunks += tier.chunks
    allocator = stats.allocator
    # Chunks, not only bytes: the CPU tier reports its pool's bytes, which a chunk held by nothing counts in.
    if (allocator.used_bytes, allocator.allocations) != (held_bytes, held_chunks):
        found.append(
            f"the allocator hands out {allocator.used_bytes} bytes in {allocator.allocations} chunks; "
            f"the host-memory tiers hold {held_bytes} bytes in {held_chunks}"
        )
    return found


async def assert_nothing_leaked(cache: lmplug.Cache, within: float = 10.0) -> None:
    """After a fault: the writes accepted so far finish or are given up, then (both within
    ``within`` s, as background work settles) :func:`leaks` finds nothing."""
    deadline = time.monotonic() + within
    try:
        with anyio.fail_after(within):
            await cache.drain()
    except TimeoutError:
        raise AssertionError(f"writes stuck for {within:g} s: {'; '.join(leaks(cache))}") from None
    while found := leaks(cache):
        if time.monotonic() > deadline:
            raise AssertionError(f"leaked after {within:g} s: {'; '.join(found)}")
        await anyio.sleep(0.05)
