"""L4 (``type: remote``, ``lm://``) store and retrieve throughput against raw Python sockets.

Geometry: chunk_size 256 tokens, bfloat16, 8 KV heads of 128 (hidden 1024), so one chunk is
``num_layers`` MiB; the number of layers picks the chunk size (2, 8, 32 MiB). The stack has one
tier, ``type: remote`` at an ``lmplug-server`` this benchmark starts on a free loopback port
(memory store, no disk) and stops afterwards; the tier runs with its default concurrency
(``writers: 4``, ``readers: 8``, the connector's pool of 8 connections), as a user's would. One
sample moves one prompt of 64 MiB (16 MiB with ``--quick``) of random (``randn``) KV: several
chunks.

- store: ``store`` plus ``tier.drain()`` (every chunk on the server, after the tier's EXISTS
  check) of chunks the server does not hold; they are evicted (DELETEd) again after each
  sample, outside the timed section.
- retrieve: ``retrieve(tokens, out=preallocated)`` of chunks that are on the server and not in
  the write queue (stored and drained once, before sampling): GET straight into chunk memory,
  checksum verification and the copy into ``out``. ``out`` is overwritten before and compared
  with the stored KV after every sample, untimed.
- references, same run, at the tier's concurrency: a second Python process holding memory of
  one prompt's size, reached over loopback TCP by 8 blocking sockets (the connector's pool),
  each served by a thread of its own there. "raw send": the chunks cut into contiguous batches
  of at most 8, at least 4 of them (the tier's writers each take up to 8 queued chunks and send
  them in one PUT frame), ``writers`` (4) threads at once, each sending its batch's chunks
  back to back on one connection (per chunk a 17-byte request and ``sendall`` of the chunk;
  the peer ``recv_into``-s it and answers 1 byte), then reading the acknowledgements. "raw
  recv": per chunk, a 17-byte request, the peer's ``sendall``, our ``recv_into`` of the chunk,
  ``readers`` (8) threads at once. Chunk i moves between region i of our memory and region i
  of the peer's, so, like the tier, the reference touches a whole prompt of distinct memory per
  sample; it sends random bytes of its own (not the tier's) and receives into a second buffer,
  which is overwritten before and compared with what was sent after every sample, untimed.
  That is what any Python store client and server must at least do for the same bytes at the
  same concurrency (the server also allocates and keeps each value, and serves every
  connection from one event-loop thread where the peer has a thread per connection; the tier
  adds a header, an EXISTS, checksums and, on retrieve, the copy into ``out``).

Target: store and retrieve each at >= 0.7x the raw socket. ``--quick``: 2 MiB chunks only.
"""

from __future__ import annotations

import queue
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
    POISON,
    Case,
    checked,
    only_tier,
    retrieve_case,
    store_case,
    thread_case,
    write_groups,
)
from lmplug_remote.lm.options import LmOptions
from lmplug_remote.tier import RemoteTier, RemoteTierConfig

NAME = "remote_lm"
SUMMARY = "L4 remote tier on lmplug-server: store/retrieve MiB/s vs same-run raw socket sendall/recv_into (>= 0.7x)"

TARGET = Target(">=", 0.7, relative=True)
SAMPLE_BYTES = 64 * MiB  # moved per sample (one prompt), per direction
SAMPLE_BYTES_QUICK = 16 * MiB
LARGEST_CHUNK = 32 * MiB
# The tier's concurrency, which the reference runs at: its defaults, read from the tier.
WRITERS: int = RemoteTierConfig.model_fields["writers"].default
READERS: int = RemoteTierConfig.model_fields["readers"].default
WRITE_BATCH = 8  # chunks one writer takes from the queue at most (lmplug_remote.tier's _WRITE_BATCH)
CONNECTIONS: int = LmOptions.model_fields["connections"].default


