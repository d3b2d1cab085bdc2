"""Compiled whole-block copies between vLLM's CPU KV layouts and lmplug's chunk layout.

The CPU layouts (see :mod:`lmplug.integrations.vllm.paged`) transpose or interleave 16-bit
values, which PyTorch's and numpy's copy kernels move one element at a time. These numba
kernels move whole blocks, 32 bytes (one AVX register) or more per instruction: the loops
in Python only walk the blocks and compute offsets; what they call moves vectors, in LLVM
IR written here (numba intrinsics), so it does not depend on what the auto-vectorizer makes
of a loop (a short constant loop gets unrolled and stays scalar, a loop over arrays that
may overlap gets run-time checks):

- :func:`_transpose_tile` transposes a square tile of 32-byte rows with vector shuffles:
  the ``cpu`` layout's K (16-bit values) and the ``cpu-amx`` layout's K tiles (32-bit
  words, a token's two adjacent dimensions each);
- :func:`_split_pairs` and :func:`_join_pairs` take the ``cpu-amx`` layout's V words (a
  dimension of two adjacent tokens each) apart into two tokens' rows and back;
- :func:`_copy_row` copies rows (the ``cpu`` layout's V).

Each kernel writes in order where it can and reads what it transposes from a few KiB that
stay in the L1 cache. Indices are unsigned, so numba adds no wraparound checks. They move
bits, not values, so every bit pattern of bfloat16 or float16 (NaN payloads included)
arrives unchanged; little-endian hosts only (the order of two values in a word). Their
indices are not bounds-checked: :class:`BlockCopies` checks the shapes and block ids.

numba is vLLM's dependency, not lmplug's: this module needs it, and the layouts import it
only where numba is installed (else they copy with torch). A layout's kernels are compiled
for fixed signatures on the first call of :func:`block_copies` for it (the worker's layout
detection makes that call at start-up, before any request); numba caches the machine code
where it finds a writable directory, so later processes load it instead of compiling.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import numba  # type: ignore[import-untyped]
import numpy as np
import torch
from llvmlite import ir  # type: ignore[import-untyped]
from numba import types
from numba.extending import intrinsic  # type: ignore[import-untyped]

from lmplug.errors import KVShapeError

logger = logging.getLogger(__name__)

_U = np.uint64
_TILE = 16
"""The width of the ``cpu-amx`` layout's tiles, in tokens (K) and dimensions (V)."""
_ROW_BITS = 256
"""A transposed tile's row: 32 bytes, one AVX register (16 16-bit values, 8 32-bit words)."""

Geometry = tuple[int, int, int]
"""``(kv_heads, head_size, block_size)``"""


def _vector(context: Any, builder: Any, array_type: Any, array: Any, index: Any, lanes: int) -> Any:
    """A pointer to ``lanes`` elements of ``array`` from ``index`` on, as one LLVM vector."""
    data = context.make_array(array_type)(context, builder, array).data
    vector = ir.VectorType(ir.IntType(array_type.dtype.bitwidth), lanes)
    return builder.bitcast(builder.gep(data, [index]), vector.as_pointer())


@intrinsic  # type: ignore[untyped-decorator]
def _transpose_tile(
    typingctx: Any, src: Any, src_at: Any, src_stride: Any, dst: Any, dst_at: Any, dst_stride: Any
) -> Any:
    """``dst[dst_at + j * dst_stride + i] = src[src_at + i * src_stride + j]`` for ``i, j``
    below ``n``: one ``n x n`` tile of 32-byte rows (``n`` 16 for 16-bit arrays, 8 for 32-bit)."""
    n = _ROW_BITS // src.dtype.bitwidth

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        _, src_at, src_stride, _, dst_at, dst_stride = args

        def row(array: int, start: Any, stride: Any, index: int) -> Any:  # array: the argument's position
            at = builder.add(start, builder.mul(stride, ir.Constant(stride.type, index)))
            return _vector(context, builder, signature.args[array], args[array], at, n)

        rows = [builder.load(row(0, src_at, src_stride, i), align=1) for i in range(n)]
        # Stage d swaps, in each 2d x 2d block, the top right d x d block with the bottom left
        # one, i.e. bit d of every element's row and column index: all stages transpose.
        d = n // 2
        while d:
            low = ir.Constant(ir.VectorType(ir.IntType(32), n), [j if not j & d else n + j - d for j in range(n)])
            high = ir.Constant(ir.VectorType(ir.IntType(32), n), [j + d if not j & d else n + j for j in range(n)])
            for i in (i for i in range(n) if not i & d):
                top, bottom = rows[i], rows[i + d]
                rows[i], rows[i + d] = (
                    builder.shuffle_vector(top, bottom, low),
                    builder.shuffle_vector(top, bottom, high),
                )
            d //= 2
        for j in range(n):
            builder.store(rows[j], row(3, dst_at, dst_stride, j), align=1)
        return context.get_dummy_value()

    return types.void(src, src_at, src_stride, dst, dst_at, dst_stride), codegen


