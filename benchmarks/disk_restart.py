"""Start-up of the L3 (``type: disk``) tier over a directory a past run filled: the index rebuild.

Set-up (not timed): 100,000 chunk files (2,000 with ``--quick``) are created in the tier's
directory, in a temporary directory under the repository (the project's filesystem), removed
afterwards. Tiny geometry (chunk_size 16 tokens, 1 layer, 1 KV head of 64, float16: a 4 KiB
payload), so every file is 8 KiB: the 4 KiB header block and one payload block. The first
file is written with ``lmplug_disk.files.write_chunk_file``; the rest get the same bytes
with their own header, written directly (byte-for-byte what ``write_chunk_file`` writes,
checked, at several times its speed).

Timed, per sample: ``open_cache(config)`` entry (``async with`` until the body runs: config,
plugins, the tier's directory lock, O_DIRECT probe and scan, the LRU index sorted by file
time), and the tier's own ``scan_seconds`` (lock, probe and directory scan, in its worker
thread) from the same open. Every open must index every file. Reference, interleaved: a bare
walk of the same tree in a worker thread, ``os.scandir`` of each shard directory and
``entry.stat()`` of each file, which is the least a rebuild from file names and times can do.

The directory and inode caches are warm (the files were just created, and every sample
reads the same tree), as in a restart of the engine on a running machine; a first start
after a reboot also reads directory blocks and inodes from disk.

Targets: open_cache <= 2 s for 100k files (none with ``--quick``, where the fixed cost of
opening a cache dominates); the tier's scan <= 3x the bare walk.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import torch

import lmplug
from benchmarks.harness import Backend, Result, Settings, Stats, Target, run_per_backend, sample_async
from lmplug import tierkit
from lmplug.core.serde import ChunkHeader, payload_checksum
from lmplug_disk import files
from lmplug_disk.tier import DiskTier

NAME = "disk_restart"
SUMMARY = "L3 disk start-up index rebuild of 100k chunk files (target <= 2 s, scan <= 3x bare walk)"

CHUNK_TOKENS = 16
FILES = 100_000
FILES_QUICK = 2_000
OPEN_BOUND = 2.0  # seconds for FILES files
SCAN_TARGET = Target("<=", 3.0, relative=True)
REPO = Path(__file__).resolve().parents[1]
"""The temporary directory goes here: the filesystem the project is on (``/tmp`` may be a tmpfs)."""


def _config(path: Path, count: int) -> dict[str, Any]:
    return {
        "chunk_size": CHUNK_TOKENS,
        "model": {"name": "bench-restart", "num_layers": 1, "num_kv_heads": 1, "head_size": 64, "dtype": "float16"},
        "tiers": [{"type": "disk", "path": str(path), "capacity": 2 * count * 2 * files.BLOCK}],
    }


def _disk_tier(cache: lmplug.Cache) -> DiskTier:
    tier = cache.pipeline.slots[0].tier
    if not isinstance(tier, DiskTier):
        raise RuntimeError(f"expected the disk tier, got {type(tier).__name__}")
    return tier


def _populate(root: Path, layout: tierkit.KVLayout, fingerprint: bytes, count: int) -> None:
    """``count`` valid 8 KiB chunk files under ``root`` (the tier's directory), with random keys.

    Written by one thread per CPU, each with its own shard directories (creating files is
    mostly kernel time, and on a small VM two threads make them several times faster than one).
    """
    tensor = torch.ones(layout.shape(CHUNK_TOKENS), dtype=layout.dtype)
    payload = tensor.view(torch.uint8).reshape(-1).numpy().data.cast("B")
    if files.file_size(payload.nbytes) != 2 * files.BLOCK:
        raise RuntimeError(f"geometry error: a chunk file would be {files.file_size(payload.nbytes)} bytes")
    checksum = payload_checksum(payload)
    padded = bytes(payload).ljust(files.round_up(payload.nbytes), b"\0")
    randbytes = random.Random(20240601).randbytes
    keys = [tierkit.ChunkKey(fingerprint + randbytes(16)) for _ in range(count)]
    for shard in range(256):
        (root / f"{shard:02x}").mkdir(parents=True, exist_ok=True)

    def contents(key: tierkit.ChunkKey) -> tuple[Path, ChunkHeader, bytes]:
        header = ChunkHeader.for_chunk(key, layout, CHUNK_TOKENS, checksum)
        return files.chunk_path(root, key, CHUNK_TOKENS), header, header.pack().ljust(files.BLOCK, b"\0") + padded

    path, header, data = contents(keys[0])
    files.write_chunk_file(path, header, payload, tensor.data_ptr(), direct=False, fsync=False)
    if path.read_bytes() != data:
        raise RuntimeError("the chunk files made here differ from what write_chunk_file writes")

    workers = max(1, min(os.cpu_count() or 1, 8))

    def write(part: int) -> None:
        for key in keys[1:]:
            if key[-1] % workers != part:  # the shard is the key's last byte
                continue
            path, _, data = contents(key)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                if os.write(fd, data) != len(data):
                    raise RuntimeError(f"short write to {path}")
            finally:
                os.close(fd)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(write, range(workers)))


def _remove(workdir: Path) -> None:
    """Delete the tree, one thread per CPU over the shard directories, then the rest."""
    shards = [shard for tier in workdir.glob("lmplug-*") for shard in tier.iterdir() if shard.is_dir()]
    with ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, 8))) as pool:
        list(pool.map(functools.partial(shutil.rmtree, ignore_errors=True), shards))
    shutil.rmtree(workdir, ignore_errors=True)


def _walk(root: Path, count: int) -> float:
    """Seconds of a bare ``scandir`` + ``stat`` walk of the tier's tree."""
    start = time.perf_counter()
    found = 0
    for shard in os.scandir(root):
        if shard.is_dir(follow_symlinks=False):
            for entry in os.scandir(shard.path):
                entry.stat(follow_symlinks=False)
                found += 1
    elapsed = time.perf_counter() - start
    if found != count:
        raise RuntimeError(f"the walk found {found} files, {count} expected")
    return elapsed


async def _main(settings: Settings, backend: Backend, workdir: Path, root: Path, count: int) -> list[Result]:
    config = _config(workdir, count)
    scans: list[float] = []

    async def open_cache() -> float:
        start = time.perf_counter()
        async with lmplug.open_cache(config) as cache:
            elapsed = time.perf_counter() - start
            tier = _disk_tier(cache)
            indexed = tier.statistics().chunks
            if indexed != count or tier.root != root:
                raise RuntimeError(f"the tier indexed {indexed} of {count} files under {tier.root}")
            scans.append(tier.scan_seconds)
        return elapsed

    async def walk() -> float:
        return await anyio.to_thread.run_sync(_walk, root, count)

    stats = await sample_async({"open": open_cache, "walk": walk}, settings)
    scan = Stats.of(scans[-settings.repeats :])  # the sampled opens, not the warm-up ones
    label = f"{count // 1000}k files [{backend}]"
    # A 2k tree (--quick) is a smoke run: the fixed cost of opening a cache dominates it, so no bound.
    bound = Target("<=", OPEN_BOUND) if count == FILES else None
    return [
        Result(NAME, f"open_cache {label}", "s", stats["open"], bound, stats["walk"], "walk"),
        Result(NAME, f"tier scan (scan_seconds) {label}", "s", scan, SCAN_TARGET, stats["walk"], "walk"),
    ]


async def _setup(workdir: Path, count: int) -> Path:
    """Open the tier once over an empty directory (for its path and key fingerprint), then fill it."""
    async with lmplug.open_cache(_config(workdir, count)) as cache:
        root = _disk_tier(cache).root
        layout = cache.layout
        fingerprint = cache.keymaker.fingerprint
    await anyio.to_thread.run_sync(_populate, root, layout, fingerprint, count)
    return root


def run(settings: Settings) -> list[Result]:
    count = FILES_QUICK if settings.quick else FILES
    workdir = Path(tempfile.mkdtemp(prefix=".bench-restart-", dir=REPO))
    try:
        free = shutil.disk_usage(workdir).free
        if free < 4 * count * 2 * files.BLOCK:
            raise RuntimeError(f"{workdir}: {free} bytes free, {4 * count * 2 * files.BLOCK} needed")
        root = anyio.run(_setup, workdir, count)

        async def main(settings: Settings, backend: Backend) -> list[Result]:
            return await _main(settings, backend, workdir, root, count)

        return run_per_backend(main, settings)
    finally:
        _remove(workdir)
