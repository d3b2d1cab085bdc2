"""Gather and scatter between vLLM's paged KV cache and lmplug's chunk layout.

vLLM keeps KV in blocks of ``block_size`` token slots; a token's slot is
``block_id * block_size + offset`` (its *slot mapping*). lmplug keeps the KV of ``n``
tokens as ``[2, layers, n, kv_heads * head_size]``. Both directions here are a few
tensor indexing operations per layer, with block and offset index tensors derived once
from the slots, on CPU and CUDA tensors alike (no per-token Python loops).

Per-layer cache layouts (the logical shape of the tensor vLLM hands the connector; the
physical stride order does not matter, indexing follows the strides):

- ``cpu`` (vLLM's CPU attention, ISAs ``vec`` and ``vec16``): ``[num_blocks, kv_heads,
  block_size, 2 * head_size]``, where each ``(block, head)`` slab holds K transposed as
  ``[head_size, block_size]`` followed by V as ``[block_size, head_size]``.
- ``cpu-amx`` (vLLM's CPU attention, ISA ``amx``: bfloat16 on CPUs with AMX tiles): the
  same tensor, but each slab holds K in tiles of 16 tokens with pairs of dimensions
  interleaved, ``[block_size/16, head_size/2, 16, 2]``, then V in tiles of 16 dimensions
  with pairs of tokens interleaved, ``[head_size/16, block_size/2, 16, 2]`` (the operand
  layouts of AMX's bfloat16 dot products).

vLLM picks the CPU ISA per machine, so the worker never assumes one: it writes sample KV
with vLLM's own writer (the kernel its attention inserts new KV with) and uses the layout
whose reads give that KV back (:func:`detect_cpu_layout`). Whole blocks of 16-bit KV move
between the CPU layouts and chunks through compiled kernels (:mod:`.cpu_kernels`, with numba,
which vLLM installs), else through torch's indexing.
- ``flash`` (FlashAttention and most CUDA backends): ``[2, num_blocks, block_size,
  kv_heads, head_size]``.
- ``flashinfer``: ``[num_blocks, 2, block_size, kv_heads, head_size]``.
"""

from __future__ import annotations

import abc
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from lmplug.errors import KVShapeError

if TYPE_CHECKING:
    from lmplug.integrations.vllm.cpu_kernels import BlockCopies


@dataclass(frozen=True, slots=True)
class Slots:
    """Token slots split once into block ids and in-block offsets (index tensors on the cache's device)."""

    blocks: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def of(cls, slot_mapping: torch.Tensor, block_size: int, device: torch.device) -> Slots:
        slots = slot_mapping.to(device=device, dtype=torch.int64, non_blocking=True)
        return cls(torch.div(slots, block_size, rounding_mode="floor"), torch.remainder(slots, block_size))

    def __len__(self) -> int:
        return int(self.blocks.shape[0])


