"""The connector's worker side without vLLM: layer-wise loads and saves through vLLM's CPU layout.

vLLM calls the connector under ``torch.inference_mode()``, so these tests do too.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

from lmplug.core.config import load_config
from lmplug.integrations.vllm.paged import CpuLayout
from lmplug.integrations.vllm.scheduler import LoadSpec, SaveSpec, StepPlan
from lmplug.integrations.vllm.worker import WorkerSide

BLOCK = 16
CHUNK = 32
LAYERS, HEADS, DIM = 3, 2, 8
_engines = itertools.count()


@pytest.fixture
def worker(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[WorkerSide]:
    monkeypatch.setenv("LMPLUG_RUNTIME_DIR", str(tmp_path))
    config = load_config(
        {
            "chunk_size": CHUNK,
            "model": {"name": "t", "num_layers": LAYERS, "num_kv_heads": HEADS, "head_size": DIM, "dtype": "float32"},
            "tiers": [{"type": "cpu", "capacity": "16MiB"}],
        }
    )
    side = WorkerSide(config, f"worker-test-{next(_engines)}", BLOCK)
    layout = CpuLayout(HEADS, DIM, BLOCK)
    side.register({f"model.layers.{i}.self_attn.attn": torch.zeros(layout.cache_shape(40)) for i in range(LAYERS)})
    yield side
    side.close()


def names(worker: WorkerSide) -> list[str]:
    return sorted(worker.index, key=worker.index.__getitem__)


def read_back(worker: WorkerSide, block_ids: list[int], count: int) -> torch.Tensor:
    assert worker.layout is not None
    out = torch.empty(2, LAYERS, count, HEADS * DIM)
    worker.layout.gather(worker.layers, worker._slots(block_ids, 0, count), out)
    return out


def test_saves_gather_layer_by_layer_and_loads_land_layer_by_layer(worker: WorkerSide) -> None:
    tokens = list(range(100, 100 + 3 * CHUNK))
    blocks = [7, 3, 11, 20, 1, 5]
    kv = torch.randn(2, LAYERS, len(tokens), HEADS * DIM)
    assert worker.layout is not None
    worker.layout.scatter(worker.layers, worker._slots(blocks, 0, len(tokens)), kv)
    with torch.inference_mode():
        plan = StepPlan(saves=[SaveSpec("a", tokens, blocks, 0, len(tokens))])
        for name in names(worker):  # attention finishes with each layer in turn
            worker.save_layer(name, plan)
        worker.save(plan)
    assert worker.cache.lookup(tokens) == len(tokens)
    assert worker.transfers.saved_bytes == kv.numel() * 4

    for layer in worker.layers:
        layer.zero_()
    other = [30, 31, 32, 33, 34]
    with torch.inference_mode():
        plan = StepPlan(loads=[LoadSpec("b", tokens[: 2 * CHUNK], other, 0, 2 * CHUNK)])
        worker.start_load(plan)
        first = names(worker)[0]
        worker.wait_for_layer(first)
        loaded = read_back(worker, other, 2 * CHUNK)
        assert torch.equal(loaded[:, 0], kv[:, 0, : 2 * CHUNK])  # layer 0 is in place before its attention
        assert not loaded[:, 1:].any()  # later layers load when their attention asks
        for name in names(worker)[1:]:
            worker.wait_for_layer(name)
        worker.save(StepPlan())
    assert torch.equal(read_back(worker, other, 2 * CHUNK), kv[:, :, : 2 * CHUNK])
    assert worker.take_failed_blocks() == set()
    assert worker.transfers.loaded_bytes == kv[:, :, : 2 * CHUNK].numel() * 4


def test_layers_vllm_never_asked_for_are_recomputed(worker: WorkerSide) -> None:
    tokens = list(range(500, 500 + CHUNK))
    worker.cache.store(tokens, torch.randn(2, LAYERS, CHUNK, HEADS * DIM))
    with torch.inference_mode():
        worker.start_load(StepPlan(loads=[LoadSpec("c", tokens, [4, 9], 0, CHUNK)]))
        worker.wait_for_layer(names(worker)[0])  # the other layers never ask
        worker.save(StepPlan())
    assert worker.take_failed_blocks() == {4, 9}


def test_undelivered_promises_are_reported(worker: WorkerSide) -> None:
    tokens = list(range(900, 900 + 2 * CHUNK))
    worker.cache.store(tokens[:CHUNK], torch.randn(2, LAYERS, CHUNK, HEADS * DIM))
    with torch.inference_mode():
        worker.start_load(StepPlan(loads=[LoadSpec("d", tokens, [1, 2, 3, 4], 0, 2 * CHUNK)]))
        for name in names(worker):
            worker.wait_for_layer(name)
        worker.save(StepPlan())
    assert worker.take_failed_blocks() == {3, 4}  # the second chunk was promised but is not there


def test_loads_land_in_4k_aligned_staging_that_a_disk_tier_reads_into(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each request's KV starts on a 4 KiB boundary of the staging buffer, so a disk-only stack
    reads its files straight into it with O_DIRECT (rows of 64 tokens x 16 floats = 4 KiB)."""
    monkeypatch.setenv("LMPLUG_RUNTIME_DIR", str(tmp_path))
    chunk = 64
    config = load_config(
        {
            "chunk_size": chunk,
            "save_partial_chunks": True,
            "model": {"name": "t", "num_layers": LAYERS, "num_kv_heads": HEADS, "head_size": DIM, "dtype": "float32"},
            "tiers": [{"type": "disk", "path": f"{tmp_path}/kv", "io_mode": "direct"}],
        }
    )
    side = WorkerSide(config, f"worker-test-{next(_engines)}", BLOCK)
    layout = CpuLayout(HEADS, DIM, BLOCK)
    side.register({f"model.layers.{i}.self_attn.attn": torch.zeros(layout.cache_shape(40)) for i in range(LAYERS)})
    try:
        first, second = list(range(1, 1 + chunk + 5)), list(range(7000, 7000 + 2 * chunk))
        kv_first = torch.randn(2, LAYERS, len(first), HEADS * DIM)
        kv_second = torch.randn(2, LAYERS, len(second), HEADS * DIM)
        side.cache.store(first, kv_first)
        side.cache.store(second, kv_second)
        side.cache.drain()
        with torch.inference_mode():
            # The first request's rows are not whole 4 KiB blocks (69 tokens): the second still starts on one.
            loads = [
                LoadSpec("a", first, list(range(5)), 0, len(first)),
                LoadSpec("b", second, list(range(8, 16)), 0, len(second)),
            ]
            plan = StepPlan(loads=loads)
            side.start_load(plan)
            assert [load.kv.data_ptr() % 4096 for load in side._loads] == [0, 0]
            for name in names(side):
                side.wait_for_layer(name)
            side.save(StepPlan())
        assert torch.equal(read_back(side, list(range(5)), len(first)), kv_first)
        assert torch.equal(read_back(side, list(range(8, 16)), len(second)), kv_second)
        assert side.take_failed_blocks() == set()
    finally:
        side.close()
