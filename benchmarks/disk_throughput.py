"""L3 (``type: disk``) store and retrieve throughput against a same-run ``dd`` with O_DIRECT.

Geometry: chunk_size 256 tokens, bfloat16, 8 KV heads of 128 (hidden 1024), so one chunk is
``num_layers`` MiB; the number of layers picks the chunk size (2, 8, 32 MiB). The stack has
one tier, ``type: disk`` with ``io_mode: direct`` (so the core allocates chunks on the heap),
in a temporary directory under the repository (the filesystem the project lives on, not a
tmpfs), removed afterwards. Its capacity holds every chunk, so nothing is evicted behind our
back. One sample moves one prompt of 64 MiB (32 MiB with ``--quick``): several chunks.

- store: ``store`` plus ``tier.drain()`` (the write-behind queue empty: every file written
  and renamed into place) of chunks the tier does not hold; they are evicted again (files
  deleted) after each sample, outside the timed section.
- retrieve: ``retrieve(tokens, out=preallocated)`` of chunks that are on disk and not in the
  write queue (stored and drained once, before sampling), into a buffer from
  ``lmplug.empty_kv`` (4 KiB-aligned host memory, as ``dd``'s own buffer is): the tier reads
  each file with O_DIRECT straight into ``out``'s per-layer rows, so the page cache never
  serves it and nothing is copied. An info row retrieves into a buffer that starts 64 bytes
  past a 4 KiB boundary (torch's own alignment, on purpose never a block's): each file then
  lands in the reader thread's staging memory and that thread copies it into ``out``,
  overlapping the other readers' I/O.
- references: ``dd if=/dev/zero of=F bs=<chunk> count=<chunks> oflag=direct`` (no fsync: the
  tier does not fsync by default either; ``dd`` truncates and rewrites ``F`` every sample, as
  the tier writes new files) and ``dd if=G of=/dev/null bs=<chunk> iflag=direct`` of a file
  of the same size on the same filesystem. The reference is the wall time of the whole ``dd``
  process, nothing subtracted, which counts in the tier's favour: its start-up (1-2 ms, 2-3 %
  of a 64 MiB sample at 1 GB/s) and faulting in its block-sized buffer (about 1 GiB/s on the
  2-vCPU VM: a third or more of the time of a 64 MiB sample in 32 MiB blocks; the aligned
  file floor row below is the device without it).

Info rows (full runs only, measured on the first backend only):

- file floor: ``lmplug_disk.files.write_chunk_file`` / ``read_chunk_file`` (O_DIRECT, with
  the header and checksum) of the same chunks from and into 4 KiB-aligned memory, one file
  after another in one thread, with no cache or tier around them: what the tier's file
  format costs, and what the tier could reach.
- buffered: the tier with ``io_mode: buffered``. Its store is timed until the files are in
  the page cache (store + drain; the files are deleted while still dirty, so nothing reaches
  the disk); its retrieve is a cold read: the held files were fsynced once and are dropped
  from the page cache (``posix_fadvise(DONTNEED)``) before every sample.

Target: store and retrieve each at >= 0.8x dd. ``--quick``: 2 MiB chunks only, no info rows but the unaligned retrieve.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

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
from lmplug import tierkit
from lmplug.core.serde import ChunkHeader, payload_checksum
from lmplug_disk import files
from lmplug_disk.tier import DiskTier

NAME = "disk_throughput"
SUMMARY = "L3 disk store/retrieve MiB/s vs same-run dd O_DIRECT (target >= 0.8x)"

TARGET = Target(">=", 0.8, relative=True)
SAMPLE_BYTES = 64 * MiB  # moved per sample (one prompt), per direction
SAMPLE_BYTES_QUICK = 32 * MiB
REPO = Path(__file__).resolve().parents[1]
"""The temporary directory goes here: the filesystem the project is on (``/tmp`` may be a tmpfs)."""

IoMode = Literal["direct", "buffered"]


def _config(num_layers: int, path: Path, capacity: int, io_mode: IoMode) -> dict[str, Any]:
    return {
        "chunk_size": CHUNK_TOKENS,
        "model": {
            "name": "bench-disk",
            "num_layers": num_layers,
            "num_kv_heads": KV_HEADS,
            "head_size": HEAD_SIZE,
            "dtype": "bfloat16",
        },
        "tiers": [{"type": "disk", "path": str(path), "capacity": capacity, "io_mode": io_mode}],
    }


# ---------------------------------------------------------------------------- blocking helpers (worker threads)


def _dd(*arguments: str) -> float:
    """Seconds of one whole ``dd`` run (process start-up included)."""
    start = time.perf_counter()
    result = subprocess.run(["dd", *arguments, "status=none"], capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"dd {' '.join(arguments)} failed: {result.stderr.strip()}")
    return elapsed


def _chunk_files(root: Path) -> list[Path]:
    return sorted(root.glob(f"*/*{files.SUFFIX}"))


def _fsync_files(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _drop_cached(paths: list[Path]) -> None:
    """Drop the (clean) pages of ``paths`` from the page cache, so that the next read is cold."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _dropper(tier: DiskTier) -> Callable[[], Awaitable[None]]:
    """Drop the tier's files from the page cache (a cold read follows)."""

    async def drop() -> None:
        await anyio.to_thread.run_sync(_drop_cached, _chunk_files(tier.root))

    return drop


