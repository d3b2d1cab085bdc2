"""L4 (``type: remote``, ``lm://``) store and retrieve throughput against raw Python sockets.

Geometry: chunk_size 256 tokens, bfloat16, 8 KV heads of 128 (hidden 1024), so one chunk is
``num_layers`` MiB; the number of layers picks the chunk size (2, 8, 32 MiB). The stack has one
tier, ``type: remote`` at an ``lmplug-server`` this benchmark starts on a free loopback port
(memory store, no disk) and stops afterwards; the tier runs with its default concurrency
(``writers: 4``, ``readers: 8``), as a user's would. One sample moves one prompt of 64 MiB
(16 MiB with ``--quick``): several chunks.

- store: ``store`` plus ``tier.drain()`` (every chunk on the server, after the tier's EXISTS
  check) of chunks the server does not hold; they are evicted (DELETEd) again after each
  sample, outside the timed section.
- retrieve: ``retrieve(tokens, out=preallocated)`` of chunks that are on the server and not in
  the write queue (stored and drained once, before sampling): GET straight into chunk memory,
  checksum verification and the copy into ``out``.
- references, same run: a second Python process holding preallocated memory of one prompt's
  size, reached over loopback TCP by one blocking socket in a worker thread, one chunk at a
  time. "raw send": per chunk, a 17-byte request, ``sendall`` of the chunk, a 1-byte
  acknowledgement after the peer ``recv_into``-ed all of it. "raw recv": per chunk, a 17-byte
  request, the peer's ``sendall``, our ``recv_into`` of the chunk. Chunk i moves between
  region i of our memory and region i of the peer's, so, like the tier, the reference touches
  a whole prompt of distinct memory per sample (re-sending one chunk-sized buffer would keep
  2 and 8 MiB chunks in the CPU caches and flatter it). That is what any Python store client
  and server must at least do for the same bytes (the server also allocates and keeps each
  value; the tier adds a header, an EXISTS, checksums and, on retrieve, the copy into ``out``).

Target: store and retrieve each at >= 0.7x the raw socket. ``--quick``: 2 MiB chunks only.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch

import lmplug
from benchmarks.harness import Backend, MiB, Result, Settings, Target, run_per_backend, sample_async
from benchmarks.tier_cases import (
    CHUNK_TOKENS,
    HEAD_SIZE,
    KV_HEADS,
    Case,
    only_tier,
    retrieve_case,
    store_case,
    thread_case,
)
from lmplug_remote.tier import RemoteTier

NAME = "remote_lm"
SUMMARY = "L4 remote tier on lmplug-server: store/retrieve MiB/s vs same-run raw socket sendall/recv_into (>= 0.7x)"

TARGET = Target(">=", 0.7, relative=True)
SAMPLE_BYTES = 64 * MiB  # moved per sample (one prompt), per direction
SAMPLE_BYTES_QUICK = 16 * MiB
LARGEST_CHUNK = 32 * MiB


_REQUEST = struct.Struct("<cQQ")
# The reference's peer: serves one connection; "W"+offset+size: receive size bytes into its memory at offset,
# answer b"k"; "R"+offset+size: send size bytes of its memory from offset.
_PEER = """
import socket, struct, sys
request = struct.Struct("<cQQ")
buffer = memoryview(bytearray(b"\\x01" * int(sys.argv[1])))
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
connection, _ = listener.accept()
connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
head = bytearray(request.size)
while True:
    got = 0
    while got < len(head):
        n = connection.recv_into(memoryview(head)[got:])
        if not n:
            sys.exit(0)
        got += n
    op, offset, size = request.unpack(head)
    view = buffer[offset : offset + size]
    if op == b"W":
        got = 0
        while got < size:
            got += connection.recv_into(view[got:])
        connection.sendall(b"k")
    else:
        connection.sendall(view)
