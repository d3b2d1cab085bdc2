"""Gather/scatter between vLLM's paged layouts and lmplug's chunk layout, against a per-token reference."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from lmplug.errors import KVShapeError
from lmplug.integrations.vllm import paged
from lmplug.integrations.vllm.paged import (
    CpuWriter,
    PagedLayout,
    Placement,
    Slots,
    detect_cpu_layout,
    layout_for,
    slot_tensor,
)

HEADS, DIM, BLOCK, BLOCKS, LAYERS = 2, 16, 16, 6, 3  # 16: the 'cpu-amx' tiles' size
NAMES = ["cpu", "cpu-amx", "flash", "flashinfer"]


def naive_get(name: str, layer: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[heads, dim]`` of one slot, read the slow, obvious way from the documented layout."""
    block, offset = divmod(slot, BLOCK)
    if name == "cpu":
        k = torch.empty(HEADS, DIM, dtype=layer.dtype)
        v = torch.empty(HEADS, DIM, dtype=layer.dtype)
        for head in range(HEADS):
            flat = layer[block, head].reshape(-1)
            for dim in range(DIM):
                k[head, dim] = flat[dim * BLOCK + offset]  # K stored transposed: [dim, slot]
                v[head, dim] = flat[BLOCK * DIM + offset * DIM + dim]  # then V: [slot, dim]
        return k, v
    if name == "cpu-amx":
        k = torch.empty(HEADS, DIM, dtype=layer.dtype)
        v = torch.empty(HEADS, DIM, dtype=layer.dtype)
        for head in range(HEADS):
            flat = layer[block, head].reshape(-1)
            for dim in range(DIM):
                # K: 16-token tiles of [dim pair, token, 2 dims]; then V: 16-dim tiles of [token pair, dim, 2 tokens].
                k[head, dim] = flat[(offset // 16) * 16 * DIM + (dim // 2) * 32 + (offset % 16) * 2 + dim % 2]
                v_at = (dim // 16) * 16 * BLOCK + (offset // 2) * 32 + (dim % 16) * 2 + offset % 2
                v[head, dim] = flat[BLOCK * DIM + v_at]
        return k, v
    if name == "flash":
        return layer[0, block, offset], layer[1, block, offset]
    return layer[block, 0, offset], layer[block, 1, offset]


def make_layers(name: str, device: str = "cpu") -> list[torch.Tensor]:
    layout = layout_for(name, HEADS, DIM, BLOCK)
    layers = [torch.randn(layout.cache_shape(BLOCKS), device=device).to(torch.bfloat16) for _ in range(LAYERS)]
    if name == "flash":
        # A permuted physical order (heads before slots), as some backends allocate it.
        layers = [layer.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4) for layer in layers]
        assert not layers[0].is_contiguous()
    return layers


def gather(layout: PagedLayout, layers: list[torch.Tensor], slots: Slots, out: torch.Tensor) -> None:
    """Every layer's KV of ``slots`` into ``out`` ``[2, layers, n, hidden]``."""
    for index, layer in enumerate(layers):
        layout.gather_layer(layer, slots, out[:, index])


def scatter(layout: PagedLayout, layers: list[torch.Tensor], slots: Slots, kv: torch.Tensor) -> None:
    """``kv`` ``[2, layers, n, hidden]`` into the slots of every layer."""
    for index, layer in enumerate(layers):
        layout.scatter_layer(layer, slots, kv[:, index])


@pytest.mark.parametrize("name", NAMES)
def test_gather_matches_the_layout_definition(name: str) -> None:
    layout = layout_for(name, HEADS, DIM, BLOCK)
    layers = make_layers(name)
    slot_list = [13, 8, 47, 9, 30, 31, 0]  # out of order, across blocks
    out = torch.empty(2, LAYERS, len(slot_list), HEADS * DIM, dtype=torch.bfloat16)
    gather(layout, layers, Slots.of(torch.tensor(slot_list), BLOCK, torch.device("cpu")), out)
    for index, layer in enumerate(layers):
        for token, slot in enumerate(slot_list):
            k, v = naive_get(name, layer, slot)
            assert torch.equal(out[0, index, token], k.reshape(-1))
            assert torch.equal(out[1, index, token], v.reshape(-1))


@pytest.mark.parametrize("name", NAMES)
def test_scatter_writes_only_the_given_slots(name: str) -> None:
    layout = layout_for(name, HEADS, DIM, BLOCK)
    layers = make_layers(name)
    before = [layer.clone() for layer in layers]
    slot_list = [17, 3, 40, 41]
    kv = torch.randn(2, LAYERS, len(slot_list), HEADS * DIM).to(torch.bfloat16)
    slots = Slots.of(torch.tensor(slot_list), BLOCK, torch.device("cpu"))
    scatter(layout, layers, slots, kv)
    for index, layer in enumerate(layers):
        for token, slot in enumerate(slot_list):
            k, v = naive_get(name, layer, slot)
            assert torch.equal(k.reshape(-1), kv[0, index, token])
            assert torch.equal(v.reshape(-1), kv[1, index, token])
        untouched = [slot for slot in range(BLOCKS * BLOCK) if slot not in slot_list]
        for slot in untouched:
            assert all(
                torch.equal(a, b)
                for a, b in zip(naive_get(name, layer, slot), naive_get(name, before[index], slot), strict=True)
            )
    out = torch.empty_like(kv)
    gather(layout, layers, slots, out)
    assert torch.equal(out, kv)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("block_ids", "start", "end"),
    [
        ([2, 3, 4, 5], 0, 4 * BLOCK),  # consecutive whole blocks: one slice
        ([5, 1, 3, 0], 0, 4 * BLOCK),  # scattered whole blocks: an index tensor
        ([4, 0, 5, 2], 3, 3 * BLOCK + 5),  # odd tokens before and after the whole blocks
        ([1, 3], BLOCK + 2, BLOCK + 7),  # inside one block: no whole block at all
    ],
)
def test_placed_copies_match_slot_by_slot_copies(name: str, block_ids: list[int], start: int, end: int) -> None:
    """The block-wise copies the worker uses put each token where its slot says, and read it back."""
    layout = layout_for(name, HEADS, DIM, BLOCK)
    layers = make_layers(name)
    expected = [layer.clone() for layer in layers]
    cpu = torch.device("cpu")
    placement = Placement.of(block_ids, start, end, BLOCK, cpu)
    positions = torch.arange(start, end)
    slots = Slots.of(torch.tensor(block_ids)[positions // BLOCK] * BLOCK + positions % BLOCK, BLOCK, cpu)
    kv = torch.randn(2, LAYERS, end - start, HEADS * DIM).to(torch.bfloat16)
    for index, layer in enumerate(layers):
        layout.scatter_placed(layer, placement, kv[:, index])
    scatter(layout, expected, slots, kv)
    assert all(torch.equal(a, b) for a, b in zip(layers, expected, strict=True))
    out = torch.empty_like(kv)
    for index, layer in enumerate(layers):
        layout.gather_placed(layer, placement, out[:, index])
    assert torch.equal(out, kv)


def test_cpu_layout_refuses_a_layer_it_would_have_to_copy() -> None:
    layout = layout_for("cpu", HEADS, DIM, BLOCK)
    layer = torch.randn(BLOCKS, HEADS, 2 * DIM, BLOCK).transpose(2, 3)  # right shape, non-viewable strides
    slot = Slots.of(torch.tensor([1]), BLOCK, torch.device("cpu"))
    with pytest.raises(RuntimeError):
        layout.scatter_layer(layer, slot, torch.zeros(2, 1, HEADS * DIM))


def test_check_names_the_expected_shape() -> None:
    layout = layout_for("flash", HEADS, DIM, BLOCK)
    layout.check(torch.empty(layout.cache_shape(BLOCKS)))
    with pytest.raises(KVShapeError, match="is not the 'flash' layout"):
        layout.check(torch.empty(BLOCKS, 2, BLOCK, HEADS, DIM))
    with pytest.raises(KVShapeError, match="supports cpu, cpu-amx, flash, flashinfer"):
        layout_for("mla", HEADS, DIM, BLOCK)


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_block_copies_move_bits_not_values(name: str) -> None:
    """The CPU layouts' block reads split 16-bit pairs out of 32-bit words: every bit pattern
    (negative zero, NaNs with payloads, the sign bit) comes out exactly as vLLM holds it."""
    layout = layout_for(name, HEADS, DIM, BLOCK)
    generator = torch.Generator().manual_seed(1)
    layer = torch.randint(-(2**15), 2**15, layout.cache_shape(BLOCKS), dtype=torch.int16, generator=generator)
    layer.view(-1)[:4] = torch.tensor([-(2**15), 0x7FC1, -1, 0x7F80], dtype=torch.int16)  # -0, NaNs, +inf
    layer = layer.view(torch.bfloat16)
    cpu = torch.device("cpu")
    for block_ids in ([0, 1, 2], [5, 0, 3]):
        positions = torch.arange(0, len(block_ids) * BLOCK)
        slots = Slots.of(torch.tensor(block_ids)[positions // BLOCK] * BLOCK + positions % BLOCK, BLOCK, cpu)
        expected = torch.empty(2, len(positions), HEADS * DIM, dtype=torch.bfloat16)
        layout.gather_layer(layer, slots, expected)  # indexing, token by token
        out = torch.full_like(expected, 7.0)
        layout.gather_placed(layer, Placement.of(block_ids, 0, len(positions), BLOCK, cpu), out)
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["flash", "flashinfer"])
def test_cuda_round_trip(name: str) -> None:
    layout = layout_for(name, HEADS, DIM, BLOCK)
    layers = make_layers(name, device="cuda")
    slots = Slots.of(torch.tensor([5, 22, 23, 40]), BLOCK, torch.device("cuda"))
    kv = torch.randn(2, LAYERS, 4, HEADS * DIM, device="cuda").to(torch.bfloat16)
    scatter(layout, layers, slots, kv)
    out = torch.empty_like(kv)
    gather(layout, layers, slots, out)
    torch.cuda.synchronize()
    assert torch.equal(out, kv)


def vllm_writer(isa: str, dim: int = DIM, block: int = BLOCK) -> CpuWriter:
    """vLLM's own CPU KV writer (the kernel its attention inserts KV with) for ``isa``."""
    import vllm._custom_ops  # noqa: F401  (loads vLLM's kernels)

    return CpuWriter(torch.ops._C.cpu_attn_reshape_and_cache, isa, HEADS, dim, block)


AMX = pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="vLLM's 'amx' kernels need a CPU with AMX")


@pytest.mark.parametrize(
    ("isa", "dtype", "dim", "block", "expected"),
    [
        ("vec", torch.bfloat16, 64, 32, "cpu"),
        ("vec", torch.float32, 32, 32, "cpu"),
        ("vec16", torch.bfloat16, 48, 16, "cpu"),
        pytest.param("amx", torch.bfloat16, 64, 128, "cpu-amx", marks=AMX),
        pytest.param("amx", torch.bfloat16, 32, 32, "cpu-amx", marks=AMX),
    ],
)
def test_the_layout_is_found_from_vllms_own_writer(
    isa: str, dtype: torch.dtype, dim: int, block: int, expected: str
) -> None:
    """vLLM lays CPU KV out per ISA (AMX tiles K and V differently): the layout lmplug reads with
    is the one that reads back what vLLM's kernel wrote, for whole blocks and parts of blocks."""
    writer = vllm_writer(isa, dim, block)
    layout = detect_cpu_layout(writer, dtype)
    assert layout.name == expected
    cpu = torch.device("cpu")
    for block_ids, start, end in [([4, 0, 5, 2], 3, 3 * block + 5), ([5, 1], 0, 2 * block), ([3], 2, block - 1)]:
        kv = torch.randn(2, end - start, HEADS * dim).to(dtype)
        by_vllm = torch.randn(layout.cache_shape(BLOCKS)).to(dtype)
        by_lmplug = by_vllm.clone()
        writer.write(by_vllm, slot_tensor(block_ids, start, end, block), kv)
        placement = Placement.of(block_ids, start, end, block, cpu)
        layout.scatter_placed(by_lmplug, placement, kv)
        assert torch.equal(by_lmplug, by_vllm)  # the same bytes, untouched slots included
        out = torch.empty_like(kv)
        layout.gather_placed(by_vllm, placement, out)
        assert torch.equal(out, kv)


class _UntransposedWriter(CpuWriter):
    """A writer whose layout lmplug does not know (K not transposed), standing in for a new ISA."""

    def write(self, layer: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor) -> None:
        blocks, offsets = slots // self.block_size, slots % self.block_size
        layer[blocks, :, offsets] = torch.cat([kv[0], kv[1]], dim=1).view(len(slots), HEADS, 2, DIM).flatten(2)


def test_an_unknown_cpu_layout_is_refused_with_its_isa_named() -> None:
    with pytest.raises(KVShapeError, match=r"ISA 'future'.*lmplug does not know \(tried cpu, cpu-amx\)"):
        detect_cpu_layout(_UntransposedWriter(lambda *args: None, "future", HEADS, DIM, BLOCK), torch.bfloat16)
    with pytest.raises(KVShapeError, match=r"ISA 'bogus'.*failed: Invalid ISA"):
        detect_cpu_layout(vllm_writer("bogus"), torch.bfloat16)


CPU_GEOMETRIES = [  # (kv_heads, head_size, block_size)
    (HEADS, DIM, BLOCK),
    (4, 64, 128),  # the bench model's, vLLM's CPU default block size
    (1, 128, 32),
    (3, 48, 16),  # vLLM's vec16 ISA takes 16-token blocks
]


@pytest.mark.parametrize("name", ["cpu", "cpu-amx"])
@pytest.mark.parametrize("geometry", CPU_GEOMETRIES)
@pytest.mark.parametrize(
    ("block_ids", "start", "end"),  # start and end in blocks
    [
        ([2, 3, 4, 5], 0, 4),  # consecutive whole blocks
        ([5, 1, 3, 0], 0, 4),  # scattered whole blocks
        ([4, 0, 5, 2], 0.25, 3.5),  # parts of blocks before and after the whole ones
        ([3], 0, 1),  # one block
    ],
)
def test_compiled_block_copies_move_the_bytes_torch_moves(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    geometry: tuple[int, int, int],
    block_ids: list[int],
    start: float,
    end: float,
) -> None:
    """The numba kernels and torch's indexing write and read the same bytes, every bit
    pattern included (random 16-bit words: NaN payloads, negative zeros, infinities)."""
    pytest.importorskip("numba")
    heads, dim, block = geometry
    layout = layout_for(name, heads, dim, block)
    first, last = int(start * block), int(end * block)
    placement = Placement.of(block_ids, first, last, block, torch.device("cpu"))
    generator = torch.Generator().manual_seed(2)

    def bits(*shape: int) -> torch.Tensor:
        return torch.randint(-(2**15), 2**15, shape, dtype=torch.int16, generator=generator).view(torch.bfloat16)

    layer = bits(*layout.cache_shape(BLOCKS))
    kv = bits(2, last - first, heads * dim)
    compiled, by_torch = layer.clone(), layer.clone()
    read_compiled, read_by_torch = bits(*kv.shape), bits(*kv.shape)
    assert paged._block_copies(name) is not None
    layout.scatter_placed(compiled, placement, kv)
    layout.gather_placed(layer, placement, read_compiled)
    with monkeypatch.context() as patch:
        patch.setattr(paged, "_block_copies", lambda name: None)
        layout.scatter_placed(by_torch, placement, kv)
        layout.gather_placed(layer, placement, read_by_torch)
    assert torch.equal(compiled.view(torch.int16), by_torch.view(torch.int16))
    assert torch.equal(read_compiled.view(torch.int16), read_by_torch.view(torch.int16))
    layout.gather_placed(compiled, placement, read_compiled)
    assert torch.equal(read_compiled.view(torch.int16), kv.view(torch.int16))


def test_cpu_layouts_copy_with_torch_without_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "lmplug.integrations.vllm.cpu_kernels", raising=False)
    monkeypatch.setattr(paged, "_block_copies", paged._block_copies.__wrapped__)  # not the cached kernels
    assert paged._block_copies("cpu") is None
    layout = layout_for("cpu", HEADS, DIM, BLOCK)
    layer = torch.zeros(layout.cache_shape(BLOCKS), dtype=torch.bfloat16)
    kv = torch.randn(2, 2 * BLOCK, HEADS * DIM).to(torch.bfloat16)
    placement = Placement.of([3, 1], 0, 2 * BLOCK, BLOCK, torch.device("cpu"))
    layout.scatter_placed(layer, placement, kv)
    out = torch.empty_like(kv)
    layout.gather_placed(layer, placement, out)
    assert torch.equal(out, kv)


def test_compiled_block_copies_refuse_blocks_outside_the_layer() -> None:
    """The kernels do not check their indices: the copies check the block ids and shapes first."""
    cpu_kernels = pytest.importorskip("lmplug.integrations.vllm.cpu_kernels")
    copies = cpu_kernels.block_copies("cpu")
    layer = torch.zeros(layout_for("cpu", HEADS, DIM, BLOCK).cache_shape(BLOCKS), dtype=torch.bfloat16)
    kv = torch.zeros(2, BLOCK, HEADS * DIM, dtype=torch.bfloat16)
    for ids in ([BLOCKS], [-1]):
        with pytest.raises(KVShapeError, match=r"block copy of 1 blocks"):
            copies.save(layer, np.array(ids, dtype=np.int64), kv[0], kv[1], (HEADS, DIM, BLOCK))
    with pytest.raises(KVShapeError, match=r"does not fit"):  # two blocks' rows for one block
        copies.load(layer, np.array([1], dtype=np.int64), kv[0].repeat(2, 1), kv[1], (HEADS, DIM, BLOCK))


def test_compiled_block_copies_compile_without_a_writable_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where numba finds no directory to cache machine code in (a read-only install), the
    kernels are compiled for the process alone."""
    cpu_kernels = pytest.importorskip("lmplug.integrations.vllm.cpu_kernels")
    njit = cpu_kernels.numba.njit

    def uncached_njit(*args: object, cache: bool = False, **kwargs: object) -> object:
        if cache:
            raise RuntimeError("cannot cache function: no locator available for file")
        return njit(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels.numba, "njit", uncached_njit)
    copies = cpu_kernels.block_copies.__wrapped__("cpu")
    layout = paged.CpuLayout(HEADS, DIM, BLOCK)
    layer = torch.randn(layout.cache_shape(BLOCKS)).to(torch.bfloat16)
    out, expected = torch.empty(2, 2, 2 * BLOCK, HEADS * DIM, dtype=torch.bfloat16).unbind()
    copies.save(layer, np.array([4, 2], dtype=np.int64), out[0], out[1], (HEADS, DIM, BLOCK))
    layout._gather_blocks(layer, torch.tensor([4, 2]), expected)
    assert torch.equal(out, expected)
