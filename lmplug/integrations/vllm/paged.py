"""Gather and scatter between vLLM's paged KV cache and lmplug's chunk layout.

vLLM keeps KV in blocks of ``block_size`` token slots; a token's slot is
``block_id * block_size + offset`` (its *slot mapping*). lmplug keeps the KV of ``n``
tokens as ``[2, layers, n, kv_heads * head_size]``. Both directions here are a few
tensor indexing operations per layer, with block and offset index tensors derived once
from the slots, on CPU and CUDA tensors alike (no per-token Python loops).

Per-layer cache layouts (the logical shape of the tensor vLLM hands the connector; the
physical stride order does not matter, indexing follows the strides):

- ``cpu`` (vLLM's CPU attention, ISA ``vec``): ``[num_blocks, kv_heads, block_size,
  2 * head_size]``, where each ``(block, head)`` slab holds K transposed as
  ``[head_size, block_size]`` followed by V as ``[block_size, head_size]``.
- ``flash`` (FlashAttention and most CUDA backends): ``[2, num_blocks, block_size,
  kv_heads, head_size]``.
- ``flashinfer``: ``[num_blocks, 2, block_size, kv_heads, head_size]``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmplug.errors import KVShapeError


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

    def _blocks(self, placement: Placement, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole-block part of ``kv`` ``[2, n, hidden]`` as ``[count, block_size, heads, dim]`` K and V."""
        shape = (placement.count, self.block_size, self.num_kv_heads, self.head_size)
        part = kv.narrow(1, placement.lead, placement.count * self.block_size)
        return part[0].view(shape), part[1].view(shape)

    def scatter_placed(self, layer: torch.Tensor, placement: Placement, kv: torch.Tensor) -> None:
        """Write ``kv`` ``[2, n, hidden]`` into one layer where ``placement`` says, whole blocks at a time."""
        if placement.head is not None:
            self.scatter_layer(layer, placement.head, kv[:, : placement.lead])
        if placement.count:
            k, v = self._blocks(placement, kv)
            k_planes, v_planes = self._block_planes(layer)
            if placement.run is not None:
                k_planes[placement.run].copy_(k)
                v_planes[placement.run].copy_(v)
            else:
                assert placement.whole is not None
                k_planes[placement.whole] = k
                v_planes[placement.whole] = v
        if placement.tail is not None:
            self.scatter_layer(layer, placement.tail, kv[:, placement.lead + placement.count * self.block_size :])

    def gather_placed(self, layer: torch.Tensor, placement: Placement, out: torch.Tensor) -> None:
        """Copy one layer's KV where ``placement`` says into ``out`` ``[2, n, hidden]``, whole blocks at a time."""
        if placement.head is not None:
            self.gather_layer(layer, placement.head, out[:, : placement.lead])
        if placement.count:
            k, v = self._blocks(placement, out)
            k_planes, v_planes = self._block_planes(layer)
            index = placement.run if placement.run is not None else placement.whole
            assert index is not None
            k.copy_(k_planes[index])
            v.copy_(v_planes[index])
        if placement.tail is not None:
            self.gather_layer(layer, placement.tail, out[:, placement.lead + placement.count * self.block_size :])


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


LAYOUTS: dict[str, type[PagedLayout]] = {cls.name: cls for cls in (CpuLayout, FlashLayout, FlashInferLayout)}


def layout_for(name: str, num_kv_heads: int, head_size: int, block_size: int) -> PagedLayout:
    """The layout named ``name`` (``cpu``, ``flash`` or ``flashinfer``) for this geometry."""
    try:
        return LAYOUTS[name](num_kv_heads, head_size, block_size)
    except KeyError:
        known = ", ".join(sorted(LAYOUTS))
        raise KVShapeError(f"unknown vLLM KV cache layout {name!r}; lmplug supports {known}") from None