"""


# ---------------------------------------------------------------------------- processes


@contextmanager
def _lm_server(capacity: int) -> Iterator[int]:
    """An lmplug-server on a free loopback port, stopped on exit; yields the port."""
    binary = Path(sys.executable).parent / "lmplug-server"
    command = [str(binary)] if binary.exists() else [sys.executable, "-m", "lmplug_server"]
    arguments = ["--port", "0", "--capacity", str(capacity), "--max-value", "64MiB", "--log-level", "WARNING"]
    process = subprocess.Popen([*command, *arguments], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"lm://127\.0\.0\.1:(\d+)", line)
        if match is None:
            raise RuntimeError(f"lmplug-server did not start: {line!r}")
        yield int(match.group(1))
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


class _RawPeer:
    """The reference: raw blocking socket I/O with a peer process (see the module docstring)."""

    def __init__(self, chunks: int, chunk_bytes: int) -> None:
        self.chunks = chunks
        self.chunk_bytes = chunk_bytes
        self.memory = memoryview(bytearray(b"\x01" * (chunks * chunk_bytes)))
        self.process = subprocess.Popen(
            [sys.executable, "-c", _PEER, str(chunks * chunk_bytes)], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        port = int(self.process.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ack = bytearray(1)
        self._lock = threading.Lock()

    def send(self) -> float:
        with self._lock:
            start = time.perf_counter()
            for index in range(self.chunks):
                offset = index * self.chunk_bytes
                self.sock.sendall(_REQUEST.pack(b"W", offset, self.chunk_bytes))
                self.sock.sendall(self.memory[offset : offset + self.chunk_bytes])
                if self.sock.recv_into(self._ack) != 1:
                    raise RuntimeError("raw peer went away")
            return time.perf_counter() - start

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
                        raise RuntimeError("raw peer went away")
                    got += received
            return time.perf_counter() - start

    def close(self) -> None:
        self.sock.close()
        self.process.wait(30)
        if self.process.stdout is not None:
            self.process.stdout.close()


# ---------------------------------------------------------------------------- cases


def _config(num_layers: int, port: int) -> dict[str, Any]:
    return {
        "chunk_size": CHUNK_TOKENS,
        "model": {
            "name": "bench-remote-lm",
            "num_layers": num_layers,
            "num_kv_heads": KV_HEADS,
            "head_size": HEAD_SIZE,
            "dtype": "bfloat16",
        },
        "tiers": [
            {
                "type": "remote",
                "url": f"lm://127.0.0.1:{port}",
                "timeout": "30s",
                "write_timeout": "30s",
            }
        ],
    }


# ---------------------------------------------------------------------------- one chunk size


async def _measure_size(chunk_mib: int, settings: Settings, backend: Backend, port: int) -> list[Result]:
    num_layers = chunk_mib  # 2 (K, V) * layers * 256 tokens * 1024 hidden * 2 bytes = layers MiB
    chunk_bytes = chunk_mib * MiB
    chunks = max(1, (SAMPLE_BYTES_QUICK if settings.quick else SAMPLE_BYTES) // chunk_bytes)
    sample_bytes = chunks * chunk_bytes
    num_tokens = chunks * CHUNK_TOKENS
    shape = (2, num_layers, num_tokens, KV_HEADS * HEAD_SIZE)
    kv = torch.ones(shape, dtype=torch.bfloat16)
    out = torch.zeros(shape, dtype=torch.bfloat16)
    if kv.nbytes != sample_bytes:
        raise RuntimeError(f"geometry error: a prompt is {kv.nbytes} bytes, expected {sample_bytes}")
    # `stored` is stored by every store sample (and evicted after it); `held` is stored once.
    stored = np.arange(num_tokens, dtype=np.int32) + 1_000_000 * chunk_mib
    held = stored + num_tokens
    if backend == "trio":
        stored, held = stored + 500_000, held + 500_000  # the asyncio run's chunks may still be there

    peer = await anyio.to_thread.run_sync(_RawPeer, chunks, chunk_bytes)
    try:
        async with lmplug.open_cache(_config(num_layers, port)) as cache:
            tier = only_tier(cache, RemoteTier)
            await cache.store(held, kv)
            await tier.drain()
            cases: dict[str, Case] = {
                "raw send": thread_case(peer.send),
                "store": store_case(cache, only_tier(cache, RemoteTier), stored, kv),
                "raw recv": thread_case(peer.receive),
                "retrieve": retrieve_case(cache, held, out),
            }
            stats = await sample_async(cases, settings)
            counters = tier.statistics()
            if counters.errors or counters.skipped_writes:
                raise RuntimeError(f"remote tier: {counters.errors} errors, {counters.skipped_writes} skipped writes")
            await cache.evict(held)
    finally:
        await anyio.to_thread.run_sync(peer.close)

    rates = {name: value.inverted(sample_bytes / MiB) for name, value in stats.items()}
    label = f"{chunk_mib} MiB x{chunks} [{backend}]"
    return [
        Result(NAME, f"store {label}", "MiB/s", rates["store"], TARGET, rates["raw send"], "raw socket"),
        Result(NAME, f"retrieve out= {label}", "MiB/s", rates["retrieve"], TARGET, rates["raw recv"], "raw socket"),
    ]


async def _main(settings: Settings, backend: Backend, port: int) -> list[Result]:
    sizes = (2,) if settings.quick else (2, 8, 32)
    results: list[Result] = []
    for chunk_mib in sizes:
        results += await _measure_size(chunk_mib, settings, backend, port)
    return results


def run(settings: Settings) -> list[Result]:
    sample = SAMPLE_BYTES_QUICK if settings.quick else SAMPLE_BYTES
    with _lm_server(capacity=4 * sample + LARGEST_CHUNK) as port:

        async def main(settings: Settings, backend: Backend) -> list[Result]:
            return await _main(settings, backend, port)

        return run_per_backend(main, settings)
