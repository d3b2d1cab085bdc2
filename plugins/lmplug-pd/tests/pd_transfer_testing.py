"""Helpers of the pd tier's tests: cache stacks, prompts, a pair of caches over loopback, a
tampering proxy, and the leak check every test ends with."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import torch
from anyio.abc import ByteReceiveStream, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

import lmplug
from lmplug.testing import make_config, reference_kv
from lmplug_p2p import protocol as lmpx
from lmplug_pd.protocol import PushFrame
from lmplug_pd.tier import PDTier

CHUNK = 16
CHUNK_BYTES = 2 * 2 * CHUNK * 8 * 4
"""Bytes of one whole chunk of ``make_config``'s KV (float32, 2 layers, 8 values a token)."""


def stack(cpu: str = "4MiB", *, model: str = "lmplug-test", **pd: Any) -> dict[str, Any]:
    """A ``cpu`` + ``pd`` cache config, 16-token chunks, partial chunks saved (PD needs them)."""
    config = make_config(
        [{"type": "cpu", "capacity": cpu}, {"type": "pd", **pd}], chunk_size=CHUNK, save_partial_chunks=True
    )
    config["model"]["name"] = model
    return config


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7717 + i * 13) % 30_000 for i in range(length)]


def pd_tier(cache: lmplug.Cache) -> PDTier:
    return next(slot.tier for slot in cache.pipeline.slots if isinstance(slot.tier, PDTier))


def received(cache: lmplug.Cache) -> dict[str, Any]:
    """The receiver's counters of ``cache``'s pd tier."""
    stats: dict[str, Any] = pd_tier(cache).pd_statistics()["received"]
    return stats


def sent(cache: lmplug.Cache) -> dict[str, Any]:
    stats: dict[str, Any] = pd_tier(cache).pd_statistics()["sent"]
    return stats


async def eventually(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait until ``condition()`` holds (at most ``limit`` s)."""
    with anyio.fail_after(limit):
        while not condition():  # noqa: ASYNC110 - the receiver signals nothing when a transfer ends
            await anyio.sleep(0.01)


async def store(cache: lmplug.Cache, config: dict[str, Any], tokens: list[int]) -> None:
    await cache.store(tokens, reference_kv(tokens, config))


async def serves(cache: lmplug.Cache, config: dict[str, Any], tokens: list[int]) -> int:
    """How many leading tokens of ``tokens`` ``cache`` serves, checked against ``reference_kv``."""
    kv, count = await cache.retrieve(tokens)
    assert torch.equal(kv, reference_kv(tokens, config)[:, :, :count])
    return count


def assert_settled(*caches: lmplug.Cache, holds: int | None = None) -> None:
    """No reservation left in any receiver; ``holds`` transfers held in the last one."""
    for cache in caches:
        assert received(cache)["inflight_bytes"] == 0
    if holds is not None:
        assert received(caches[-1])["holds"] == holds


def assert_nothing_leaked(*caches: lmplug.Cache) -> None:
    """After the caches closed: every chunk went back to its allocator, no hold or reservation is left."""
    for cache in caches:
        stats = received(cache)
        assert (stats["inflight_bytes"], stats["holds"], stats["held_chunks"]) == (0, 0, 0)
        allocator = cache.allocator.statistics()
        assert (allocator.used_bytes, allocator.allocations) == (0, 0)


@contextlib.asynccontextmanager
async def pair(
    sender: dict[str, Any] | None = None, receiver: dict[str, Any] | None = None
) -> AsyncIterator[tuple[lmplug.Cache, lmplug.Cache, str]]:
    """A prefill cache and a decode cache in this process; yields them and the decode's endpoint.
    Checks, once both closed, that nothing leaked."""
    prefill = lmplug.open_cache(sender or stack())
    decode = lmplug.open_cache(receiver or stack())
    async with prefill, decode:
        yield prefill, decode, pd_tier(decode).endpoint
    assert_nothing_leaked(prefill, decode)


@contextlib.asynccontextmanager
async def tampering_proxy(upstream: str, *, flip_chunk: int) -> AsyncIterator[str]:
    """A loopback proxy to ``upstream`` flipping one payload byte of the CHUNK frame of index
    ``flip_chunk`` on its way to the receiver; yields its endpoint."""
    host, port = upstream.rsplit(":", 1)

    async def pump(source: ByteReceiveStream, sink: SocketStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            while True:
                await sink.send(await source.receive())

    async def frames(source: SocketStream, sink: SocketStream) -> None:
        reader = BufferedByteReceiveStream(source)
        with contextlib.suppress(anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError):
            while True:
                head = await reader.receive_exactly(lmpx.FRAME.size)
                _, _, kind, _, _, meta_length, data_length = lmpx.FRAME.unpack(head)
                meta = await reader.receive_exactly(meta_length) if meta_length else b""
                data = bytearray(await reader.receive_exactly(data_length)) if data_length else bytearray()
                if kind == PushFrame.CHUNK and json.loads(meta)["index"] == flip_chunk:
                    data[-1] ^= 0x5A  # the payload's last byte
                await sink.send(head + meta + bytes(data))

    async def handle(client: SocketStream) -> None:
        async with client, await anyio.connect_tcp(host, int(port)) as server, anyio.create_task_group() as group:
            group.start_soon(pump, server, client)
            await frames(client, server)
            group.cancel_scope.cancel()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, handle)
        yield f"127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
        group.cancel_scope.cancel()