@intrinsic  # type: ignore[untyped-decorator]
def _copy_row(typingctx: Any, dst: Any, dst_at: Any, src: Any, src_at: Any) -> Any:
    """``dst[dst_at:][:16] = src[src_at:][:16]`` (16-bit arrays): one 32-byte row."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        dst, dst_at, src, src_at = args
        row = builder.load(_vector(context, builder, signature.args[2], src, src_at, _TILE), align=1)
        builder.store(row, _vector(context, builder, signature.args[0], dst, dst_at, _TILE), align=1)
        return context.get_dummy_value()

    return types.void(dst, dst_at, src, src_at), codegen


@intrinsic  # type: ignore[untyped-decorator]
def _split_pairs(typingctx: Any, dst: Any, even_at: Any, odd_at: Any, src: Any, src_at: Any) -> Any:
    """The 16 words ``src[src_at:][:16]`` (32-bit), each a pair of 16-bit values, split: the
    first (low) values to ``dst[even_at:][:16]``, the second (high) to ``dst[odd_at:][:16]``."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        dst, even_at, odd_at, src, src_at = args
        words = builder.load(_vector(context, builder, signature.args[3], src, src_at, _TILE), align=1)
        halves = ir.VectorType(ir.IntType(16), _TILE)
        high = builder.lshr(words, ir.Constant(words.type, [16] * _TILE))
        for part, at in ((words, even_at), (high, odd_at)):
            builder.store(
                builder.trunc(part, halves), _vector(context, builder, signature.args[0], dst, at, _TILE), align=1
            )
        return context.get_dummy_value()

    return types.void(dst, even_at, odd_at, src, src_at), codegen


@intrinsic  # type: ignore[untyped-decorator]
def _join_pairs(typingctx: Any, dst: Any, dst_at: Any, src: Any, even_at: Any, odd_at: Any) -> Any:
    """The reverse of :func:`_split_pairs`: 16 words ``dst[dst_at:][:16]`` (32-bit), each the
    value of ``src[even_at:][:16]`` (16-bit) in its low half and of ``src[odd_at:][:16]`` in its high one."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        dst, dst_at, src, even_at, odd_at = args
        words = ir.VectorType(ir.IntType(32), _TILE)
        even, odd = (
            builder.zext(builder.load(_vector(context, builder, signature.args[2], src, at, _TILE), align=1), words)
            for at in (even_at, odd_at)
        )
        joined = builder.or_(even, builder.shl(odd, ir.Constant(words, [16] * _TILE)))
        builder.store(joined, _vector(context, builder, signature.args[0], dst, dst_at, _TILE), align=1)
        return context.get_dummy_value()

    return types.void(dst, dst_at, src, even_at, odd_at), codegen


@numba.njit(inline="always")  # type: ignore[untyped-decorator]
def _copy_rows(
    dst: Any, dst_at: Any, dst_stride: Any, src: Any, src_at: Any, src_stride: Any, rows: Any, width: Any
) -> None:
    """``rows`` rows of ``width`` (a multiple of 16) values, each at its offset and row stride."""
    for r in range(rows):
        to, of = dst_at + r * dst_stride, src_at + r * src_stride
        for x in range(_U(0), width, _U(16)):
            _copy_row(dst, to + x, src, of + x)


def _vec_save(layer: Any, ids: Any, k_rows: Any, v_rows: Any, heads_: int, dim_: int, block_: int) -> None:
    """``cpu`` layout -> chunk, 16 tokens at a time: K's 16 x 16 tiles transposed into the
    tokens' rows, then the tokens' V rows (a row of the chunk after another)."""
    heads, dim, block = _U(heads_), _U(dim_), _U(block_)
    cache, k, v = layer.reshape(-1), k_rows.reshape(-1), v_rows.reshape(-1)
    n, plane, hidden = _U(16), block * dim, heads * dim
    for i in range(_U(ids.shape[0])):
        base, first = _U(ids[i]) * _U(2) * heads * plane, i * block
        for t in range(_U(0), block, n):
            out = (first + t) * hidden
            for h in range(heads):
                k_t = base + _U(2) * h * plane
                for d in range(_U(0), dim, n):
                    _transpose_tile(cache, k_t + d * block + t, block, k, out + h * dim + d, hidden)
            for token in range(t, t + n):  # the heads' V rows of a token: a row of the chunk
                _copy_rows(
                    v, (first + token) * hidden, dim, cache, base + plane + token * dim, _U(2) * plane, heads, dim
                )


def _vec_load(layer: Any, ids: Any, k_rows: Any, v_rows: Any, heads_: int, dim_: int, block_: int) -> None:
    """Chunk -> ``cpu`` layout, in the cache's order: each head's transposed K from 16 x 16
    tiles of the tokens' rows, then its V rows."""
    heads, dim, block = _U(heads_), _U(dim_), _U(block_)
    cache, k, v = layer.reshape(-1), k_rows.reshape(-1), v_rows.reshape(-1)
    n, plane, hidden = _U(16), block * dim, heads * dim
    for i in range(_U(ids.shape[0])):
        base, first = _U(ids[i]) * _U(2) * heads * plane, i * block
        for h in range(heads):
            k_t = base + _U(2) * h * plane
            for d in range(_U(0), dim, n):
                for t in range(_U(0), block, n):
                    _transpose_tile(k, (first + t) * hidden + h * dim + d, hidden, cache, k_t + d * block + t, block)
            v_plane = base + (_U(2) * h + _U(1)) * plane
            _copy_rows(cache, v_plane, dim, v, first * hidden + h * dim, hidden, block, dim)


