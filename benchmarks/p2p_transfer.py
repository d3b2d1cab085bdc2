"""P2P fetch throughput (``lmplug-p2p``'s tcp transport) against a raw Python socket.

Geometry: chunks of 256 tokens, bfloat16, 8 KV heads of 128 (hidden 1024), so one chunk is
``num_layers`` MiB; the number of layers picks the chunk size (2, 8, 32 MiB). A second
process, started here, holds one prompt of 64 MiB (16 MiB with ``--quick``) of chunks in its
memory and serves it two ways: a :class:`~lmplug_p2p.transfer.TransferServer` on one loopback
port, and a raw blocking socket on another.

- fetch: ``PeerClient.fetch`` of every chunk of the prompt into chunks of a heap allocator
  (one GET; each payload received with ``recvmsg_into`` straight into chunk memory, its
  header checked, its xxh3 verified; the peer hashes each chunk as it sends it, a chunk ahead
  in a worker thread from 4 MiB up). The chunks
  are released after each sample, outside the timed section; the allocator keeps their memory
  for the next sample, as a cache's pool would.
- reference, same run, same two processes: one blocking socket in a worker thread, one chunk
  at a time: a 17-byte request, the peer's ``sendall`` of that chunk's memory, our
  ``recv_into`` into region i of a preallocated prompt-sized buffer. That is what any Python
  client must at least do for the same bytes (the P2P layer adds the HELLO'd protocol, chunk
  headers, two checksums and an allocation per chunk).

Target: fetch at >= 0.7x the raw socket. ``--quick``: 2 MiB chunks only.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time

import anyio
import torch

from benchmarks.harness import Backend, MiB, Result, Settings, Stopwatch, Target, run_per_backend, sample_async
from benchmarks.tier_cases import CHUNK_TOKENS, HEAD_SIZE, KV_HEADS, Case, thread_case
from lmplug.core.memory import HeapAllocator
from lmplug.tierkit import ChunkKey, KVLayout
from lmplug_p2p.transfer import PeerClient

NAME = "p2p_transfer"
SUMMARY = "P2P fetch (lmplug-p2p tcp) of 2, 8, 32 MiB chunks from a peer process vs same-run raw socket (>= 0.7x)"

TARGET = Target(">=", 0.7, relative=True)
SAMPLE_BYTES = 64 * MiB
SAMPLE_BYTES_QUICK = 16 * MiB
FINGERPRINT = b"p2pbench"

_REQUEST = struct.Struct("<cQQ")
# The peer: holds `count` chunks of `layers` MiB; serves them over a TransferServer and, to the
# reference, over a raw socket ("R"+offset+size: send size bytes of the same memory from offset).
_PEER = """
import socket, struct, sys, threading
import anyio, torch
from lmplug.tierkit import ChunkKey, KVChunk, KVLayout
from lmplug_p2p.transfer import TransferServer

count, layers = int(sys.argv[1]), int(sys.argv[2])
layout = KVLayout(layers, 8, 128, torch.bfloat16)
memory = torch.ones((count, *layout.shape(256)), dtype=torch.bfloat16)
chunks = {ChunkKey(b"p2pbench" + index.to_bytes(16, "little")): KVChunk(memory[index]) for index in range(count)}
flat = memory.view(torch.uint8).reshape(-1).numpy().data

def raw_server(listener):
    request = struct.Struct("<cQQ")
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = bytearray(request.size)
    while True:
        got = 0
        while got < len(head):
            n = connection.recv_into(memoryview(head)[got:])
            if not n:
                return
            got += n
        _, offset, size = request.unpack(head)
        connection.sendall(flat[offset : offset + size])

async def serve(keys):
    run = []
    for key in keys:
        chunk = chunks.get(key)
        if chunk is None:
            break
        run.append(chunk.acquire())
    return run

async def contains(keys):
    return len(await serve(keys))

async def main():
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=raw_server, args=(listener,), daemon=True).start()
    async with TransferServer(serve, contains, fingerprint=b"p2pbench", layout=layout) as server:
        print(server.endpoint, listener.getsockname()[1], flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)

