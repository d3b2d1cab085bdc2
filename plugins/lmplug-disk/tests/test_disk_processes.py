"""Real processes: a kill -9 in the middle of writes, and two processes wanting one directory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import lmplug
from lmplug.testing import make_config, reference_kv

from disk_testing import chunk_files, prompt

WRITER = """
import json, sys, anyio, lmplug
from lmplug.testing import reference_kv

config = json.loads(sys.argv[1])

async def main():
    async with lmplug.open_cache(config) as cache:
        print("ready", flush=True)
        for seed in range(100_000):
            tokens = [(seed * 7717 + i * 13) % 30_000 for i in range(4 * 16)]
            await cache.store(tokens, reference_kv(tokens, config))
            await anyio.sleep(0)

anyio.run(main)
"""

HOLDER = """
import json, sys, anyio, lmplug

async def main():
    async with lmplug.open_cache(json.loads(sys.argv[1])):
        print("ready", flush=True)
        sys.stdin.readline()

anyio.run(main)
"""


def big_config(path: Path, **options: Any) -> dict[str, Any]:
    # 256 KiB chunks, so that a kill lands in the middle of file writes.
    return make_config(
        [{"type": "disk", "path": str(path), "capacity": "1GiB", "writers": 2, **options}],
        chunk_size=16,
        num_layers=8,
        num_kv_heads=8,
        head_size=64,
        dtype="float16",
    )


def _start(script: str, config: dict[str, Any], **kwargs: Any) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(config)], stdout=subprocess.PIPE, text=True, **kwargs
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


def temporaries(path: Path) -> list[Path]:
    """The files of chunk writes in flight (renamed into place once written)."""
    return list(path.glob("lmplug-*/??/*.tmp"))


def kill_9_in_the_middle_of_a_write(path: Path, config: dict[str, Any]) -> list[Path]:
    """Start a writer and SIGKILL it once 40 chunks are on disk and a write is in flight; the
    temporaries the kill left: those writes were cut off (none when the write seen just before
    the kill finished first)."""
    writer = _start(WRITER, config)
    try:
        deadline = time.monotonic() + 60
        while len(chunk_files(path)) < 40 or not temporaries(path):
            if time.monotonic() > deadline:
                pytest.fail("within 60 s, no 40 chunks on disk with a write in flight: nothing to kill in the middle")
            time.sleep(0.001)
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()  # type: ignore[union-attr]
    return temporaries(path)


async def test_kill_9_during_writes_leaves_a_consistent_cache(tmp_path: Path) -> None:
    for attempt in range(10):  # the write seen in flight may finish between the look and the kill
        path = tmp_path / f"attempt-{attempt}"
        config = big_config(path, fsync="always")  # fsync before rename: writes take long enough to catch
        if kill_9_in_the_middle_of_a_write(path, config):
            break
    else:
        pytest.fail("each of 10 kills came after the write in flight had finished")
    files_left = len(chunk_files(path))
    assert files_left >= 40
    async with lmplug.open_cache(config) as cache:
        stats = cache.statistics().tiers[0]
        assert stats.chunks == len(chunk_files(path)) <= files_left
        assert not temporaries(path)  # the writes the kill cut off left nothing behind
        served = 0
        for seed in range(stats.chunks // 4 + 8):
            tokens = prompt(seed, 4)
            kv, count = await cache.retrieve(tokens)
            assert torch.equal(kv, reference_kv(tokens, config)[:, :, :count])
            served += count // 16
        assert served >= stats.chunks - 8  # all but the last few stored prompts read back whole


async def test_a_second_process_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    config = big_config(tmp_path)
    holder = _start(HOLDER, config, stdin=subprocess.PIPE)
    try:
        with pytest.raises(lmplug.TierUnavailable, match=rf"in use by another lmplug process \(pid {holder.pid}\)"):
            async with lmplug.open_cache(config):
                pass
        other_rank = dict(config, world_size=2, rank=1)  # another rank's keys live in another directory
        async with lmplug.open_cache(other_rank):
            pass
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=30)
        holder.stdin.close()
        holder.stdout.close()  # type: ignore[union-attr]
    async with lmplug.open_cache(config):  # released on exit
        pass
