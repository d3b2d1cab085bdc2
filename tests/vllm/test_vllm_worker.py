"""The connector's worker side without vLLM: layer-wise loads and saves through vLLM's CPU layout.

vLLM calls the connector under ``torch.inference_mode()``, so these tests do too.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from lmplug.core.config import load_config
from lmplug.integrations.vllm.paged import CpuLayout, CpuWriter, FlashLayout, Placement, slot_tensor
from lmplug.integrations.vllm.scheduler import Span, StepPlan
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
            "save_partial_chunks": True,  # as the connector configures it
            "model": {"name": "t", "num_layers": LAYERS, "num_kv_heads": HEADS, "head_size": DIM, "dtype": "float32"},
            "tiers": [{"type": "cpu", "capacity": "16MiB"}],
        }
    )
    side = WorkerSide(config, f"worker-test-{next(_engines)}", BLOCK)
    layout = CpuLayout(HEADS, DIM, BLOCK)
    side.register({f"model.layers.{i}.self_attn.attn": torch.zeros(layout.cache_shape(40)) for i in range(LAYERS)})
    yield side
    side.close()


def lease(worker: WorkerSide, request_id: str, tokens: list[int]) -> int:
    """What the scheduler's lookup does first: lease the tokens for ``request_id`` (waiting out a promotion)."""
    array = np.asarray(tokens, dtype="<i4")
    for _ in range(500):
        hit = worker.cache.call(worker.server.lookup, request_id, array)
        if hit is not None:
            return int(hit)
        time.sleep(0.01)
    raise AssertionError("the lookup stayed pending")


def names(worker: WorkerSide) -> list[str]:
    return sorted(worker.index, key=worker.index.__getitem__)


def load_step(worker: WorkerSide, load: Span) -> None:
    """One step of vLLM's that loads ``load``: every attention layer asks for its KV, nothing is saved."""
    with torch.inference_mode():
        worker.start_load(StepPlan(loads=[load]))
        for name in names(worker):
            worker.wait_for_layer(name)
        worker.save(StepPlan())


def write_kv(worker: WorkerSide, block_ids: list[int], kv: torch.Tensor) -> None:
    """Put ``kv`` ``[2, layers, n, hidden]`` into vLLM's blocks, as its forward would have computed it."""
    assert worker.layout is not None
    placement = Placement.of(block_ids, 0, kv.shape[2], BLOCK, worker.layers[0].device)
    for index, layer in enumerate(worker.layers):
        worker.layout.scatter_placed(layer, placement, kv[:, index])


def read_back(worker: WorkerSide, block_ids: list[int], count: int) -> torch.Tensor:
    """The KV of the first ``count`` tokens in ``block_ids``, ``[2, layers, count, hidden]``."""
    assert worker.layout is not None
    device = worker.layers[0].device
    out = torch.empty(2, LAYERS, count, HEADS * DIM, device=device)
    placement = Placement.of(block_ids, 0, count, BLOCK, device)
    for index, layer in enumerate(worker.layers):
        worker.layout.gather_placed(layer, placement, out[:, index])
    return out


def test_saves_gather_layer_by_layer_and_loads_land_layer_by_layer(worker: WorkerSide) -> None:
    tokens = list(range(100, 100 + 3 * CHUNK))
    blocks = [7, 3, 11, 20, 1, 5]
    kv = torch.randn(2, LAYERS, len(tokens), HEADS * DIM)
    write_kv(worker, blocks, kv)
    with torch.inference_mode():
        plan = StepPlan(saves=[Span("a", tokens, blocks, 0, len(tokens))])
        for name in names(worker):  # attention finishes with each layer in turn
            worker.save_layer(name, plan)
        worker.save(plan)
        worker.wait_saves()
    assert worker.cache.lookup(tokens) == len(tokens)
    assert worker.transfers.saved_bytes == kv.numel() * 4
    statistics = worker.cache.run_sync(worker.server.statistics)  # what the lookup socket serves
    assert statistics["transfers"]["saved_bytes"] == kv.numel() * 4  # type: ignore[index]

    for layer in worker.layers:
        layer.zero_()
    other = [30, 31, 32, 33, 34]
    assert lease(worker, "b", tokens[: 2 * CHUNK]) == 2 * CHUNK
    with torch.inference_mode():
        plan = StepPlan(loads=[Span("b", tokens[: 2 * CHUNK], other, 0, 2 * CHUNK)])
        worker.start_load(plan)
        first = names(worker)[0]
        worker.wait_for_layer(first)
        loaded = read_back(worker, other, 2 * CHUNK)
        assert torch.equal(loaded[:, 0], kv[:, 0, : 2 * CHUNK])  # layer 0 is in place before its attention
        for name in names(worker)[1:]:
            worker.wait_for_layer(name)
        worker.save(StepPlan())
    assert torch.equal(read_back(worker, other, 2 * CHUNK), kv[:, :, : 2 * CHUNK])
    assert worker.take_failed_blocks() == set()
    assert worker.transfers.loaded_bytes == kv[:, :, : 2 * CHUNK].numel() * 4
    assert worker.cache.statistics().leases == 0  # released once loaded