anyio.run(main)
"""


class _Peer:
    """The peer process, and the reference's blocking socket to it."""

    def __init__(self, chunks: int, chunk_mib: int) -> None:
        self.chunks = chunks
        self.chunk_bytes = chunk_mib * MiB
        self.memory = memoryview(bytearray(chunks * self.chunk_bytes))
        self.process = subprocess.Popen(
            [sys.executable, "-c", _PEER, str(chunks), str(chunk_mib)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if len(line) != 2:
            raise RuntimeError(f"the peer process did not start: {line!r}")
        self.endpoint = line[0]
        self.sock = socket.create_connection(("127.0.0.1", int(line[1])))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()

    def receive(self) -> float:
        with self._lock:
            start = time.perf_counter()
            for index in range(self.chunks):
                offset = index * self.chunk_bytes
                self.sock.sendall(_REQUEST.pack(b"R", offset, self.chunk_bytes))
                view = self.memory[offset : offset + self.chunk_bytes]
                got = 0
                while got < self.chunk_bytes:
                    received = self.sock.recv_into(view[got:])
                    if not received:
                        raise RuntimeError("the peer went away")
                    got += received
            return time.perf_counter() - start

    def close(self) -> None:
        self.sock.close()
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def _fetch_case(client: PeerClient, endpoint: str, layout: KVLayout, chunks: int, allocator: HeapAllocator) -> Case:
    keys = [ChunkKey(FINGERPRINT + index.to_bytes(16, "little")) for index in range(chunks)]
    counts = [CHUNK_TOKENS] * chunks

    async def case() -> float:
        watch = Stopwatch()
        with watch:
            fetched = await client.fetch(endpoint, keys, counts, allocator, layout, timeout=60)
        for chunk in fetched:
            chunk.release()
        if len(fetched) != chunks:
            raise RuntimeError(f"fetched {len(fetched)} of {chunks} chunks: {client.statistics().failures}")
        return watch.elapsed

    return case


async def _measure_size(chunk_mib: int, settings: Settings, backend: Backend) -> list[Result]:
    chunks = max(1, (SAMPLE_BYTES_QUICK if settings.quick else SAMPLE_BYTES) // (chunk_mib * MiB))
    sample_bytes = chunks * chunk_mib * MiB
    layout = KVLayout(chunk_mib, KV_HEADS, HEAD_SIZE, torch.bfloat16)
    if layout.nbytes(CHUNK_TOKENS) != chunk_mib * MiB:
        raise RuntimeError(f"geometry error: a chunk is {layout.nbytes(CHUNK_TOKENS)} bytes")
    allocator = HeapAllocator(layout, pin_memory=False, keep_bytes=2 * sample_bytes)
    peer = await anyio.to_thread.run_sync(_Peer, chunks, chunk_mib)
    client = PeerClient(FINGERPRINT)
    try:
        cases: dict[str, Case] = {
            "raw recv": thread_case(peer.receive),
            "fetch": _fetch_case(client, peer.endpoint, layout, chunks, allocator),
        }
        stats = await sample_async(cases, settings)
    finally:
        await client.aclose()
        await anyio.to_thread.run_sync(peer.close)
    if client.statistics().failures:
        raise RuntimeError(f"p2p client failures: {client.statistics().failures}")
    rates = {name: value.inverted(sample_bytes / MiB) for name, value in stats.items()}
    label = f"{chunk_mib} MiB x{chunks} [{backend}]"
    return [Result(NAME, f"fetch {label}", "MiB/s", rates["fetch"], TARGET, rates["raw recv"], "raw socket")]


async def _main(settings: Settings, backend: Backend) -> list[Result]:
    results: list[Result] = []
    for chunk_mib in (2,) if settings.quick else (2, 8, 32):
        results += await _measure_size(chunk_mib, settings, backend)
    return results


def run(settings: Settings) -> list[Result]:
    return run_per_backend(_main, settings)