@dataclass(frozen=True, slots=True)
class Placement:
    """Where tokens ``[start, end)`` of a request lie in the paged cache, for block-wise copies.

    The range's whole blocks, beginning ``lead`` tokens into it, are copied a block at a
    time: ``run`` when their ids are consecutive (a slice of the cache), else by the index
    tensor ``whole``. Tokens before them (``head``) and after them (``tail``) are addressed
    slot by slot.
    """

    num_tokens: int
    lead: int
    count: int
    whole: torch.Tensor | None
    run: slice | None
    head: Slots | None
    tail: Slots | None

    @classmethod
    def of(cls, block_ids: Sequence[int], start: int, end: int, block_size: int, device: torch.device) -> Placement:
        first = -(-start // block_size)
        last = end // block_size
        if last <= first:
            return cls(end - start, end - start, 0, None, None, _slots(block_ids, start, end, block_size, device), None)
        ids = list(block_ids[first:last])
        consecutive = ids[-1] - ids[0] == len(ids) - 1 and ids == list(range(ids[0], ids[-1] + 1))
        run = slice(ids[0], ids[-1] + 1) if consecutive else None
        whole = None if consecutive else torch.tensor(ids, dtype=torch.int64).to(device, non_blocking=True)
        lead = first * block_size - start
        head = _slots(block_ids, start, first * block_size, block_size, device) if lead else None
        tail = _slots(block_ids, last * block_size, end, block_size, device) if last * block_size < end else None
        return cls(end - start, lead, len(ids), whole, run, head, tail)


def _slots(block_ids: Sequence[int], start: int, end: int, block_size: int, device: torch.device) -> Slots:
    positions = torch.arange(start, end, dtype=torch.int64)
    blocks = torch.tensor(block_ids, dtype=torch.int64)[positions // block_size]
    return Slots.of(blocks * block_size + positions % block_size, block_size, device)


class PagedLayout(abc.ABC):
    """One of vLLM's per-layer KV cache layouts."""

    name: str
    loads_through_writer = False
    """Whether loads on the CPU go through vLLM's own writer (:class:`CpuWriter`), faster than
    this layout's scatter (measured by the ``connector_copy`` benchmark)."""

    def __init__(self, num_kv_heads: int, head_size: int, block_size: int) -> None:
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.block_size = block_size

    @abc.abstractmethod
    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """The logical shape of one layer's cache with ``num_blocks`` blocks."""

    @abc.abstractmethod
    def _k_v(self, layer: torch.Tensor, slots: Slots) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(K, V)`` of ``layer`` that index as ``[token, head, dim]`` with ``slots``."""

    def check(self, layer: torch.Tensor) -> None:
        if layer.dim() != len(self.cache_shape(1)) or tuple(layer.shape) != self.cache_shape(self._num_blocks(layer)):
            raise KVShapeError(
                f"vLLM KV cache layer of shape {list(layer.shape)} is not the {self.name!r} layout "
                f"{list(self.cache_shape(self._num_blocks(layer)))} (kv_heads={self.num_kv_heads}, "
                f"head_size={self.head_size}, block_size={self.block_size})"
            )

    def _num_blocks(self, layer: torch.Tensor) -> int:
        return int(layer.shape[0])

    def gather_layer(self, layer: torch.Tensor, slots: Slots, out: torch.Tensor) -> None:
        """Copy the KV of ``slots`` from one layer into ``out`` ``[2, n, kv_heads*head_size]``."""
        hidden = self.num_kv_heads * self.head_size
        k, v = self._k_v(layer, slots)
        out[0].copy_(k.reshape(len(slots), hidden), non_blocking=True)
        out[1].copy_(v.reshape(len(slots), hidden), non_blocking=True)

    def scatter_layer(self, layer: torch.Tensor, slots: Slots, kv: torch.Tensor) -> None:
        """Write ``kv`` ``[2, n, kv_heads*head_size]`` (on the layer's device) into the slots of one layer."""
        shape = (len(slots), self.num_kv_heads, self.head_size)
        self._put(layer, slots, kv[0].reshape(shape), kv[1].reshape(shape))

    @abc.abstractmethod
    def _put(self, layer: torch.Tensor, slots: Slots, k: torch.Tensor, v: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def _block_planes(self, layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(K, V)`` of ``layer`` as ``[blocks, block_size, heads, dim]`` (strided as the layout is)."""

    def _chunk_blocks(self, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``part`` ``[2, count * block_size, hidden]`` as ``[count, block_size, heads, dim]`` K and V."""
        shape = (-1, self.block_size, self.num_kv_heads, self.head_size)
        return part[0].view(shape), part[1].view(shape)

    def _write_blocks(self, layer: torch.Tensor, index: slice | torch.Tensor, part: torch.Tensor) -> None:
        """Write ``part`` ``[2, count * block_size, hidden]`` into the blocks ``index`` selects."""
        k, v = self._chunk_blocks(part)
        k_planes, v_planes = self._block_planes(layer)
        _put_blocks(k_planes, index, k)
        _put_blocks(v_planes, index, v)

    def _read_blocks(self, layer: torch.Tensor, index: slice | torch.Tensor, part: torch.Tensor) -> None:
        """Copy the blocks ``index`` selects into ``part`` ``[2, count * block_size, hidden]``."""
        k, v = self._chunk_blocks(part)
        k_planes, v_planes = self._block_planes(layer)
        ids = _block_index(index, layer.device)
        torch.index_select(k_planes, 0, ids, out=k)
        torch.index_select(v_planes, 0, ids, out=v)

    def _whole(self, placement: Placement, kv: torch.Tensor) -> tuple[slice | torch.Tensor, torch.Tensor]:
        """The index of ``placement``'s whole blocks and the part of ``kv`` ``[2, n, hidden]`` they hold."""
        index = placement.run if placement.run is not None else placement.whole
        assert index is not None
        return index, kv.narrow(1, placement.lead, placement.count * self.block_size)

    def scatter_placed(self, layer: torch.Tensor, placement: Placement, kv: torch.Tensor) -> None:
        """Write ``kv`` ``[2, n, hidden]`` into one layer where ``placement`` says, whole blocks at a time."""
        if placement.head is not None:
            self.scatter_layer(layer, placement.head, kv[:, : placement.lead])
        if placement.count:
            self._write_blocks(layer, *self._whole(placement, kv))
        if placement.tail is not None:
            self.scatter_layer(layer, placement.tail, kv[:, placement.lead + placement.count * self.block_size :])

    def gather_placed(self, layer: torch.Tensor, placement: Placement, out: torch.Tensor) -> None:
        """Copy one layer's KV where ``placement`` says into ``out`` ``[2, n, hidden]``, whole blocks at a time."""
        if placement.head is not None:
            self.gather_layer(layer, placement.head, out[:, : placement.lead])
        if placement.count:
            self._read_blocks(layer, *self._whole(placement, out))
        if placement.tail is not None:
            self.gather_layer(layer, placement.tail, out[:, placement.lead + placement.count * self.block_size :])


def _block_index(index: slice | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Block ids as an index tensor: ``index_select`` gathers blocks through a strided view
    straight into its ``out`` in one pass (indexing with ``[]`` copies the blocks first)."""
    if isinstance(index, slice):
        return torch.arange(index.start, index.stop, dtype=torch.int64, device=device)
    return index


@functools.cache
def _block_copies(layout: str) -> BlockCopies | None:
    """The compiled block copies of a CPU layout (:mod:`.cpu_kernels`), None without numba."""
    try:
        from lmplug.integrations.vllm.cpu_kernels import block_copies
    except ModuleNotFoundError as exc:
        if exc.name not in ("numba", "llvmlite"):
            raise
        return None
    return block_copies(layout)


def _block_ids(index: slice | torch.Tensor) -> np.ndarray:
    """Block ids (CPU) as an int64 array for the compiled copies."""
    if isinstance(index, slice):
        return np.arange(index.start, index.stop, dtype=np.int64)
    return index.numpy()


def _pair_words(rows: int, width: int, device: torch.device) -> torch.Tensor:
    """A buffer for ``rows * width`` int32 pairs to be split by :func:`_split_pairs`: one
    spare word at the end, which its reads of the last high half may touch."""
    return torch.empty(rows * width + 1, dtype=torch.int32, device=device)


def _split_pairs(words: torch.Tensor, rows: int, width: int, out: torch.Tensor) -> None:
    """Split ``words`` (from :func:`_pair_words`; ``rows * width`` int32, each a pair of
    16-bit values) into ``out`` ``[rows, 2, width]`` (int16): the low halves of a row to
    ``out[row, 0]``, the high halves to ``out[row, 1]`` (on a little-endian machine, the
    low half is the pair's first value in memory).

    On the CPU, one pass: numpy reads the int32 at byte offsets 0 and 2 of each word (the
    latter unaligned, its high half from the next word) and keeps the low 16 bits of each.
    Elsewhere: a truncating copy, a shift in place, a truncating copy.
    """
    if words.device.type == "cpu":
        both = np.ndarray(
            (rows, 2, width), dtype=np.int32, buffer=words.numpy(), strides=(4 * width, 2, 4)
        )  # fmt: skip
        np.copyto(out.numpy(), both, casting="unsafe")  # int32 -> int16 keeps the low half
        return
    flat = words[: rows * width].view(rows, width)
    out[:, 0].copy_(flat)
    torch.bitwise_right_shift(flat, 16, out=flat)
    out[:, 1].copy_(flat)


def _put_blocks(planes: torch.Tensor, index: slice | torch.Tensor, value: torch.Tensor) -> None:
    """``planes[index] = value`` for whole blocks: a copy into a slice, an index_put for scattered ids."""
    if isinstance(index, slice):
        planes[index].copy_(value)
    else:
        planes[index] = value


class CpuLayout(PagedLayout):
    """vLLM's CPU attention layout: per (block, head), K transposed then V."""

    name = "cpu"

    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, self.num_kv_heads, self.block_size, 2 * self.head_size)

    def _planes(self, layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks, heads, size, dim = layer.shape[0], self.num_kv_heads, self.block_size, self.head_size
        # view, never reshape: a silent copy would make scatter write into a temporary.
        slab = layer.view(blocks, heads, 2, size * dim)
        return slab[:, :, 0].view(blocks, heads, dim, size), slab[:, :, 1].view(blocks, heads, size, dim)

    def _k_v(self, layer: torch.Tensor, slots: Slots) -> tuple[torch.Tensor, torch.Tensor]:
        k_t, v = self._planes(layer)
        # Advanced indices around slices put the token dimension first: [n, heads, dim].
        return k_t[slots.blocks, :, :, slots.offsets], v[slots.blocks, :, slots.offsets, :]

    def _put(self, layer: torch.Tensor, slots: Slots, k: torch.Tensor, v: torch.Tensor) -> None:
        k_t, v_plane = self._planes(layer)
        k_t[slots.blocks, :, :, slots.offsets] = k
        v_plane[slots.blocks, :, slots.offsets, :] = v

    def _block_planes(self, layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_t, v = self._planes(layer)  # [blocks, heads, dim, size] (K transposed) and [blocks, heads, size, dim]
        return k_t.permute(0, 3, 1, 2), v.permute(0, 2, 1, 3)

    def _copies(self, layer: torch.Tensor, part: torch.Tensor) -> BlockCopies | None:
        """The compiled block copies where they apply (16-bit KV in contiguous CPU tensors on a
        little-endian host, head and block sizes in multiples of 16, as vLLM's CPU attention
        takes them), else None: torch's copies."""
        applies = (
            layer.device.type == "cpu"
            and layer.element_size() == 2
            and sys.byteorder == "little"
            and self.head_size % 16 == 0
            and self.block_size % 16 == 0
            and layer.is_contiguous()
            and part[0].is_contiguous()
            and part[1].is_contiguous()
        )
        return _block_copies(self.name) if applies else None

    def _read_blocks(self, layer: torch.Tensor, index: slice | torch.Tensor, part: torch.Tensor) -> None:
        copies = self._copies(layer, part)
        if copies is None:
            self._gather_blocks(layer, index, part)
        else:
            copies.save(layer, _block_ids(index), part[0], part[1], self._geometry)

    def _write_blocks(self, layer: torch.Tensor, index: slice | torch.Tensor, part: torch.Tensor) -> None:
        copies = self._copies(layer, part)
        if copies is None:
            self._scatter_blocks(layer, index, part)
        else:
            copies.load(layer, _block_ids(index), part[0], part[1], self._geometry)

    @property
    def _geometry(self) -> tuple[int, int, int]:
        return self.num_kv_heads, self.head_size, self.block_size

    def _scatter_blocks(self, layer: torch.Tensor, index: slice | torch.Tensor, part: torch.Tensor) -> None:
        """:meth:`_write_blocks` with torch."""
        super()._write_blocks(layer, index, part)

    def _gather_blocks(self, layer: torch.Tensor, index: slice | torch.Tensor, part: torch.Tensor) -> None:
        """:meth:`_read_blocks` with torch."""
        # K is transposed: two adjacent tokens of a dimension are read as one int32, so the
        # transposing gather moves 4 bytes at a time; the pairs are then split into the
        # even and the odd token's rows.
        if layer.element_size() != 2 or sys.byteorder != "little":
            PagedLayout._read_blocks(self, layer, index, part)
            return
        count, size, heads, dim = part.shape[1] // self.block_size, self.block_size, self.num_kv_heads, self.head_size
        blocks = layer.shape[0]
        ids = _block_index(index, layer.device)
        k_words = (
            layer.view(torch.int32).view(blocks, heads, 2, size * dim // 2)[:, :, 0].view(blocks, heads, dim, size // 2)
        )
        rows, width = count * size // 2, heads * dim
        words = _pair_words(rows, width, layer.device)
        torch.index_select(k_words.permute(0, 3, 1, 2), 0, ids, out=words[:-1].view(count, size // 2, heads, dim))
        _split_pairs(words, rows, width, part[0].view(torch.int16).view(rows, 2, width))
        torch.index_select(self._planes(layer)[1].permute(0, 2, 1, 3), 0, ids, out=self._chunk_blocks(part)[1])


class CpuAmxLayout(CpuLayout):
    """vLLM's CPU attention layout for ISA ``amx``: per (block, head), K in 16-token tiles with
    dimension pairs interleaved, then V in 16-dimension tiles with token pairs interleaved."""

    name = "cpu-amx"
    # Whole blocks scatter through the compiled kernels about as fast as vLLM's writer moves
    # them (a little faster: connector_copy's info row); parts of blocks, element by element.
    loads_through_writer = True

    def __init__(self, num_kv_heads: int, head_size: int, block_size: int) -> None:
        super().__init__(num_kv_heads, head_size, block_size)
        if block_size % 16 or head_size % 16:
            raise KVShapeError(
                f"the 'cpu-amx' layout needs block_size and head_size that are multiples of 16, "
                f"not {block_size} and {head_size}"
            )

    def _tiles(self, layer: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K ``[blocks, heads, size/16, dim/2, 16, 2]`` and V ``[blocks, heads, dim/16, size/2, 16, 2]``;
        with ``dtype=torch.int32`` each interleaved pair is one element (the trailing 2 dropped)."""
        blocks, heads, size, dim = layer.shape[0], self.num_kv_heads, self.block_size, self.head_size
        pair = 1
        if dtype is not None:
            layer, pair = layer.view(dtype), 2
        slab = layer.view(blocks, heads, 2, size * dim // pair)
        k = slab[:, :, 0].view(blocks, heads, size // 16, dim // 2, 16, 2 // pair)
        v = slab[:, :, 1].view(blocks, heads, dim // 16, size // 2, 16, 2 // pair)
        return (k, v) if pair == 1 else (k.squeeze(-1), v.squeeze(-1))

    def _k_v(self, layer: torch.Tensor, slots: Slots) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._tiles(layer)
        blocks, offsets = slots.blocks, slots.offsets
        # Advanced indices around slices put the token dimension first.
        k_of = k[blocks, :, offsets // 16, :, offsets % 16, :]  # [n, heads, dim/2, 2]
        v_of = v[blocks, :, :, offsets // 2, :, offsets % 2]  # [n, heads, dim/16, 16]
        shape = (len(slots), self.num_kv_heads, self.head_size)
        return k_of.reshape(shape), v_of.reshape(shape)

    def _put(self, layer: torch.Tensor, slots: Slots, k: torch.Tensor, v: torch.Tensor) -> None:
        k_tiles, v_tiles = self._tiles(layer)
        blocks, offsets = slots.blocks, slots.offsets
        heads, dim = self.num_kv_heads, self.head_size
        k_tiles[blocks, :, offsets // 16, :, offsets % 16, :] = k.reshape(len(slots), heads, dim // 2, 2)
        v_tiles[blocks, :, :, offsets // 2, :, offsets % 2] = v.reshape(len(slots), heads, dim // 16, 16)

    def _block_planes(self, layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("the 'cpu-amx' layout copies whole blocks through its tiles")

    def _scatter_blocks(self, layer: torch.Tensor, index: slice | torch.Tensor, part: torch.Tensor) -> None:
        count, size, heads, dim = part.shape[1] // self.block_size, self.block_size, self.num_kv_heads, self.head_size
        k_tiles, v_tiles = self._tiles(layer)
        k = part[0].view(count, size // 16, 16, heads, dim // 2, 2).permute(0, 3, 1, 4, 2, 5)
        v = part[1].view(count, size // 2, 2, heads, dim // 16, 16).permute(0, 3, 4, 1, 5, 2)
        _put_blocks(k_tiles, index, k)
        _put_blocks(v_tiles, index, v)

    def _gather_blocks(self, layer: torch.Tensor, index: slice | torch.Tensor, part: torch.Tensor) -> None:
        # Each interleaved pair read as one int32: K's pairs are a token's adjacent dimensions
        # (one 4-byte move); V's are two tokens, split into the even and the odd token's rows.
        if layer.element_size() != 2:
            raise KVShapeError(f"the 'cpu-amx' layout holds 16-bit KV, not {layer.dtype}")
        count, size, heads, dim = part.shape[1] // self.block_size, self.block_size, self.num_kv_heads, self.head_size
        ids = _block_index(index, layer.device)
        k_words, v_words = self._tiles(layer, torch.int32)
        k_out = part[0].view(torch.int32).view(count, size // 16, 16, heads, dim // 2)
        torch.index_select(k_words.permute(0, 2, 4, 1, 3), 0, ids, out=k_out)
        rows, width = count * size // 2, heads * dim
        words = _pair_words(rows, width, layer.device)
        torch.index_select(
            v_words.permute(0, 3, 1, 2, 4), 0, ids, out=words[:-1].view(count, size // 2, heads, dim // 16, 16)
        )
        _split_pairs(words, rows, width, part[1].view(torch.int16).view(rows, 2, width))


class FlashLayout(PagedLayout):
    """``[2, num_blocks, block_size, kv_heads, head_size]`` (FlashAttention and most CUDA backends)."""

    name = "flash"

    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (2, num_blocks, self.block_size, self.num_kv_heads, self.head_size)

    def _num_blocks(self, layer: torch.Tensor) -> int:
        return int(layer.shape[1])

    def _k_v(self, layer: torch.Tensor, slots: Slots) -> tuple[torch.Tensor, torch.Tensor]:
        return layer[0][slots.blocks, slots.offsets], layer[1][slots.blocks, slots.offsets]

    def _put(self, layer: torch.Tensor, slots: Slots, k: torch.Tensor, v: torch.Tensor) -> None:
        layer[0][slots.blocks, slots.offsets] = k
        layer[1][slots.blocks, slots.offsets] = v

    def _block_planes(self, layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return layer[0], layer[1]  # [blocks, size, heads, dim]


class FlashInferLayout(PagedLayout):
    """``[num_blocks, 2, block_size, kv_heads, head_size]`` (FlashInfer)."""

    name = "flashinfer"

    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, 2, self.block_size, self.num_kv_heads, self.head_size)

    def _k_v(self, layer: torch.Tensor, slots: Slots) -> tuple[torch.Tensor, torch.Tensor]:
        return layer[:, 0][slots.blocks, slots.offsets], layer[:, 1][slots.blocks, slots.offsets]

    def _put(self, layer: torch.Tensor, slots: Slots, k: torch.Tensor, v: torch.Tensor) -> None:
        layer[:, 0][slots.blocks, slots.offsets] = k
        layer[:, 1][slots.blocks, slots.offsets] = v

    def _block_planes(self, layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return layer[:, 0], layer[:, 1]  # [blocks, size, heads, dim]


LAYOUTS: dict[str, type[PagedLayout]] = {
    cls.name: cls for cls in (CpuLayout, CpuAmxLayout, FlashLayout, FlashInferLayout)
}


def layout_for(name: str, num_kv_heads: int, head_size: int, block_size: int) -> PagedLayout:
    """The layout named ``name`` (``cpu``, ``flash`` or ``flashinfer``) for this geometry."""
    try:
        return LAYOUTS[name](num_kv_heads, head_size, block_size)
    except KeyError:
        known = ", ".join(sorted(LAYOUTS))
        raise KVShapeError(f"unknown vLLM KV cache layout {name!r}; lmplug supports {known}") from None


CPU_LAYOUTS: tuple[type[CpuLayout], ...] = (CpuLayout, CpuAmxLayout)


def slot_tensor(block_ids: Sequence[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """The slots of tokens ``[start, end)`` of a request whose blocks are ``block_ids`` (int64, CPU)."""
    positions = torch.arange(start, end, dtype=torch.int64)
    return torch.tensor(block_ids, dtype=torch.int64)[positions // block_size] * block_size + positions % block_size


class CpuWriter:
    """vLLM's own CPU KV writer: the kernel its attention inserts new KV with, for one ISA.

    ``op`` is ``torch.ops._C.cpu_attn_reshape_and_cache`` (key, value, key_cache,
    value_cache, slot_mapping, isa, k_scale, v_scale, kv_cache_dtype). It lays K and V out
    as that ISA's attention reads them, whatever the layout, so loads written through it
    are right by construction.
    """

    def __init__(self, op: Callable[..., object], isa: str, num_kv_heads: int, head_size: int, block_size: int) -> None:
        self.op = op
        self.isa = isa
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.block_size = block_size

    def write(self, layer: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Write ``kv`` ``[2, n, kv_heads*head_size]`` into ``slots`` (int64 ``[n]``) of one layer."""
        blocks, heads, dim = layer.shape[0], self.num_kv_heads, self.head_size
        key_cache, value_cache = layer.view(blocks, heads, 2 * self.block_size, dim).chunk(2, dim=2)
        n = int(slots.shape[0])
        self.op(kv[0].view(n, heads, dim), kv[1].view(n, heads, dim), key_cache, value_cache, slots,
                self.isa, 1.0, 1.0, "auto")  # fmt: skip


def detect_cpu_layout(writer: CpuWriter, dtype: torch.dtype) -> CpuLayout:
    """The CPU layout whose reads give back KV that ``writer`` wrote: sample KV over one whole
    block and parts of two others, written by vLLM and gathered by each known layout."""
    heads, dim, size = writer.num_kv_heads, writer.head_size, writer.block_size
    start, end = size // 2 + 1, 3 * size - size // 4
    generator = torch.Generator().manual_seed(0)
    kv = torch.randn(2, end - start, heads * dim, generator=generator).to(dtype)
    slots = torch.arange(start, end, dtype=torch.int64)
    tried = []
    for cls in CPU_LAYOUTS:
        try:
            layout = cls(heads, dim, size)
        except KVShapeError:
            continue
        tried.append(cls.name)
        layer = torch.zeros(layout.cache_shape(3), dtype=dtype)
        try:
            writer.write(layer, slots, kv)
        except RuntimeError as exc:  # the kernel refuses this ISA, dtype or geometry
            raise KVShapeError(f"vLLM's CPU KV writer (ISA {writer.isa!r}, {dtype}) failed: {exc}") from exc
        out = torch.empty_like(kv)
        layout.gather_placed(layer, Placement.of([0, 1, 2], start, end, size, layer.device), out)
        if torch.equal(out, kv):
            return layout
    raise KVShapeError(
        f"vLLM's CPU attention (ISA {writer.isa!r}, {dtype}, kv_heads={heads}, head_size={dim}, "
        f"block_size={size}) lays KV out in a way lmplug does not know (tried {', '.join(tried)})"
    )