def test_layers_vllm_never_asked_for_are_recomputed(worker: WorkerSide) -> None:
    tokens = list(range(500, 500 + CHUNK))
    worker.cache.store(tokens, torch.randn(2, LAYERS, CHUNK, HEADS * DIM))
    assert lease(worker, "c", tokens) == CHUNK
    with torch.inference_mode():
        worker.start_load(StepPlan(loads=[Span("c", tokens, [4, 9], 0, CHUNK)]))
        worker.wait_for_layer(names(worker)[0])  # the other layers never ask
        worker.save(StepPlan())
    assert worker.take_failed_blocks() == {4, 9}


def test_undelivered_promises_are_reported(worker: WorkerSide) -> None:
    tokens = list(range(900, 900 + 2 * CHUNK))
    worker.cache.store(tokens[:CHUNK], torch.randn(2, LAYERS, CHUNK, HEADS * DIM))
    assert lease(worker, "d", tokens) == CHUNK
    load_step(worker, Span("d", tokens, [1, 2, 3, 4], 0, 2 * CHUNK))
    assert worker.take_failed_blocks() == {3, 4}  # the second chunk was promised but is not there


def test_a_miss_leaves_vllms_kv_untouched(worker: WorkerSide) -> None:
    """A load whose lease is gone (expired, or never granted) writes nothing into vLLM's blocks."""
    for layer in worker.layers:
        layer.normal_()
    before = [layer.clone() for layer in worker.layers]
    tokens = list(range(3000, 3000 + 2 * CHUNK))
    assert lease(worker, "e", tokens) == 0
    load_step(worker, Span("e", tokens, [1, 2, 3, 4], 0, 2 * CHUNK))
    assert all(torch.equal(a, b) for a, b in zip(before, worker.layers, strict=True))
    assert worker.take_failed_blocks() == {1, 2, 3, 4}


def test_a_lease_that_expires_before_the_load_is_recomputed_and_writes_nothing(worker: WorkerSide) -> None:
    """The scheduler's lookup leased the chunks, but the lease ran out before the worker's load
    (a step delayed past the lease time-out): the blocks are recomputed, vLLM's KV is untouched."""
    tokens = list(range(3500, 3500 + 2 * CHUNK))
    worker.cache.store(tokens, torch.randn(2, LAYERS, 2 * CHUNK, HEADS * DIM))
    assert lease(worker, "x", tokens) == 2 * CHUNK
    leases = worker.cache.async_cache._leases
    assert worker.cache.run_sync(lambda: leases.expire(float("inf"))) == 1  # the time-out passes
    for layer in worker.layers:
        layer.normal_()
    before = [layer.clone() for layer in worker.layers]
    load_step(worker, Span("x", tokens, [1, 2, 3, 4], 0, 2 * CHUNK))
    assert all(torch.equal(a, b) for a, b in zip(before, worker.layers, strict=True))
    assert worker.take_failed_blocks() == {1, 2, 3, 4}
    assert worker.cache.statistics().tiers[0].pinned == 0


def test_a_partial_tail_saved_at_finish_is_loaded_into_scattered_blocks(worker: WorkerSide) -> None:
    """The rest of a finished request (a partial chunk) is saved, reported as sent, and a longer
    prompt loads it back, whole blocks and odd tokens alike, into blocks that are not consecutive."""
    tokens = list(range(4000, 4000 + CHUNK + 21))  # one chunk and 21 tokens: 3 whole blocks and 5 tokens
    kv = torch.randn(2, LAYERS, len(tokens), HEADS * DIM)
    blocks = [5, 6, 7, 8]
    write_kv(worker, blocks, kv)
    with torch.inference_mode():
        worker.start_load(StepPlan())
        plan = StepPlan(saves=[Span("f", tokens, blocks, 0, len(tokens))], finished=["f"])
        worker.save(plan)
        worker.before_step()  # vLLM's next step: the gathers are done before its forward
    assert worker.take_finished_saves() == {"f"}
    worker.wait_saves()
    longer = [*tokens, 1, 2, 3]
    assert lease(worker, "g", longer) == len(tokens)
    other = [30, 12, 31, 2]
    load_step(worker, Span("g", longer[: len(tokens)], other, 0, len(tokens)))
    assert torch.equal(read_back(worker, other, len(tokens)), kv)
    assert worker.take_failed_blocks() == set()


