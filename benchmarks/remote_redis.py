"""L4 (``type: remote``, ``redis://``) store and retrieve throughput against raw redis-py SET/GET.

Geometry: chunk_size 256 tokens, bfloat16, 8 KV heads of 128 (hidden 1024), so one chunk is
``num_layers`` MiB; the number of layers picks the chunk size (2, 8, 32 MiB). The stack has one
tier, ``type: remote`` at a redis-server this benchmark starts on a free loopback port
(``--save "" --appendonly no``: memory only) and stops afterwards, with the tier's default
settings (``writers: 4``, ``readers: 8``, the connector's pool of 16 connections): a user's store
and retrieve run with those, so they are what is measured. One sample moves one prompt of 64 MiB
(8 MiB with ``--quick``) of random (``randn``) KV: several chunks.

- store: ``store`` plus ``tier.drain()`` (the write-behind queue empty: every chunk SET on the
  server, after the tier's EXISTS check) of chunks the server does not hold; they are evicted
  (UNLINKed) again after each sample, outside the timed section.
- retrieve: ``retrieve(tokens, out=preallocated)`` of chunks that are on the server and not in
  the write queue (stored and drained once, before sampling): GET, checksum verification and
  the copy into ``out``. ``out`` is overwritten before and compared with the stored KV after
  every sample, untimed.
- references, same server, same process, same run, at the tier's concurrency: a ``redis.Redis``
  client (redis-py defaults: hiredis parser and packer) on a blocking pool of the connector's
  16 connections, with random values of its own (one distinct ``bytes`` per chunk, so the CPU
  cache does not flatter it, and none shared with the tier's). "redis-py SET": the chunks cut
  into contiguous batches of at most 8, at least 4 of them (the tier's writers each take up to
  8 queued chunks and send them as one pipeline), one pipeline (a single ``SET`` for a batch of
  one) per batch, ``writers`` (4) threads at once, to keys the server does not hold (UNLINKed
  after each sample, untimed, as the tier's are). "redis-py GET": one ``GET`` per chunk of keys
  stored once, ``readers`` (8) threads at once; the values are compared with what was SET after
  each sample, untimed. The tier moves a header too, checks EXISTS before each batch, verifies
  every read and copies into ``out``, so the reference is the floor of what redis-py and the
  server do for the same payload at the same concurrency.

Both sides depend on process state beyond the connector: the core's chunk copies run through
torch's intra-op thread pool (with 2 threads on 2 busy cores a 2 MiB copy can take ~8 ms instead
of ~0.2 ms; ``--threads 1`` shows the rows without that), and redis-py's ``SET``/``GET`` of 2 MiB
are ~4x faster once glibc has raised its mmap threshold (after the process freed a large block):
the benchmark puts the process in that state first, so the reference is its fast self on both
event loops.

Target: store and retrieve each at >= 0.7x the raw client. ``--quick``: 2 MiB chunks only.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import redis
import torch

import lmplug
from benchmarks.harness import Backend, MiB, Result, Settings, Target, run_per_backend, sample_async
from benchmarks.tier_cases import (
    CHUNK_TOKENS,
    HEAD_SIZE,
    KV_HEADS,
    Case,
    checked,
    only_tier,
    retrieve_case,
    store_case,
    thread_case,
    write_groups,
)
from lmplug.testing import free_port
from lmplug_remote.redis.options import RedisOptions
from lmplug_remote.tier import RemoteTier, RemoteTierConfig

NAME = "remote_redis"
SUMMARY = "L4 remote tier on redis: store/retrieve MiB/s vs same-run raw redis-py SET/GET (target >= 0.7x)"

TARGET = Target(">=", 0.7, relative=True)
SAMPLE_BYTES = 64 * MiB  # moved per sample (one prompt), per direction
SAMPLE_BYTES_QUICK = 8 * MiB
# The tier's concurrency, which the reference runs at: its defaults, read from the tier.
WRITERS: int = RemoteTierConfig.model_fields["writers"].default
READERS: int = RemoteTierConfig.model_fields["readers"].default
WRITE_BATCH = 8  # chunks one writer takes from the queue at most (lmplug_remote.tier's _WRITE_BATCH)
CONNECTIONS: int = RedisOptions.model_fields["max_connections"].default


# ---------------------------------------------------------------------------- the server


@contextmanager
def _redis_server() -> Iterator[int]:
    """A redis-server on a free loopback port, in memory only, stopped on exit; yields the port."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is needed (apt-get install redis-server)")
    directory = Path(tempfile.mkdtemp(prefix="lmplug-bench-redis-"))
    port = free_port()
    arguments = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([*arguments, "--dir", str(directory)], stdout=subprocess.DEVNULL)
    try:
        with redis.Redis(port=port) as client:
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server on port {port} did not start") from None
                    time.sleep(0.02)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------- cases


def _config(num_layers: int, port: int) -> dict[str, Any]:
    return {
        "chunk_size": CHUNK_TOKENS,
        "model": {
            "name": "bench-redis",
            "num_layers": num_layers,
            "num_kv_heads": KV_HEADS,
            "head_size": HEAD_SIZE,
            "dtype": "bfloat16",
        },
        # The tier's defaults (writers 4, readers 8): what a user's store and retrieve get.
        "tiers": [{"type": "remote", "url": f"redis://127.0.0.1:{port}"}],
    }