def _aligned(nbytes: int) -> torch.Tensor:
    """``nbytes`` of written (so faulted-in) host memory starting on a 4 KiB boundary."""
    raw = torch.ones(nbytes + files.BLOCK, dtype=torch.uint8)
    skip = -raw.data_ptr() % files.BLOCK
    return raw[skip : skip + nbytes]


class _FileFloor:
    """Chunk files written and read with :mod:`lmplug_disk.files` alone, from and into aligned memory."""

    def __init__(self, root: Path, layout: tierkit.KVLayout, chunks: int) -> None:
        self.layout = layout
        nbytes = layout.nbytes(CHUNK_TOKENS)
        self.buffers = [_aligned(nbytes) for _ in range(chunks)]
        # Disjoint keys: `written` are written by every write sample (and deleted after it, untimed);
        # `held` are written once and read by every read sample.
        self.written = [self._path(root, tierkit.ChunkKey(os.urandom(24))) for _ in range(chunks)]
        self.held = [self._path(root, tierkit.ChunkKey(os.urandom(24))) for _ in range(chunks)]
        self._write(self.held)

    @staticmethod
    def _path(root: Path, key: tierkit.ChunkKey) -> tuple[Path, tierkit.ChunkKey]:
        path = files.chunk_path(root, key, CHUNK_TOKENS)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, key

    def _write(self, targets: list[tuple[Path, tierkit.ChunkKey]]) -> None:
        for (path, key), buffer in zip(targets, self.buffers, strict=True):
            payload = buffer.numpy().data.cast("B")
            header = ChunkHeader.for_chunk(key, self.layout, CHUNK_TOKENS, payload_checksum(payload))
            files.write_chunk_file(path, header, payload, buffer.data_ptr(), direct=True, fsync=False)

    def write(self) -> float:
        start = time.perf_counter()
        self._write(self.written)
        elapsed = time.perf_counter() - start
        files.remove_files([path for path, _ in self.written])
        return elapsed

    def read(self) -> float:
        start = time.perf_counter()
        for (path, key), buffer in zip(self.held, self.buffers, strict=True):
            files.read_chunk_file(path, key, self.layout, CHUNK_TOKENS, buffer.numpy().data.cast("B"), direct=True)
        return time.perf_counter() - start


# ---------------------------------------------------------------------------- cases


# ---------------------------------------------------------------------------- one chunk size


