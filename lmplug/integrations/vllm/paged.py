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

    def gather(self, layers: Sequence[torch.Tensor], slots: Slots, out: torch.Tensor) -> None:
        """Copy the KV of ``slots`` from every layer into ``out`` ``[2, layers, n, kv_heads*head_size]``."""
        for index, layer in enumerate(layers):
            self.gather_layer(layer, slots, out[:, index])

    def gather_layer(self, layer: torch.Tensor, slots: Slots, out: torch.Tensor) -> None:
        """Copy the KV of ``slots`` from one layer into ``out`` ``[2, n, kv_heads*head_size]``."""
        hidden = self.num_kv_heads * self.head_size
        k, v = self._k_v(layer, slots)
        out[0].copy_(k.reshape(len(slots), hidden), non_blocking=True)
        out[1].copy_(v.reshape(len(slots), hidden), non_blocking=True)

    def scatter(self, layers: Sequence[torch.Tensor], slots: Slots, kv: torch.Tensor) -> None:
        """Write ``kv`` ``[2, layers, n, kv_heads*head_size]`` into the slots of every layer."""
        for index, layer in enumerate(layers):
            self.scatter_layer(layer, slots, kv[:, index])

    def scatter_layer(self, layer: torch.Tensor, slots: Slots, kv: torch.Tensor) -> None:
        """Write ``kv`` ``[2, n, kv_heads*head_size]`` (on the layer's device) into the slots of one layer."""
        shape = (len(slots), self.num_kv_heads, self.head_size)
        self._put(layer, slots, kv[0].reshape(shape), kv[1].reshape(shape))

    @abc.abstractmethod
    def _put(self, layer: torch.Tensor, slots: Slots, k: torch.Tensor, v: torch.Tensor) -> None: ...


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


LAYOUTS: dict[str, type[PagedLayout]] = {cls.name: cls for cls in (CpuLayout, FlashLayout, FlashInferLayout)}


def layout_for(name: str, num_kv_heads: int, head_size: int, block_size: int) -> PagedLayout:
    """The layout named ``name`` (``cpu``, ``flash`` or ``flashinfer``) for this geometry."""
    try:
        return LAYOUTS[name](num_kv_heads, head_size, block_size)
    except KeyError:
        known = ", ".join(sorted(LAYOUTS))
        raise KVShapeError(f"unknown vLLM KV cache layout {name!r}; lmplug supports {known}") from None
