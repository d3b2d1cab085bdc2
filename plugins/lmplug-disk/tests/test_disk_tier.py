"""The disk tier: persistence, promotion, capacity, write-behind, and every way a file goes bad."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import lmplug
from lmplug import tierkit
from lmplug.testing import reference_kv
from lmplug_disk import files

from disk_testing import CHUNK, CHUNK_FILE, chunk_files, disk_config, prompt, store_on_disk_only


def disk_tier(cache: lmplug.Cache) -> tierkit.Tier:
    return cache.pipeline.slots[-1].tier


async def test_direct_io_is_used_where_the_filesystem_allows(tmp_path: Path) -> None:
    async with lmplug.open_cache(disk_config(tmp_path)) as cache:
        assert disk_tier(cache).direct is True  # type: ignore[attr-defined]
    async with lmplug.open_cache(disk_config(tmp_path, io_mode="buffered")) as cache:
        assert disk_tier(cache).direct is False  # type: ignore[attr-defined]


async def test_files_have_the_documented_layout(tmp_path: Path) -> None:
    config = disk_config(tmp_path)
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(1, 2)
        await cache.store(tokens, reference_kv(tokens, config))
        await disk_tier(cache).drain()
        keys = cache.keys(tokens)
    paths = chunk_files(tmp_path)
    assert len(paths) == 2
    assert {p.name for p in paths} == {f"{key.hex()}.{CHUNK}.kv" for key in keys}
    assert all(p.stat().st_size == CHUNK_FILE for p in paths)
    assert paths[0].read_bytes()[:8] == b"LMPLUGKV"


async def test_the_cache_survives_a_restart(tmp_path: Path) -> None:
    config = disk_config(tmp_path, cpu=True)
    tokens = prompt(2, 5)
    async with lmplug.open_cache(config) as cache:
        await cache.store(tokens, reference_kv(tokens, config))
    async with lmplug.open_cache(config) as cache:
        assert cache.statistics().tiers[1].chunks == 5
        assert await cache.lookup(tokens) == len(tokens)
        kv, count = await cache.retrieve(tokens)
        assert count == len(tokens)
        assert torch.equal(kv, reference_kv(tokens, config))


async def test_written_files_are_announced_and_listed_after_a_restart(tmp_path: Path) -> None:
    """What a peer tier advertises: admissions when a write completes, and every file after a restart."""
    admitted: list[list[tierkit.ChunkKey]] = []

    class Watcher:
        def admitted(self, tier: str, keys: Any) -> None:
            if tier != "cpu":
                admitted.append(list(keys))

        def evicted(self, tier: str, keys: Any) -> None:
            return None

    config = disk_config(tmp_path, cpu=True)
    tokens = prompt(7, 3)
    async with lmplug.open_cache(config) as cache:
        disk = disk_tier(cache)
        disk.context.watch(Watcher())
        await cache.store(tokens, reference_kv(tokens, config))
        await disk.drain()
        keys = cache.keys(tokens)
    assert sorted(key for batch in admitted for key in batch) == sorted(keys)
    async with lmplug.open_cache(config) as cache:
        held = await cache.pipeline.slots[0].tier.context.local_tiers().held_keys()
    assert sorted(held[disk.name]) == sorted(keys)


async def test_a_disk_hit_is_promoted_into_l1(tmp_path: Path) -> None:
    config = disk_config(tmp_path, cpu=True)
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(3, 3)
        await store_on_disk_only(cache, tokens, config)
        kv, count = await cache.retrieve(tokens)
        assert count == len(tokens)
        assert torch.equal(kv, reference_kv(tokens, config))
        assert await cache.pipeline.slots[0].contains(cache.keys(tokens)) == 3
        assert cache.statistics().tiers[1].hits == 3


async def test_store_returns_before_the_disk_write_and_queued_chunks_are_served(tmp_path: Path) -> None:
    config = disk_config(tmp_path, writers=1)
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(4, 4)
        await cache.store(tokens, reference_kv(tokens, config))
        stats = cache.statistics().tiers[0]
        assert stats.pending_writes + stats.chunks == 4
        kv, count = await cache.retrieve(tokens)  # from the queue or from the files: the same KV
        assert count == len(tokens)
        assert torch.equal(kv, reference_kv(tokens, config))
        await disk_tier(cache).drain()
        assert cache.statistics().tiers[0].pending_writes == 0
        assert len(chunk_files(tmp_path)) == 4


@pytest.mark.parametrize("cpu", [True, False], ids=["cpu+disk", "disk"])
async def test_storing_the_same_tokens_again_writes_each_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu: bool
) -> None:
    """A store does not ask the (write-behind) disk what it holds: the tier skips what it has
    queued or indexed itself."""
    written: list[str] = []
    write = files.write_chunk_file

    def spy(path: Path, *args: Any, **kwargs: Any) -> None:
        write(path, *args, **kwargs)
        written.append(path.name)  # once written (a first write into a missing directory is retried)

    monkeypatch.setattr(files, "write_chunk_file", spy)
    config = disk_config(tmp_path, cpu=cpu)
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(12, 3)
        kv = reference_kv(tokens, config)
        for _ in range(2):  # the second while the first is queued
            assert await cache.store(tokens, kv) == len(tokens)
        await disk_tier(cache).drain()
        if cpu:
            await cache.evict(tokens, tiers=["cpu"])  # L1 lacks them: the store offers them to the disk again
        assert await cache.store(tokens, kv) == len(tokens)
        await disk_tier(cache).drain()
        assert sorted(written) == sorted(path.name for path in chunk_files(tmp_path))
        assert len(written) == 3
        assert cache.statistics().tiers[-1].stored == 3


async def test_a_full_write_queue_skips_instead_of_blocking(tmp_path: Path) -> None:
    config = disk_config(tmp_path, writers=1, write_queue=2)
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(5, 12)
        assert await cache.store(tokens, reference_kv(tokens, config)) == len(tokens)
        stats = cache.statistics().tiers[0]
        assert stats.skipped_writes > 0
        assert b"lmplug_tier_skipped_writes_total" in cache.metrics.render()


async def test_capacity_evicts_least_recently_used_files(tmp_path: Path) -> None:
    config = disk_config(tmp_path, capacity=4 * CHUNK_FILE)
    async with lmplug.open_cache(config) as cache:
        tier = disk_tier(cache)
        first, second, third = prompt(6, 2), prompt(7, 2), prompt(8, 2)
        for tokens in (first, second):
            await cache.store(tokens, reference_kv(tokens, config))
            await tier.drain()
        await cache.retrieve(first)  # first is now more recent than second
        await cache.store(third, reference_kv(third, config))
        await tier.drain()
        assert await cache.lookup(first) == len(first)
        assert await cache.lookup(second) == 0
        assert await cache.lookup(third) == len(third)
        stats = cache.statistics().tiers[0]
        assert stats.used_bytes <= 4 * CHUNK_FILE
    assert len(chunk_files(tmp_path)) == 4


async def test_evict_on_command_removes_files(tmp_path: Path) -> None:
    config = disk_config(tmp_path)
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(9, 3)
        await cache.store(tokens, reference_kv(tokens, config))
        assert await cache.evict(tokens) == {"disk": 3}  # some may still be queued: cancelled
        await disk_tier(cache).drain()
        assert await cache.lookup(tokens) == 0
    assert chunk_files(tmp_path) == []


def _corrupt_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[4096 + 100] ^= 0xFF
    path.write_bytes(bytes(data))


def _corrupt_truncate(path: Path) -> None:
    os.truncate(path, 4096 + 1000)


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[20] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage", [_corrupt_flip, _corrupt_truncate, _corrupt_header], ids=["payload", "truncated", "header"]
)
async def test_a_damaged_file_is_a_miss_and_is_removed(
    tmp_path: Path, damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    config = disk_config(tmp_path)
    tokens = prompt(10, 3)
    async with lmplug.open_cache(config) as cache:
        await cache.store(tokens, reference_kv(tokens, config))
        await disk_tier(cache).drain()
        second = next(p for p in chunk_files(tmp_path) if p.name.startswith(cache.keys(tokens)[1].hex()))
        damage(second)  # type: ignore[operator]
        kv, count = await cache.retrieve(tokens)
        assert count == CHUNK  # the first chunk is fine; the damaged one is a miss
        assert torch.equal(kv, reference_kv(tokens, config)[:, :, :CHUNK])
        assert not second.exists()
        assert await cache.lookup(tokens) == CHUNK
        # The third file, read in parallel with the damaged one, is intact and stays.
        assert await cache.pipeline.slots[0].contains(cache.keys(tokens)[2:]) == 1
    assert any("dropped" in record.getMessage() for record in caplog.records)


async def test_a_foreign_file_under_a_chunk_name_is_never_served(tmp_path: Path) -> None:
    config = disk_config(tmp_path)
    first, second = prompt(11, 1), prompt(12, 1)
    async with lmplug.open_cache(config) as cache:
        for tokens in (first, second):
            await cache.store(tokens, reference_kv(tokens, config))
        await disk_tier(cache).drain()
        key_a, key_b = cache.keys(first)[0].hex(), cache.keys(second)[0].hex()
    path_a = next(p for p in chunk_files(tmp_path) if p.name.startswith(key_a))
    path_b = next(p for p in chunk_files(tmp_path) if p.name.startswith(key_b))
    shutil.copy(path_a, path_b)  # right size, valid checksum, wrong key
    async with lmplug.open_cache(config) as cache:
        _, count = await cache.retrieve(second)
        assert count == 0
        assert not path_b.exists()
        kv, count = await cache.retrieve(first)
        assert torch.equal(kv, reference_kv(first, config))


async def test_restart_removes_partial_and_stray_files(tmp_path: Path) -> None:
    config = disk_config(tmp_path)
    tokens = prompt(13, 2)
    async with lmplug.open_cache(config) as cache:
        await cache.store(tokens, reference_kv(tokens, config))
    shard = chunk_files(tmp_path)[0].parent
    (shard / "deadbeef.kv.123-456.tmp").write_bytes(b"partial")
    (shard / "not-a-chunk").write_bytes(b"?")
    truncated = chunk_files(tmp_path)[1]
    os.truncate(truncated, 100)
    async with lmplug.open_cache(config) as cache:
        assert cache.statistics().tiers[0].chunks == 1
    assert not (shard / "deadbeef.kv.123-456.tmp").exists()
    assert not (shard / "not-a-chunk").exists()
    assert not truncated.exists()


async def test_a_vanished_directory_is_recreated(tmp_path: Path) -> None:
    config = disk_config(tmp_path, cpu=True)
    async with lmplug.open_cache(config) as cache:
        first = prompt(14, 2)
        await cache.store(first, reference_kv(first, config))
        await disk_tier(cache).drain()
        shutil.rmtree(tmp_path / next(p.name for p in tmp_path.iterdir()))
        await cache.evict(first, tiers=["cpu"])
        _, count = await cache.retrieve(first)
        assert count == 0  # its files are gone: a miss, not an error
        second = prompt(15, 2)
        await cache.store(second, reference_kv(second, config))
        await disk_tier(cache).drain()
        await cache.evict(second, tiers=["cpu"])
        kv, count = await cache.retrieve(second)
        assert torch.equal(kv, reference_kv(second, config))


async def test_a_full_disk_is_reported_once_and_the_engine_keeps_serving(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = disk_config(small_fs, cpu=True, capacity="64MiB")  # the filesystem holds far less
    with caplog.at_level(logging.WARNING, logger="lmplug.disk"):
        async with lmplug.open_cache(config) as cache:
            for seed in range(8):
                tokens = prompt(100 + seed, 4)
                assert await cache.store(tokens, reference_kv(tokens, config)) == len(tokens)
                await disk_tier(cache).drain()
                kv, _ = await cache.retrieve(tokens)
                assert torch.equal(kv, reference_kv(tokens, config))
            stats = cache.statistics().tiers[1]
            assert stats.errors > 0
            assert stats.chunks * CHUNK_FILE <= 256 * 1024
    warnings = [r for r in caplog.records if "No space left on device" in r.getMessage()]
    assert len(warnings) == 1


PERMISSION_SCRIPT = """
import json, sys, anyio, torch, lmplug
from lmplug.testing import reference_kv
from lmplug_disk import files