def _amx_save(layer: Any, ids: Any, k_rows: Any, v_rows: Any, heads_: int, dim_: int, block_: int) -> None:
    """``cpu-amx`` layout -> chunk, a row of the chunk after another. K's tiles ``[dim/2, 16
    tokens]`` of words (a token's dimension pair) are transposed 8 x 8 into the tokens' rows;
    V's tiles ``[block/2, 16 dims]`` of words (a dimension of a token pair) are split into
    the even and the odd token's row."""
    heads, dim, block = _U(heads_), _U(dim_), _U(block_)
    cache, k, v = layer.reshape(-1), k_rows.reshape(-1), v_rows.reshape(-1)
    words, k_words = cache.view(np.int32), k.view(np.int32)
    n, tile, pairs, hidden, half = _U(8), _U(_TILE), dim // _U(2), heads * dim, block // _U(2)
    plane, row_pairs = block * pairs, heads * pairs  # in words
    for i in range(_U(ids.shape[0])):
        base, first = _U(ids[i]) * _U(2) * heads * plane, i * block
        for t in range(_U(0), block, n):
            out = (first + t) * row_pairs
            for h in range(heads):
                k_tile = base + _U(2) * h * plane + (t // tile) * tile * pairs + t % tile
                for p in range(_U(0), pairs, n):
                    _transpose_tile(words, k_tile + p * tile, tile, k_words, out + h * pairs + p, row_pairs)
        for pair in range(half):
            even = (first + _U(2) * pair) * hidden
            for h in range(heads):
                v_plane = base + (_U(2) * h + _U(1)) * plane
                for d in range(_U(0), dim, tile):
                    at = even + h * dim + d
                    _split_pairs(v, at, at + hidden, words, v_plane + d * half + pair * tile)


def _amx_load(layer: Any, ids: Any, k_rows: Any, v_rows: Any, heads_: int, dim_: int, block_: int) -> None:
    """Chunk -> ``cpu-amx`` layout, in the cache's order: each head's K tiles transposed
    8 x 8 from the tokens' rows, then its V tiles, each word joined from the even and the
    odd token's row."""
    heads, dim, block = _U(heads_), _U(dim_), _U(block_)
    cache, k, v = layer.reshape(-1), k_rows.reshape(-1), v_rows.reshape(-1)
    words, k_words = cache.view(np.int32), k.view(np.int32)
    n, tile, pairs, hidden, half = _U(8), _U(_TILE), dim // _U(2), heads * dim, block // _U(2)
    plane, row_pairs = block * pairs, heads * pairs
    for i in range(_U(ids.shape[0])):
        base, first = _U(ids[i]) * _U(2) * heads * plane, i * block
        for h in range(heads):
            k_plane = base + _U(2) * h * plane
            for t in range(_U(0), block, tile):
                for p in range(_U(0), pairs, n):
                    for s in range(_U(0), tile, n):
                        src = (first + t + s) * row_pairs + h * pairs + p
                        _transpose_tile(k_words, src, row_pairs, words, k_plane + t * pairs + p * tile + s, tile)
            v_plane = base + (_U(2) * h + _U(1)) * plane
            for d in range(_U(0), dim, tile):
                for pair in range(half):
                    at = (first + _U(2) * pair) * hidden + h * dim + d
                    _join_pairs(words, v_plane + d * half + pair * tile, v, at, at + hidden)


@dataclass(frozen=True, slots=True)
class BlockCopies:
    """One CPU layout's compiled copies of whole blocks between a layer and a chunk's K and V.

    ``layer`` is one layer's cache (16-bit, contiguous, of the layout's shape), ``ids`` the
    blocks to copy (int64), ``k`` and ``v`` the chunk's K and V ``[len(ids) * block_size,
    kv_heads * head_size]`` (16-bit, contiguous). Head and block sizes are multiples of 16.
    """

    layout: str
    save_kernel: Any
    load_kernel: Any
    compile_s: float
    """How long compiling (or loading from numba's cache) took."""

    def save(self, layer: torch.Tensor, ids: np.ndarray, k: torch.Tensor, v: torch.Tensor, geometry: Geometry) -> None:
        """Copy the blocks ``ids`` of ``layer`` into ``k`` and ``v``."""
        self.save_kernel(*self._arguments(layer, ids, k, v, geometry))

    def load(self, layer: torch.Tensor, ids: np.ndarray, k: torch.Tensor, v: torch.Tensor, geometry: Geometry) -> None:
        """Write ``k`` and ``v`` into the blocks ``ids`` of ``layer``."""
        self.load_kernel(*self._arguments(layer, ids, k, v, geometry))

    def _arguments(
        self, layer: torch.Tensor, ids: np.ndarray, k: torch.Tensor, v: torch.Tensor, geometry: Geometry
    ) -> tuple[Any, ...]:
        heads, dim, block = geometry
        slab = 2 * heads * dim * block
        tokens = len(ids) * block * heads * dim
        blocks = layer.numel() // slab
        if (
            layer.numel() % slab
            or k.numel() != tokens
            or v.numel() != tokens
            or dim % 16
            or block % 16
            or (len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < blocks)
        ):
            raise KVShapeError(
                f"block copy of {len(ids)} blocks (ids {ids.tolist()}) of {list(layer.shape)} with "
                f"K {list(k.shape)} and V {list(v.shape)} does not fit kv_heads={heads}, head_size={dim}, "
                f"block_size={block}"
            )
        return _bits(layer), ids, _bits(k), _bits(v), heads, dim, block


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """A 16-bit tensor's bits (a view)."""
    return tensor.view(torch.int16).numpy()


_KERNELS = {"cpu": (_vec_save, _vec_load), "cpu-amx": (_amx_save, _amx_load)}


@functools.cache
def block_copies(layout: str) -> BlockCopies:
    """The compiled block copies of the CPU layout named ``layout`` (``cpu`` or ``cpu-amx``),
    compiled (or loaded from numba's cache) on the first call."""
    started = time.perf_counter()
    save, load = _KERNELS[layout]
    rows, size = numba.int16[:, ::1], numba.intp
    signature = numba.void(numba.int16[:, :, :, ::1], numba.int64[::1], rows, rows, size, size, size)
    save_kernel, load_kernel = _compile(save, signature), _compile(load, signature)
    elapsed = time.perf_counter() - started
    logger.info("lmplug: block copies for vLLM's %r KV layout compiled in %.2f s", layout, elapsed)
    return BlockCopies(layout, save_kernel, load_kernel, elapsed)


def _compile(function: Any, signature: Any) -> Any:
    try:
        dispatcher = numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:  # numba found no writable cache directory: compile for this process only
        dispatcher = numba.njit(nogil=True)(function)
    dispatcher.compile(signature)
    dispatcher.disable_compile()  # other argument types fail instead of compiling on the request path
    return dispatcher