async def _measure_size(
    chunk_mib: int, settings: Settings, backend: Backend, workdir: Path, extras: bool
) -> list[Result]:
    num_layers = chunk_mib  # 2 (K, V) * layers * 256 tokens * 1024 hidden * 2 bytes = layers MiB
    chunk_bytes = chunk_mib * MiB
    chunks = max(1, (SAMPLE_BYTES_QUICK if settings.quick else SAMPLE_BYTES) // chunk_bytes)
    sample_bytes = chunks * chunk_bytes
    num_tokens = chunks * CHUNK_TOKENS
    shape = (2, num_layers, num_tokens, KV_HEADS * HEAD_SIZE)
    # Written, not just allocated: reading never-touched pages would read the shared zero page.
    kv = torch.ones(shape, dtype=torch.bfloat16)
    # torch's own alignment is 64 bytes, but a plain buffer may still land on a 4 KiB boundary:
    # start this one 64 bytes past one, so the unaligned rows never measure O_DIRECT by chance.
    out = tierkit.aligned_empty(kv.nbytes + 64, pin_memory=False)[64:].view(torch.bfloat16).view(shape).zero_()
    if out.data_ptr() % tierkit.IO_ALIGNMENT == 0:
        raise RuntimeError("the unaligned retrieve buffer is 4 KiB-aligned")
    if kv.nbytes != sample_bytes:
        raise RuntimeError(f"geometry error: a prompt is {kv.nbytes} bytes, expected {sample_bytes}")
    # `stored` is stored by every store sample (and evicted after it, untimed); `held` is stored
    # once and retrieved by every retrieve sample. The capacity holds both, and a file to spare.
    stored = np.arange(num_tokens, dtype=np.int32)
    held = stored + num_tokens
    capacity = (2 * chunks + 1) * files.file_size(chunk_bytes)
    free = shutil.disk_usage(workdir).free
    if free < 8 * sample_bytes:
        raise RuntimeError(f"{workdir}: {free} bytes free, {8 * sample_bytes} needed")

    here = workdir / f"{chunk_mib}mib-{backend}"
    dd_write, dd_read = here / "dd-write", here / "dd-read"
    block = f"bs={chunk_bytes}"
    await anyio.to_thread.run_sync(lambda: here.mkdir())
    await anyio.to_thread.run_sync(_dd, "if=/dev/zero", f"of={dd_read}", block, f"count={chunks}", "oflag=direct")

    modes: tuple[IoMode, ...] = ("direct", "buffered") if extras else ("direct",)
    caches = {mode: lmplug.open_cache(_config(num_layers, here / mode, capacity, mode)) for mode in modes}
    try:
        async with contextlib.AsyncExitStack() as stack:
            for cache in caches.values():
                await stack.enter_async_context(cache)
            for mode, cache in caches.items():
                tier = only_tier(cache, DiskTier)
                if tier.direct != (mode == "direct"):
                    raise RuntimeError(f"the {mode} tier uses {'O_DIRECT' if tier.direct else 'buffered'} I/O")
                if await cache.store(held, kv) != num_tokens:
                    raise RuntimeError("the retrieve prompt was not stored")
                await tier.drain()
                if mode == "buffered":
                    await anyio.to_thread.run_sync(_fsync_files, _chunk_files(tier.root))

            # Each subject next to its reference in every round; writes first, then reads.
            cases: dict[str, Case] = {
                "dd write": thread_case(
                    lambda: _dd("if=/dev/zero", f"of={dd_write}", block, f"count={chunks}", "oflag=direct")
                ),
                "store": store_case(caches["direct"], only_tier(caches["direct"], DiskTier), stored, kv),
            }
            if extras:
                floor = await anyio.to_thread.run_sync(_FileFloor, here / "floor", caches["direct"].layout, chunks)
                cases["floor write"] = thread_case(floor.write)
                cases["store buffered"] = store_case(
                    caches["buffered"], only_tier(caches["buffered"], DiskTier), stored, kv
                )
            cases["dd read"] = thread_case(lambda: _dd(f"if={dd_read}", "of=/dev/null", block, "iflag=direct"))
            aligned = lmplug.empty_kv(caches["direct"].layout, num_tokens)
            aligned.zero_()  # faulted in, as `out` is
            cases["retrieve"] = retrieve_case(caches["direct"], held, aligned)
            cases["retrieve unaligned"] = retrieve_case(caches["direct"], held, out)
            if extras:
                cases["floor read"] = thread_case(floor.read)
                cases["retrieve buffered"] = retrieve_case(
                    caches["buffered"], held, out, before=_dropper(only_tier(caches["buffered"], DiskTier))
                )
            stats = await sample_async(cases, settings)
            if not (torch.equal(aligned, kv) and torch.equal(out, kv)):
                raise RuntimeError("retrieve returned other bytes than were stored")

            for mode, cache in caches.items():
                counters = only_tier(cache, DiskTier).statistics()
                # Only our own evict() calls may have evicted: one per store sample and chunk.
                expected = (settings.warmup + settings.repeats) * chunks
                if counters.evictions != expected or counters.errors or counters.skipped_writes:
                    raise RuntimeError(
                        f"{mode} tier: {counters.evictions} evictions ({expected} expected), "
                        f"{counters.errors} write errors, {counters.skipped_writes} skipped writes"
                    )
    finally:
        await anyio.to_thread.run_sync(shutil.rmtree, here)

    rates = {name: value.inverted(sample_bytes / MiB) for name, value in stats.items()}
    write, read = rates["dd write"], rates["dd read"]
    label = f"{chunk_mib} MiB x{chunks} [{backend}]"
    results = [
        Result(NAME, f"store {label}", "MiB/s", rates["store"], TARGET, write, "dd"),
        Result(NAME, f"retrieve out= {label}", "MiB/s", rates["retrieve"], TARGET, read, "dd"),
        Result(NAME, f"retrieve out= unaligned {label}", "MiB/s", rates["retrieve unaligned"], None, read, "dd"),
    ]
    if extras:
        results += [
            Result(NAME, f"file floor write (aligned) {label}", "MiB/s", rates["floor write"], None, write, "dd"),
            Result(NAME, f"file floor read (aligned) {label}", "MiB/s", rates["floor read"], None, read, "dd"),
            Result(NAME, f"store buffered (page cache) {label}", "MiB/s", rates["store buffered"], None, write, "dd"),
            Result(NAME, f"retrieve buffered (cold) {label}", "MiB/s", rates["retrieve buffered"], None, read, "dd"),
        ]
    return results


async def _main(settings: Settings, backend: Backend, workdir: Path) -> list[Result]:
    sizes = (2,) if settings.quick else (2, 8, 32)
    extras = not settings.quick and backend == settings.backends[0]
    results: list[Result] = []
    for chunk_mib in sizes:
        results += await _measure_size(chunk_mib, settings, backend, workdir, extras)
    return results


def run(settings: Settings) -> list[Result]:
    if shutil.which("dd") is None:
        raise RuntimeError("dd (coreutils) is needed for the reference")
    workdir = Path(tempfile.mkdtemp(prefix=".bench-disk-", dir=REPO))
    try:

        async def main(settings: Settings, backend: Backend) -> list[Result]:
            return await _main(settings, backend, workdir)

        return run_per_backend(main, settings)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
