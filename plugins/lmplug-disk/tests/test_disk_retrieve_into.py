"""Retrieving into a caller's buffer: files read straight into ``out`` (O_DIRECT where it is
aligned, through the reader's staging where it is not), and never a wrong byte served."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import lmplug
from lmplug import tierkit
from lmplug.testing import make_config, reference_kv
from lmplug_disk import files

from disk_testing import CHUNK, chunk_files, prompt


def wide_config(path: Path, *, save_partial_chunks: bool = False, **options: Any) -> dict[str, Any]:
    """Disk only; 16 tokens of 16x4 float32 hidden: every chunk row is one 4 KiB block."""
    tiers = [{"type": "disk", "path": str(path), **options}]
    return make_config(tiers, chunk_size=CHUNK, num_kv_heads=16, head_size=4, save_partial_chunks=save_partial_chunks)


def new_out(kind: str, cache: lmplug.Cache, tokens: int) -> torch.Tensor:
    """An ``out`` buffer full of NaN: 4 KiB-aligned, or 64 bytes past a 4 KiB boundary (the
    alignment torch promises, made never to fall on a block boundary by chance)."""
    layout = cache.layout
    if kind == "aligned":
        out = lmplug.empty_kv(layout, tokens)
        assert out.data_ptr() % tierkit.IO_ALIGNMENT == 0
    else:
        memory = tierkit.aligned_empty(layout.nbytes(tokens) + 64, pin_memory=False)[64:]
        out = memory.view(layout.dtype).view(layout.shape(tokens))
        assert out.data_ptr() % tierkit.IO_ALIGNMENT == 64
    return out.fill_(float("nan"))


@pytest.fixture
def staged(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes of each read that went through a reader thread's staging memory (0: none)."""
    seen: list[int] = []
    plan = files._iovec

    def spy(*args: Any) -> Any:
        buffers, views, area = plan(*args)
        seen.append(area.nbytes)
        return buffers, views, area

    monkeypatch.setattr(files, "_iovec", spy)
    return seen


@pytest.mark.parametrize("io_mode", ["direct", "buffered"])
@pytest.mark.parametrize("kind", ["aligned", "unaligned"])
async def test_files_are_read_into_out(tmp_path: Path, staged: list[int], kind: str, io_mode: str) -> None:
    config = wide_config(tmp_path, io_mode=io_mode)
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(30, 4)
        kv = reference_kv(tokens, config)
        await cache.store(tokens, kv)
        await cache.pipeline.slots[0].tier.drain()
        staged.clear()
        out = new_out(kind, cache, len(tokens))
        got, count = await cache.retrieve(tokens, out=out)
        assert count == len(tokens)
        assert torch.equal(got, kv)
        assert len(staged) == 4
        if io_mode == "direct" and kind == "unaligned":
            assert staged == [kv.nbytes // 4] * 4  # each file staged whole, copied by its reader
        else:
            assert staged == [0] * 4  # straight into out's rows
        assert cache.statistics().tiers[0].hits == 4


@pytest.mark.parametrize("kind", ["aligned", "unaligned"])
async def test_a_damaged_file_is_a_miss_and_is_removed(tmp_path: Path, kind: str) -> None:
    config = wide_config(tmp_path)
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(31, 3)
        kv = reference_kv(tokens, config)
        await cache.store(tokens, kv)
        await cache.pipeline.slots[0].tier.drain()
        second = next(p for p in chunk_files(tmp_path) if p.name.startswith(cache.keys(tokens)[1].hex()))
        data = bytearray(second.read_bytes())
        data[files.BLOCK + 3000] ^= 0x10
        second.write_bytes(bytes(data))
        out = new_out(kind, cache, len(tokens))
        got, count = await cache.retrieve(tokens, out=out)
        assert count == CHUNK
        assert torch.equal(got, kv[:, :, :CHUNK])
        assert not second.exists()
        assert await cache.lookup(tokens) == CHUNK


@pytest.mark.parametrize("kind", ["aligned", "unaligned"])
async def test_large_chunks_are_read_into_out_in_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setattr(files, "SEGMENT", 2 * files.BLOCK)  # 24 KiB chunks: three segments each
    config = wide_config(tmp_path)
    config["model"].update(num_layers=3)
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(32, 5)
        kv = reference_kv(tokens, config)
        await cache.store(tokens, kv)
        await cache.pipeline.slots[0].tier.drain()
        got, count = await cache.retrieve(tokens, out=new_out(kind, cache, len(tokens)))
        assert count == len(tokens)
        assert torch.equal(got, kv)
        fourth = next(p for p in chunk_files(tmp_path) if p.name.startswith(cache.keys(tokens)[3].hex()))
        data = bytearray(fourth.read_bytes())
        data[files.BLOCK + 5 * files.BLOCK + 7] ^= 0x40  # in the last segment of the fourth chunk
        fourth.write_bytes(bytes(data))
        got, count = await cache.retrieve(tokens, out=new_out(kind, cache, len(tokens)))
        assert count == 3 * CHUNK
        assert torch.equal(got, kv[:, :, :count])
        assert not fourth.exists()


async def test_queued_chunks_are_copied_into_out(tmp_path: Path) -> None:
    config = wide_config(tmp_path, writers=1)
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(33, 4)
        kv = reference_kv(tokens, config)
        await cache.store(tokens, kv)
        assert cache.statistics().tiers[0].pending_writes > 0
        got, count = await cache.retrieve(tokens, out=new_out("aligned", cache, len(tokens)))
        assert count == len(tokens)  # from the queue or from the files: the same KV
        assert torch.equal(got, kv)


async def test_a_partial_last_chunk_is_read_into_out(tmp_path: Path) -> None:
    config = wide_config(tmp_path, save_partial_chunks=True)
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(34, 2)[: CHUNK + 5]
        kv = reference_kv(tokens, config)
        await cache.store(tokens, kv)
        await cache.pipeline.slots[0].tier.drain()
        got, count = await cache.retrieve(tokens, out=new_out("aligned", cache, len(tokens) + 3))
        assert count == len(tokens)
        assert torch.equal(got, kv)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_a_cuda_out_is_served_through_chunks(tmp_path: Path) -> None:
    config = wide_config(tmp_path)
    async with lmplug.open_cache(config) as cache:
        tokens = prompt(35, 3)
        kv = reference_kv(tokens, config)
        await cache.store(tokens, kv)
        await cache.pipeline.slots[0].tier.drain()
        out = torch.full(cache.layout.shape(len(tokens)), float("nan"), device="cuda")
        got, count = await cache.retrieve(tokens, out=out)
        assert count == len(tokens)
        assert torch.equal(got.cpu(), kv)