config = json.loads(sys.argv[1])
tokens = json.loads(sys.argv[2])

async def main():
    async with lmplug.open_cache(config) as cache:
        stored = await cache.store(tokens, reference_kv(tokens, config))
        await cache.pipeline.slots[1].tier.drain()
        kv, count = await cache.retrieve(tokens)
        ok = torch.equal(kv, reference_kv(tokens, config))
        print(json.dumps({"stored": stored, "count": count, "ok": ok, "errors": cache.statistics().tiers[1].errors}))

anyio.run(main)
"""


def test_permission_denied_degrades_to_skipped_writes(tmp_path: Path) -> None:
    """A process that may not write the chunk directories keeps serving from L1, and says why once."""
    import json
    import sys

    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and util-linux setpriv to run a process without permission overrides")
    config = disk_config(tmp_path, cpu=True)
    tokens = prompt(16, 3)
    command = [sys.executable, "-c", PERMISSION_SCRIPT, json.dumps(config), json.dumps(tokens)]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    assert json.loads(first.stdout)["errors"] == 0
    root = next(tmp_path.iterdir())
    for path in chunk_files(tmp_path):
        path.unlink()
    for index in range(256):
        shard = root / f"{index:02x}"
        shard.mkdir(exist_ok=True)
        shard.chmod(0o555)  # nobody may write, and this process will not be allowed to override it
    # Root without CAP_DAC_OVERRIDE is held to the permission bits, as any other user is.
    result = subprocess.run(
        [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *command],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"stored": len(tokens), "count": len(tokens), "ok": True, "errors": 3}
    assert "Permission denied" in result.stderr
    assert result.stderr.count("cannot write") == 1  # reported once, not per chunk


async def test_too_small_a_capacity_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(lmplug.ConfigError, match="cannot hold one chunk file"):
        async with lmplug.open_cache(disk_config(tmp_path, capacity=4096)):
            pass


async def test_an_unusable_path_is_a_clear_startup_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(lmplug.TierUnavailable, match="cannot use"):
        async with lmplug.open_cache(disk_config(blocker)):
            pass


async def test_writes_wait_while_reads_are_in_flight(tmp_path: Path) -> None:
    config = disk_config(tmp_path, cpu=True)
    async with lmplug.open_cache(config) as cache:
        tier = disk_tier(cache)
        tier._reads_in_flight = 1  # type: ignore[attr-defined]  # as if an engine's load were reading
        tokens = prompt(18, 2)
        await cache.store(tokens, reference_kv(tokens, config))
        await anyio.sleep(0.2)
        assert chunk_files(tmp_path) == []  # the writers hold back
        tier._reads_in_flight = 0  # type: ignore[attr-defined]
        tier._reads_done.set()  # type: ignore[attr-defined]
        await tier.drain()
        assert len(chunk_files(tmp_path)) == 2


@pytest.mark.parametrize("io_mode", ["direct", "buffered"])
async def test_large_chunks_are_read_in_parallel_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, io_mode: str
) -> None:
    monkeypatch.setattr(files, "SEGMENT", 4096)  # 7 KiB chunks: a full block and an unaligned tail each
    config = disk_config(tmp_path, cpu=True, io_mode=io_mode)
    config["model"].update(num_layers=7)
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(19, 6)
        await store_on_disk_only(cache, tokens, config)
        kv, count = await cache.retrieve(tokens)
        assert count == len(tokens)
        assert torch.equal(kv, reference_kv(tokens, config))
        await cache.evict(tokens, tiers=["cpu"])
        fourth = next(p for p in chunk_files(tmp_path) if p.name.startswith(cache.keys(tokens)[3].hex()))
        data = bytearray(fourth.read_bytes())
        data[4096 + 5000] ^= 0x40  # in the second segment of the fourth chunk
        fourth.write_bytes(bytes(data))
        kv, count = await cache.retrieve(tokens)
        assert count == 3 * CHUNK
        assert torch.equal(kv, reference_kv(tokens, config)[:, :, :count])
        assert not fourth.exists()