class _RawClient:
    """The reference: redis-py's defaults at the tier's concurrency (see the module docstring).

    SETs go to keys the server does not hold (deleted again after each sample, untimed), as the
    tier's store samples do: a server that replaces a value of the same size reuses its memory, one
    that stores a new key must take fresh memory (2 MiB SETs measured ~1.4x faster as overwrites).
    """

    def __init__(self, port: int, chunks: int, chunk_bytes: int, seed: int) -> None:
        random = np.random.default_rng(seed)
        self.values = [random.bytes(chunk_bytes) for _ in range(chunks)]
        self.written = [f"bench/raw/new/{index}" for index in range(chunks)]
        self.held = [f"bench/raw/held/{index}" for index in range(chunks)]
        self.groups = write_groups(chunks, WRITERS, WRITE_BATCH)
        pool = redis.BlockingConnectionPool(port=port, max_connections=CONNECTIONS)  # type: ignore[no-untyped-call]
        self.client = redis.Redis(connection_pool=pool)
        self.setters = ThreadPoolExecutor(WRITERS, thread_name_prefix="bench-raw-set")
        self.getters = ThreadPoolExecutor(READERS, thread_name_prefix="bench-raw-get")
        self.got: list[Any] = [None] * chunks
        for name, value in zip(self.held, self.values, strict=True):
            self.client.set(name, value)

    def _set_group(self, group: range) -> None:
        if len(group) == 1:
            self.client.set(self.written[group[0]], self.values[group[0]])
            return
        with self.client.pipeline(transaction=False) as pipe:  # the tier's batches go out pipelined too
            for index in group:
                pipe.set(self.written[index], self.values[index])
            pipe.execute()

    def set(self) -> float:
        start = time.perf_counter()
        for future in [self.setters.submit(self._set_group, group) for group in self.groups]:
            future.result()
        elapsed = time.perf_counter() - start
        self.client.unlink(*self.written)
        return elapsed

    def _get(self, index: int) -> None:
        self.got[index] = self.client.get(self.held[index])

    def get(self) -> float:
        start = time.perf_counter()
        for _ in self.getters.map(self._get, range(len(self.held))):
            pass
        elapsed = time.perf_counter() - start
        got, self.got = self.got, [None] * len(self.held)
        if got != self.values:
            raise RuntimeError("a raw GET returned other bytes than were SET")
        return elapsed

    def close(self) -> None:
        self.setters.shutdown()
        self.getters.shutdown()
        self.client.close()


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
    # `stored` is stored by every store sample (and evicted after it, untimed); `held` is stored
    # once and retrieved by every retrieve sample.
    stored = np.arange(num_tokens, dtype=np.int32)
    held = stored + num_tokens
    raw = await anyio.to_thread.run_sync(_RawClient, port, chunks, chunk_bytes, 1000 + chunk_mib)
    try:
        async with lmplug.open_cache(_config(num_layers, port)) as cache:
            tier = only_tier(cache, RemoteTier)
            if await cache.store(held, kv) != num_tokens:
                raise RuntimeError("the retrieve prompt was not stored")
            await tier.drain()
            # Each subject next to its reference in every round; writes first, then reads.
            cases: dict[str, Case] = {
                "raw set": thread_case(raw.set),
                "store": store_case(cache, only_tier(cache, RemoteTier), stored, kv),
                "raw get": thread_case(raw.get),
                "retrieve": checked(retrieve_case(cache, held, out), out, kv),
            }
            stats = await sample_async(cases, settings)
            counters = tier.statistics()
            if counters.errors or counters.skipped_writes:
                raise RuntimeError(f"remote tier: {counters.errors} errors, {counters.skipped_writes} skipped writes")
    finally:
        await anyio.to_thread.run_sync(raw.close)

    rates = {name: value.inverted(sample_bytes / MiB) for name, value in stats.items()}
    label = f"{chunk_mib} MiB x{chunks} [{backend}]"
    return [
        Result(NAME, f"store {label}", "MiB/s", rates["store"], TARGET, rates["raw set"], "redis-py SET"),
        Result(NAME, f"retrieve out= {label}", "MiB/s", rates["retrieve"], TARGET, rates["raw get"], "redis-py GET"),
    ]


async def _main(settings: Settings, backend: Backend, port: int) -> list[Result]:
    sizes = (2,) if settings.quick else (2, 8, 32)
    results: list[Result] = []
    for chunk_mib in sizes:
        results += await _measure_size(chunk_mib, settings, backend, port)
    return results


def _settle_allocator() -> None:
    """Put glibc's malloc in the state a long-running process is in, before either side is timed.

    glibc serves blocks above its mmap threshold (128 KiB at start) with fresh mappings, and raises
    the threshold to the size of the first such block the process frees (up to 32 MiB). Until then
    every 2 MiB value redis-py packs or reads is a new mapping, page-faulted in: its SET and GET
    measured ~4x slower, so the reference depended on what the process had freed before (the first
    backend's 2 MiB rows ran against a slow reference, the second's against a fast one).
    """
    del_me = bytearray(31 * MiB)
    del del_me


def run(settings: Settings) -> list[Result]:
    _settle_allocator()
    with _redis_server() as port:

        async def main(settings: Settings, backend: Backend) -> list[Result]:
            return await _main(settings, backend, port)

        return run_per_backend(main, settings)