def test_a_prefill_step_does_not_wait_for_its_gathers_and_the_next_forward_does(worker: WorkerSide) -> None:
    """On the CPU, a prefill step's saves end on the copy thread while vLLM samples and schedules;
    the next step waits for them before its forward may write into blocks that vLLM has handed to
    others meanwhile (a preempted request's)."""
    tokens = list(range(7000, 7000 + CHUNK + 9))
    kv = torch.randn(2, LAYERS, len(tokens), HEADS * DIM)
    blocks = [2, 4, 6]
    write_kv(worker, blocks, kv)
    assert worker._copier is not None
    busy = threading.Event()
    worker._copier.submit(busy.wait)  # the copy thread is still busy with earlier work
    plan = StepPlan(saves=[Span("h", tokens, blocks, 0, len(tokens))])  # a prefill step: "h" runs on
    with torch.inference_mode():
        worker.start_load(StepPlan())
        for name in names(worker):
            worker.save_layer(name, plan)
        worker.save(plan)  # returns without the gathers
        next_step = threading.Thread(target=worker.before_step)
        next_step.start()
        next_step.join(timeout=0.2)
        assert next_step.is_alive()  # the next forward waits for the gathers
        busy.set()
        next_step.join(timeout=10)
        assert not next_step.is_alive()
    for layer in worker.layers:
        layer.zero_()  # the next forward reuses the blocks: what was saved is already out
    worker.wait_saves()
    held, count = worker.cache.retrieve(tokens)
    assert count == len(tokens)
    assert torch.equal(held, kv)