_REQUEST = struct.Struct("<cQQ")
# The reference's peer: serves argv[2] connections, each in a thread of its own, then exits when all are closed.
# "W"+offset+size: receive size bytes into its memory at offset, answer b"k"; "R"+offset+size: send size bytes of
# its memory from offset.
_PEER = """
import socket, struct, sys, threading
request = struct.Struct("<cQQ")
buffer = memoryview(bytearray(int(sys.argv[1])))
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)

def receive(connection, view):
    got = 0
    while got < len(view):
        n = connection.recv_into(view[got:])
        if not n:
            return False
        got += n
    return True

def serve(connection):
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = memoryview(bytearray(request.size))
    with connection:
        while receive(connection, head):
            op, offset, size = request.unpack(head)
            view = buffer[offset : offset + size]
            if op == b"W":
                if not receive(connection, view):
                    return
                connection.sendall(b"k")
            else:
                connection.sendall(view)

threads = [threading.Thread(target=serve, args=(listener.accept()[0],)) for _ in range(int(sys.argv[2]))]
listener.close()
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
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
    """The reference: blocking sockets to a peer process at the tier's concurrency (see the module docstring)."""

    def __init__(self, chunks: int, chunk_bytes: int, seed: int) -> None:
        size = chunks * chunk_bytes
        self.chunks = chunks
        self.chunk_bytes = chunk_bytes
        self.source = np.random.default_rng(seed).bytes(size)
        self.received = bytearray(size)
        self.groups = write_groups(chunks, WRITERS, WRITE_BATCH)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _PEER, str(size), str(CONNECTIONS)], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        port = int(self.process.stdout.readline())
        self.idle: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self.sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(CONNECTIONS)]
        for sock in self.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.idle.put(sock)
        self.senders = ThreadPoolExecutor(WRITERS, thread_name_prefix="bench-raw-send")
        self.receivers = ThreadPoolExecutor(READERS, thread_name_prefix="bench-raw-recv")
        self.send()  # the peer holds the prompt before the first "raw recv"

    @contextmanager
    def _borrow(self) -> Iterator[socket.socket]:
        sock = self.idle.get()
        try:
            yield sock
        finally:
            self.idle.put(sock)

    def _send_group(self, group: range) -> None:
        """The group's chunks back to back on one connection, then their acknowledgements (one round trip)."""
        source = memoryview(self.source)
        with self._borrow() as sock:
            for index in group:
                offset = index * self.chunk_bytes
                sock.sendall(_REQUEST.pack(b"W", offset, self.chunk_bytes))
                sock.sendall(source[offset : offset + self.chunk_bytes])
            _receive_into(sock, memoryview(bytearray(len(group))))

    def _receive_one(self, index: int) -> None:
        offset = index * self.chunk_bytes
        with self._borrow() as sock:
            sock.sendall(_REQUEST.pack(b"R", offset, self.chunk_bytes))
            _receive_into(sock, memoryview(self.received)[offset : offset + self.chunk_bytes])

    def send(self) -> float:
        start = time.perf_counter()
        for future in [self.senders.submit(self._send_group, group) for group in self.groups]:
            future.result()
        return time.perf_counter() - start

    def receive(self) -> float:
        np.frombuffer(self.received, dtype=np.uint8).fill(POISON)
        start = time.perf_counter()
        for _ in self.receivers.map(self._receive_one, range(self.chunks)):
            pass
        elapsed = time.perf_counter() - start
        if self.received != self.source:
            raise RuntimeError("the raw socket received other bytes than it sent")
        return elapsed

    def close(self) -> None:
        self.senders.shutdown()
        self.receivers.shutdown()
        for sock in self.sockets:
            sock.close()
        self.process.wait(30)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _receive_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        received = sock.recv_into(view[got:])
        if not received:
            raise RuntimeError("raw peer went away")
        got += received


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
    kv = torch.randn(shape, generator=torch.Generator().manual_seed(chunk_mib)).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    if kv.nbytes != sample_bytes:
        raise RuntimeError(f"geometry error: a prompt is {kv.nbytes} bytes, expected {sample_bytes}")
    # `stored` is stored by every store sample (and evicted after it); `held` is stored once.
    stored = np.arange(num_tokens, dtype=np.int32) + 1_000_000 * chunk_mib
    held = stored + num_tokens
    if backend == "trio":
        stored, held = stored + 500_000, held + 500_000  # the asyncio run's chunks may still be there

    peer = await anyio.to_thread.run_sync(_RawPeer, chunks, chunk_bytes, 1000 + chunk_mib)
    try:
        async with lmplug.open_cache(_config(num_layers, port)) as cache:
            tier = only_tier(cache, RemoteTier)
            if await cache.store(held, kv) != num_tokens:
                raise RuntimeError("the retrieve prompt was not stored")
            await tier.drain()
            cases: dict[str, Case] = {
                "raw send": thread_case(peer.send),
                "store": store_case(cache, only_tier(cache, RemoteTier), stored, kv),
                "raw recv": thread_case(peer.receive),
                "retrieve": checked(retrieve_case(cache, held, out), out, kv),
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
