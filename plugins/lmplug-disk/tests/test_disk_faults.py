"""Disk faults injected into the tier's own system calls: a full disk and a denied write.

``test_disk_tier`` meets these faults for real (a tmpfs filled up, a process without permission
overrides), which needs root; here the same faults are injected in-process by wrapping
``os.pwritev`` and ``os.open`` (a test double for the kernel's errors, so that these failure
modes are covered on every machine). Each test checks what the engine sees while the fault
lasts (stores succeed in L1, reads serve the right KV, the cause is logged once), what the
directory holds (no temporary file left, no file for a chunk that failed) and that the tier
works again once the fault is gone, reads from disk included.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import torch

import lmplug
from lmplug import tierkit
from lmplug.testing import reference_kv
from lmplug_disk import files

from disk_testing import chunk_files, disk_config, prompt, store_on_disk_only


class Faults:
    """While ``error`` is set, writes of chunk files fail with it: ENOSPC after a short first
    write (as a filling disk does), EACCES when the temporary file is opened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.error: int | None = None
        self.injected = 0
        real_pwritev, real_open = os.pwritev, os.open

        def pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
            if self.error == errno.ENOSPC:
                self.injected += 1
                total = sum(memoryview(buffer).nbytes for buffer in buffers)
                if offset == 0 and total > 4096:
                    return real_pwritev(fd, buffers[:1], offset)  # the header block lands, then no room
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_pwritev(fd, buffers, offset)

        def open_(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kwargs: object) -> int:
            if self.error == errno.EACCES and str(path).endswith(files.TEMP_SUFFIX):
                self.injected += 1
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, mode, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "open", open_)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    return Faults(monkeypatch)


def disk(cache: lmplug.Cache) -> tierkit.Tier:
    return cache.pipeline.slots[1].tier


def temporaries(root: Path) -> list[Path]:
    return sorted(root.rglob(f"*{files.TEMP_SUFFIX}"))


@pytest.mark.parametrize(("error", "message"), [(errno.ENOSPC, "No space left on device"), (errno.EACCES, "denied")])
async def test_a_write_fault_skips_the_chunk_and_the_tier_recovers_when_it_ends(
    tmp_path: Path, faults: Faults, caplog: pytest.LogCaptureFixture, error: int, message: str
) -> None:
    config = disk_config(tmp_path, cpu=True)
    before, during, after = prompt(31, 2), prompt(32, 3), prompt(33, 2)
    with caplog.at_level(logging.WARNING, logger="lmplug.disk"):
        async with lmplug.open_cache(config) as cache:
            await store_on_disk_only(cache, before, config)
            written = set(chunk_files(tmp_path))
            assert len(written) == 2

            faults.error = error
            for seed in range(3):  # several stores while the disk refuses: reported once
                tokens = during if seed == 0 else prompt(40 + seed, 1)
                assert await cache.store(tokens, reference_kv(tokens, config)) == len(tokens)
                await disk(cache).drain()
                kv, count = await cache.retrieve(tokens)  # served from L1 meanwhile
                assert count == len(tokens)
                assert torch.equal(kv, reference_kv(tokens, config))
            assert faults.injected > 0
            assert set(chunk_files(tmp_path)) == written  # no file for a chunk that failed
            assert temporaries(tmp_path) == []  # and no half-written temporary left behind
            assert cache.statistics().tiers[1].errors >= 5

            faults.error = None
            await store_on_disk_only(cache, after, config)
            for tokens in (before, after):  # from disk now, L1 dropped: read back exact
                kv, count = await cache.retrieve(tokens)
                assert count == len(tokens)
                assert torch.equal(kv, reference_kv(tokens, config))
            await cache.evict(during, tiers=["cpu"])
            kv, count = await cache.retrieve(during)  # never written: a miss, never wrong bytes
            assert count == 0
            assert cache.statistics().allocator.used_bytes == cache.statistics().tiers[0].used_bytes
    reports = [record for record in caplog.records if message in record.getMessage()]
    assert len(reports) == 1, [record.getMessage() for record in caplog.records]