def test_steps_saving_back_to_back_keep_each_others_kv(worker: WorkerSide) -> None:
    """Five steps save five prompts in a row, each while the stores of the steps before it may
    still run (steps take the two save buffers in turn): every prompt is stored whole and right."""
    prompts = [list(range(20_000 + 1000 * index, 20_000 + 1000 * index + CHUNK + 7 * index)) for index in range(5)]
    kvs = [torch.randn(2, LAYERS, len(tokens), HEADS * DIM) for tokens in prompts]
    with torch.inference_mode():
        for index, (tokens, kv) in enumerate(zip(prompts, kvs, strict=True)):
            blocks = list(range(6 * index + 1, 6 * index + 1 + -(-len(tokens) // BLOCK)))
            write_kv(worker, blocks, kv)
            plan = StepPlan(saves=[Span(f"s{index}", tokens, blocks, 0, len(tokens))])
            worker.before_step()
            worker.start_load(StepPlan())
            for name in names(worker):
                worker.save_layer(name, plan)
            worker.save(plan)
        worker.wait_saves()
    for tokens, kv in zip(prompts, kvs, strict=True):
        held, count = worker.cache.retrieve(tokens)
        assert count == len(tokens)
        assert torch.equal(held, kv)


def test_a_disk_only_stack_loads_through_the_lease(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """No host-memory tier: the lookup reads the files in the background (pending until then) and the
    load writes the lease's chunks into vLLM's blocks."""
    monkeypatch.setenv("LMPLUG_RUNTIME_DIR", str(tmp_path))
    config = load_config(
        {
            "chunk_size": CHUNK,
            "save_partial_chunks": True,  # as the connector configures it
            "model": {"name": "t", "num_layers": LAYERS, "num_kv_heads": HEADS, "head_size": DIM, "dtype": "float32"},
            "tiers": [{"type": "disk", "path": f"{tmp_path}/kv"}],
        }
    )
    side = WorkerSide(config, f"worker-test-{next(_engines)}", BLOCK)
    layout = CpuLayout(HEADS, DIM, BLOCK)
    side.register({f"model.layers.{i}.self_attn.attn": torch.zeros(layout.cache_shape(40)) for i in range(LAYERS)})
    try:
        tokens = list(range(1, 1 + 2 * CHUNK + 5))
        kv = torch.randn(2, LAYERS, len(tokens), HEADS * DIM)
        side.cache.store(tokens, kv)
        side.cache.drain()
        assert lease(side, "a", tokens) == len(tokens)
        blocks = list(range(10, 15))
        with torch.inference_mode():
            side.start_load(StepPlan(loads=[Span("a", tokens, blocks, 0, len(tokens))]))
            for name in names(side):
                side.wait_for_layer(name)
            side.save(StepPlan())
        assert torch.equal(read_back(side, blocks, len(tokens)), kv)
        assert side.take_failed_blocks() == set()
        assert side.cache.statistics().leases == 0
        assert side.cache.statistics().allocator.used_bytes == 0  # the heap chunks went with the lease
    finally:
        side.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_blocks_save_and_load_through_the_side_stream(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's flash layout on a CUDA device: saves gather on the device, loads copy the leased
    (pinned host) chunks to the device and scatter on the side stream, two requests at once."""
    monkeypatch.setenv("LMPLUG_RUNTIME_DIR", str(tmp_path))
    config = load_config(
        {
            "chunk_size": CHUNK,
            "save_partial_chunks": True,
            "model": {"name": "t", "num_layers": LAYERS, "num_kv_heads": HEADS, "head_size": DIM, "dtype": "float32"},
            "tiers": [{"type": "cpu", "capacity": "16MiB"}],
        }
    )
    side = WorkerSide(config, f"worker-test-{next(_engines)}", BLOCK)
    layout = FlashLayout(HEADS, DIM, BLOCK)
    caches = {
        f"model.layers.{i}.self_attn.attn": torch.zeros(layout.cache_shape(40), device="cuda") for i in range(LAYERS)
    }
    side.register(caches)
    try:
        first, second = list(range(10, 10 + CHUNK + 7)), list(range(900, 900 + 2 * CHUNK))
        kvs = {}
        with torch.inference_mode():
            for name, tokens, blocks in (("a", first, [1, 2, 3]), ("b", second, [5, 6, 7, 8])):
                kv = torch.randn(2, LAYERS, len(tokens), HEADS * DIM, device="cuda")
                write_kv(side, blocks, kv)
                kvs[name] = kv
                side.start_load(StepPlan())
                side.save(StepPlan(saves=[Span(name, tokens, blocks, 0, len(tokens))], finished=[name]))
            side.wait_saves()
        for layer in side.layers:
            layer.zero_()
        assert lease(side, "c", [*first, 1]) == len(first)
        assert lease(side, "d", [*second, 1]) == len(second)
        with torch.inference_mode():
            loads = [
                Span("c", first, [20, 22, 21], 0, len(first)),
                Span("d", second, [30, 9, 31, 33], 0, len(second)),
            ]
            side.start_load(StepPlan(loads=loads))
            for name in names(side):
                side.wait_for_layer(name)
            torch.cuda.synchronize()
            side.save(StepPlan())
        for blocks, tokens, kv in (([20, 22, 21], first, kvs["a"]), ([30, 9, 31, 33], second, kvs["b"])):
            assert torch.equal(read_back(side, blocks, len(tokens)), kv)
        assert side.take_failed_blocks() == set()
    finally:
        side.close()


def _side(tmp_path: object, monkeypatch: pytest.MonkeyPatch, dtype: str, dim: int, block: int) -> WorkerSide:
    monkeypatch.setenv("LMPLUG_RUNTIME_DIR", str(tmp_path))
    config = load_config(
        {
            "chunk_size": 2 * block,
            "save_partial_chunks": True,
            "model": {"name": "t", "num_layers": LAYERS, "num_kv_heads": HEADS, "head_size": dim, "dtype": dtype},
            "tiers": [{"type": "cpu", "capacity": "16MiB"}],
        }
    )
    return WorkerSide(config, f"worker-test-{next(_engines)}", block)


@pytest.mark.parametrize(
    ("isa", "dtype", "layout_name"),
    [
        ("vec", "float32", "cpu"),
        pytest.param(
            "amx",
            "bfloat16",
            "cpu-amx",
            marks=pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="needs a CPU with AMX"),
        ),
    ],
)
def test_kv_vllm_wrote_in_two_steps_comes_back_exact(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch, isa: str, dtype: str, layout_name: str
) -> None:
    """vLLM's own kernel writes a prompt's KV in two steps that split a block (as chunked prefill
    does) and lmplug saves after each: what lmplug holds is the KV itself, token by token (not
    this machine's ISA-specific bytes, which another engine, a peer or a remote tier would
    misread), and a load into other blocks (through that kernel where the worker loads with it)
    gives every token back."""
    dim, block = 32, 32
    side = _side(tmp_path, monkeypatch, dtype, dim, block)
    torch_dtype = getattr(torch, dtype)
    shape = CpuLayout(HEADS, dim, block).cache_shape(40)
    side.register(
        {f"model.layers.{i}.self_attn.attn": torch.zeros(shape, dtype=torch_dtype) for i in range(LAYERS)}, isa
    )
    try:
        assert side.layout is not None
        assert side.layout.name == layout_name
        assert (side.writer is not None) == (layout_name == "cpu-amx")  # vec loads by lmplug's own scatter
        import vllm._custom_ops  # noqa: F401  (loads vLLM's kernels)

        forward = CpuWriter(torch.ops._C.cpu_attn_reshape_and_cache, isa, HEADS, dim, block)  # what vLLM writes with
        tokens = list(range(7, 7 + 3 * block + 9))
        blocks = [3, 9, 4, 12]
        kv = torch.randn(2, LAYERS, len(tokens), HEADS * dim).to(torch_dtype)
        split = block + block // 2 + 3
        with torch.inference_mode():
            for start, end, finished in ((0, split, []), (split, len(tokens), ["a"])):
                slots = slot_tensor(blocks, start, end, block)
                for index, layer in enumerate(side.layers):  # the forward writes this step's KV
                    forward.write(layer, slots, kv[:, index, start:end])
                saved_from = start - start % (2 * block)  # saves begin at a chunk, as the scheduler plans them
                plan = StepPlan(saves=[Span("a", tokens[:end], blocks, saved_from, end)], finished=finished)
                side.start_load(StepPlan())
                for name in names(side):
                    side.save_layer(name, plan)
                side.save(plan)
            side.wait_saves()
        held, count = side.cache.retrieve(tokens)
        assert count == len(tokens)
        assert torch.equal(held, kv)
        for layer in side.layers:
            layer.zero_()
        other = [20, 21, 25, 22]
        hit = lease(side, "b", [*tokens, 1])
        assert hit == len(tokens)
        with torch.inference_mode():
            side.start_load(StepPlan(loads=[Span("b", tokens, other, 0, hit)]))
            for name in names(side):
                side.wait_for_layer(name)
            side.save(StepPlan())
        out = torch.empty_like(kv)
        placement = Placement.of(other, 0, len(tokens), block, torch.device("cpu"))
        for index, layer in enumerate(side.layers):
            side.layout.gather_placed(layer, placement, out[:, index])
        assert torch.equal(out, kv)
        assert side.take_failed_blocks() == set()
    finally:
        side.close()


def test_a_layout_lmplug_does_not_know_turns_it_off_and_vllm_serves_on(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    side = _side(tmp_path, monkeypatch, "float32", 32, 32)
    shape = CpuLayout(HEADS, 32, 32).cache_shape(8)
    side.register({f"model.layers.{i}.self_attn.attn": torch.zeros(shape) for i in range(LAYERS)}, "bogus")
    try:
        assert side.layout is None
        assert side.disabled is not None
        assert "ISA 'bogus'" in side.disabled
        tokens = list(range(64))
        side.cache.store(tokens, torch.randn(2, LAYERS, 64, HEADS * 32))
        assert lease(side, "a", tokens) == 0  # every lookup a miss
        # A PD decode waits for no pushed KV: it could not load it.
        assert side.cache.call(side.server.transfer_state, "any") == "failed"
        statistics = side.cache.run_sync(side.server.statistics)
        assert "ISA 'bogus'" in str(statistics["disabled"])
        with torch.inference_mode():
            side.start_load(StepPlan(loads=[Span("a", tokens, [1, 2], 0, 64)]))  # promised anyway
            for name in names(side):
                side.save_layer(name, StepPlan(saves=[Span("b", tokens, [3, 4], 0, 64)], finished=["b"]))
                side.wait_for_layer(name)
            side.save(StepPlan(saves=[Span("b", tokens, [3, 4], 0, 64)], finished=["b"]))
        assert side.take_failed_blocks() == {1, 2}  # recomputed, never served from unknown bytes
        assert side.take_finished_saves() == {"b"}  # vLLM may free the blocks
        assert side.transfers.saved_bytes == 0
    finally:
        side.close()
