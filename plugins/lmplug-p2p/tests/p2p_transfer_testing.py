"""Helpers of lmplug-p2p's transfer tests: chunks, a counting allocator, a holder that serves
them, a tampering proxy, and a peer in another process (``p2p_transfer_peer.py``)."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import anyio
import torch
from anyio.abc import ByteReceiveStream, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from lmplug.tierkit import AllocatorStatistics, ChunkKey, KVChunk, KVLayout, aligned_empty
from lmplug_p2p import protocol

FINGERPRINT = bytes.fromhex("0123456789abcdef")
OTHER_FINGERPRINT = bytes.fromhex("fedcba9876543210")
TOKENS = 16
PEER_SCRIPT = Path(__file__).with_name("p2p_transfer_peer.py")


def make_layout(dtype: torch.dtype = torch.bfloat16, layers: int = 2) -> KVLayout:
    return KVLayout(layers, 2, 32, dtype)


def make_key(index: int, fingerprint: bytes = FINGERPRINT) -> ChunkKey:
    return ChunkKey(fingerprint + hashlib.blake2b(index.to_bytes(8, "little"), digest_size=16).digest())


def make_kv(layout: KVLayout, index: int, tokens: int) -> torch.Tensor:
    """Chunk ``index``'s KV: the same values in every process."""
    generator = torch.Generator().manual_seed(index)
    return torch.randn(layout.shape(tokens), generator=generator).to(layout.dtype)


def token_counts(count: int, last: int = TOKENS) -> list[int]:
    """``count`` chunks of TOKENS tokens, the last one of ``last``."""
    return [TOKENS] * (count - 1) + [last] if count else []


async def eventually(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait until ``condition()`` holds (at most ``limit`` s)."""
    with anyio.fail_after(limit):
        while not condition():  # noqa: ASYNC110 - servers signal no event when a connection winds down
            await anyio.sleep(0.01)


class CountingAllocator:
    """A heap allocator that counts chunks in use, optionally holds at most ``capacity`` chunks,
    and calls ``on_allocate`` with the count of allocations so far."""

    def __init__(
        self,
        layout: KVLayout,
        capacity: int | None = None,
        on_allocate: Callable[[int], None] | None = None,
    ) -> None:
        self.layout = layout
        self.capacity = capacity
        self.on_allocate = on_allocate
        self.in_use = self.used_bytes = self.total = 0

    def allocate(self, num_tokens: int) -> KVChunk | None:
        if self.capacity is not None and self.in_use >= self.capacity:
            return None
        layout = self.layout
        memory = aligned_empty(layout.nbytes(num_tokens), pin_memory=False)
        tensor = memory.view(layout.dtype).view(layout.shape(num_tokens))
        self.in_use += 1
        self.used_bytes += layout.nbytes(num_tokens)
        self.total += 1
        if self.on_allocate is not None:
            self.on_allocate(self.total)
        return KVChunk(tensor, self._free, owner=self)

    def _free(self, chunk: KVChunk) -> None:
        self.in_use -= 1
        self.used_bytes -= chunk.nbytes

    def statistics(self) -> AllocatorStatistics:
        return AllocatorStatistics(None, self.used_bytes, self.in_use)


class Holder:
    """The serving side: chunks by key; ``serve`` hands out a leading run, one reference each."""

    def __init__(self, layout: KVLayout, counts: Sequence[int], held: int | None = None) -> None:
        self.layout = layout
        self.keys = [make_key(index) for index in range(len(counts))]
        self.chunks = {
            key: KVChunk(make_kv(layout, index, tokens))
            for index, (key, tokens) in enumerate(zip(self.keys, counts, strict=True))
            if held is None or index < held
        }
        self.blocked: anyio.Event | None = None
        """When set, ``serve`` waits for this event first."""

    async def serve(self, keys: Sequence[ChunkKey]) -> list[KVChunk]:
        if self.blocked is not None:
            await self.blocked.wait()
        run: list[KVChunk] = []
        for key in keys:
            chunk = self.chunks.get(key)
            if chunk is None:
                break
            run.append(chunk.acquire())
        return run

    async def contains(self, keys: Sequence[ChunkKey]) -> int:
        count = 0
        for key in keys:
            if key not in self.chunks:
                break
            count += 1
        return count

    def outstanding(self) -> int:
        """References handed to the server and not yet given back."""
        return sum(chunk.refs - 1 for chunk in self.chunks.values())


# ---------------------------------------------------------------------------- a tampering proxy


@contextlib.asynccontextmanager
async def tampering_proxy(
    upstream: str, *, flip_at: int | None = None, cut_at: int | None = None
) -> AsyncIterator[str]:
    """A loopback TCP proxy to ``upstream``; yields its endpoint.

    In the first GET reply it passes on, it flips the byte at offset ``flip_at`` of the chunk
    records, or closes both connections once ``cut_at`` bytes of records went through.
    """
    host, port = upstream.rsplit(":", 1)

    async def pump(source: ByteReceiveStream, sink: SocketStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            while True:
                await sink.send(await source.receive())

    async def replies(source: SocketStream, sink: SocketStream) -> None:
        reader = BufferedByteReceiveStream(source)
        with contextlib.suppress(anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError):
            while True:
                head = await reader.receive_exactly(protocol.FRAME.size)
                header = protocol.FRAME.unpack(head)
                kind, meta_length, data_length = header[2], header[5], header[6]
                await sink.send(head + await reader.receive_exactly(meta_length) if meta_length else head)
                if kind != protocol.FrameType.GET_REPLY:
                    continue
                data = bytearray(await reader.receive_exactly(data_length)) if data_length else bytearray()
                if flip_at is not None and flip_at < len(data):
                    data[flip_at] ^= 0x5A
                if cut_at is not None:
                    await sink.send(bytes(data[:cut_at]))
                    return
                await sink.send(bytes(data))
                break
            await pump(reader, sink)  # from the buffer first, then the socket

    async def handle(client: SocketStream) -> None:
        async with client, await anyio.connect_tcp(host, int(port)) as server, anyio.create_task_group() as group:
            group.start_soon(pump, client, server)
            await replies(server, client)
            group.cancel_scope.cancel()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, handle)
        yield f"127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
        group.cancel_scope.cancel()


# ---------------------------------------------------------------------------- a peer process


@contextlib.contextmanager
def peer_process(dtype: str, count: int, tokens: int, layers: int = 2) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``p2p_transfer_peer.py`` serving ``count`` chunks of ``make_kv`` in another process; yields it, its endpoint."""
    command = [sys.executable, str(PEER_SCRIPT), dtype, str(count), str(tokens), str(layers)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        endpoint = process.stdout.readline().strip()
        if not endpoint:
            raise RuntimeError("the peer process did not start")
        yield process, endpoint
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
