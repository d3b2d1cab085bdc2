"""Chunk codecs for shared stores: lossless compression (``lz4``, ``zstd``) and quantization (``int8``, ``fp8``).

Every encoded chunk starts with a small header of the codec (:class:`CodecHeader`): a
magic naming the codec, a format version, the dtype and shape the bytes were made for and
the payload's length. ``decode`` checks all of it against ``out`` before it touches ``out``,
so truncated, foreign or mismatched input raises :class:`lmplug.CorruptChunk` instead of
decoding garbage. (The remote tier checksums the encoded bytes as well.)

Lossless codecs split each element's bytes into planes (a *byte shuffle*) before they
compress: the sign and exponent bytes of float KV repeat a lot, the low mantissa bytes are
close to random, and interleaved they hide each other's redundancy from the compressor.
When compression would not save anything the payload holds the plain bytes.

Quantizing codecs scale each group of ``GROUP`` consecutive values along the hidden
dimension by its own bfloat16 scale ``s`` (rounded up from ``amax / qmax``, so no value
clips) and keep the codes. Per value, with ``x`` the original:

- ``int8``: codes ``round(x / s)`` in [-127, 127]; ``|x - decoded| <= s / 2``.
- ``fp8``: codes ``float8_e4m3fn(x / s)`` in [-448, 448]; ``|x - decoded| <= |x| / 16 + s / 1024``.

where ``s <= amax / qmax * (1 + 2**-7) + 2**-133`` (bfloat16 rounding, and its smallest
subnormal: values below about 1e-38 are kept only to within ``2**-134``), plus the rounding
of the result to the chunk's dtype. Non-finite values (NaN, +-inf) are
not quantized: they decode as NaN (the integer code -128, the fp8 NaN), and the group's
scale is taken over its finite values. Attention over a NaN or infinite K/V value is NaN
either way, so the kind of non-finite value carries no information worth the bytes.
"""

from __future__ import annotations

import abc
import struct
import threading
import zlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar

import torch

from lmplug import ConfigError, CorruptChunk
from lmplug.tierkit import ChunkCodec
from lmplug_remote.extras import library_missing

if TYPE_CHECKING:
    import zstandard

__all__ = [
    "GROUP",
    "CodecHeader",
    "Fp8Codec",
    "Int8Codec",
    "Lz4Codec",
    "ZstdCodec",
    "default_codecs",
]

GROUP = 64
"""Values per quantization scale (along the hidden dimension); the whole row when ``hidden`` is not a multiple."""

VERSION = 1
_SHUFFLED = 0x01  # payload holds the byte planes, not the interleaved bytes
_STORED = 0x02  # payload is the (unshuffled) bytes themselves: compression did not help
_NONFINITE = 0x04  # some codes stand for non-finite values

_DTYPES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5,
    torch.uint8: 6,
    torch.int8: 7,
}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class CodecHeader:
    """The first ``SIZE`` bytes of every encoded chunk (little-endian, 8-byte aligned), ending in their CRC-32.

    The CRC makes any damage to the header itself an error: a flipped flag would otherwise
    decode garbage. The payload's integrity is the remote tier's checksum's job.
    """

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<4sBBBB4IIQ")
    CRC: ClassVar[struct.Struct] = struct.Struct("<I")
    SIZE: ClassVar[int] = FORMAT.size + CRC.size

    magic: bytes
    dtype: int
    flags: int
    shape: tuple[int, int, int, int]
    group: int
    payload: int
    """Bytes that follow the header."""

    def pack_into(self, buffer: memoryview) -> None:
        self.FORMAT.pack_into(
            buffer, 0, self.magic, VERSION, self.dtype, self.flags, 0, *self.shape, self.group, self.payload
        )
        self.CRC.pack_into(buffer, self.FORMAT.size, zlib.crc32(buffer[: self.FORMAT.size]))

    def pack(self) -> bytes:
        buffer = bytearray(self.SIZE)
        self.pack_into(memoryview(buffer))
        return bytes(buffer)

    @classmethod
    def read(cls, data: memoryview, magic: bytes, name: str, out: torch.Tensor) -> CodecHeader:
        """The header at the start of ``data``, checked against the codec's magic, ``out`` and ``len(data)``."""
        if len(data) < cls.SIZE:
            raise CorruptChunk(f"{name} chunk of {len(data)} bytes is shorter than its {cls.SIZE}-byte header")
        found, version, dtype, flags, reserved, d0, d1, d2, d3, group, payload = cls.FORMAT.unpack_from(data, 0)
        if found != magic:
            raise CorruptChunk(f"not a {name} chunk (magic {bytes(found)!r}, expected {magic!r})")
        if version != VERSION:
            raise CorruptChunk(f"{name} chunk of format version {version}; this lmplug-remote reads {VERSION}")
        (crc,) = cls.CRC.unpack_from(data, cls.FORMAT.size)
        if crc != zlib.crc32(data[: cls.FORMAT.size]) or reserved:
            raise CorruptChunk(f"{name} chunk header is damaged (CRC mismatch)")
        if dtype != _DTYPES.get(out.dtype):
            known = {code: kind for kind, code in _DTYPES.items()}
            made = _dtype_name(known[dtype]) if dtype in known else f"unknown dtype {dtype}"
            raise CorruptChunk(f"{name} chunk made for {made} KV, decoding into {_dtype_name(out.dtype)}")
        shape = (d0, d1, d2, d3)
        if shape != tuple(out.shape):
            raise CorruptChunk(f"{name} chunk made for shape {list(shape)}, decoding into {list(out.shape)}")
        if payload != len(data) - cls.SIZE:
            raise CorruptChunk(f"{name} chunk header says {payload} payload bytes, {len(data) - cls.SIZE} present")
        return cls(found, dtype, flags, shape, group, payload)


def _shape(kv: torch.Size | torch.Tensor) -> tuple[int, int, int, int]:
    shape = tuple(kv.shape if isinstance(kv, torch.Tensor) else kv)
    if len(shape) != 4:
        raise ValueError(f"chunk KV has shape [2, layers, tokens, hidden], not {list(shape)}")
    return shape


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor, as a flat uint8 tensor sharing its memory."""
    if not tensor.is_contiguous():
        raise ValueError("chunk KV must be contiguous")
    return tensor.view(torch.uint8).reshape(-1)


def _writable(data: memoryview) -> memoryview:
    """``data`` itself, or a writable copy (torch warns about tensors over read-only memory)."""
    data = memoryview(data).cast("B")
    return memoryview(bytearray(data)) if data.readonly else data


def shuffle(raw: torch.Tensor, itemsize: int) -> torch.Tensor:
    """The byte planes of ``raw`` (flat bytes of ``itemsize``-byte elements): all first bytes, all second bytes, ..."""
    elements = raw.view(-1, itemsize)
    planes = torch.empty((itemsize, elements.shape[0]), dtype=torch.uint8)
    for plane in range(itemsize):  # itemsize strided copies; faster than one transposed copy
        planes[plane].copy_(elements[:, plane])
    return planes.reshape(-1)


def unshuffle(planes: torch.Tensor, raw: torch.Tensor, itemsize: int) -> None:
    """Interleave byte ``planes`` (see :func:`shuffle`) back into the flat bytes ``raw``."""
    elements = raw.view(-1, itemsize)
    split = planes.view(itemsize, -1)
    for plane in range(itemsize):
        elements[:, plane].copy_(split[plane])


def _frombuffer(data: memoryview, offset: int, count: int) -> torch.Tensor:
    if not count:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(data, dtype=torch.uint8, count=count, offset=offset)


# ---------------------------------------------------------------------------- lossless


class _Compressed(ChunkCodec):
    """Lossless: the (byte-shuffled) KV bytes through a general-purpose compressor."""

    magic: ClassVar[bytes]
    shuffle: bool

    @abc.abstractmethod
    def _compress(self, data: memoryview) -> bytes: ...

    @abc.abstractmethod
    def _decompress(self, data: memoryview, size: int) -> bytes:
        """Exactly ``size`` bytes; :class:`CorruptChunk` otherwise."""

    def _check(self, dtype: torch.dtype) -> None:
        if dtype not in _DTYPES:
            raise ConfigError(f"codec {self.name!r} cannot store {_dtype_name(dtype)} KV")

    def max_encoded_size(self, kv: torch.Size, dtype: torch.dtype) -> int:
        self._check(dtype)
        _shape(kv)
        return CodecHeader.SIZE + kv.numel() * dtype.itemsize  # incompressible chunks are stored as they are

    def encode(self, kv: torch.Tensor) -> memoryview:
        self._check(kv.dtype)
        kv = kv.contiguous()
        raw = _bytes_of(kv)
        itemsize = kv.element_size()
        shuffled = self.shuffle and itemsize > 1 and raw.numel() > 0
        source = shuffle(raw, itemsize) if shuffled else raw
        packed = self._compress(source.numpy().data.cast("B")) if raw.numel() else b""
        if len(packed) < raw.numel():
            flags, payload = (_SHUFFLED if shuffled else 0), memoryview(packed)
        else:  # incompressible: keep the bytes themselves (this also bounds the size)
            flags, payload = _STORED, raw.numpy().data.cast("B")
        view = torch.empty(CodecHeader.SIZE + len(payload), dtype=torch.uint8).numpy().data.cast("B")
        header = CodecHeader(self.magic, _DTYPES[kv.dtype], flags, _shape(kv), 0, len(payload))
        header.pack_into(view)
        view[CodecHeader.SIZE :] = payload
        return view

    def decode(self, data: memoryview, out: torch.Tensor) -> None:
        data = memoryview(data).cast("B")
        header = CodecHeader.read(data, self.magic, self.name, out)
        data = data[CodecHeader.SIZE :]
        target = _bytes_of(out)
        size = target.numel()
        if header.flags & ~(_SHUFFLED | _STORED) or header.flags == _SHUFFLED | _STORED:
            raise CorruptChunk(f"{self.name} chunk with unknown flags {header.flags:#x}")
        if header.flags & _STORED:
            if len(data) != size:
                raise CorruptChunk(f"{self.name} chunk stores {len(data)} bytes, {size} expected")
            target.numpy().data.cast("B")[:] = data
            return
        if not size:
            raise CorruptChunk(f"{self.name} chunk of an empty tensor is not compressed")
        plain = self._decompress(data, size)
        if len(plain) != size:
            raise CorruptChunk(f"{self.name} chunk decompressed to {len(plain)} bytes, {size} expected")
        if header.flags & _SHUFFLED:
            unshuffle(torch.frombuffer(bytearray(plain), dtype=torch.uint8), target, out.element_size())
        else:
            target.numpy().data.cast("B")[:] = plain


def _lz4_block() -> ModuleType:
    try:
        import lz4.block  # type: ignore[import-untyped]
    except ModuleNotFoundError as exc:
        raise library_missing(exc, "the lz4 codec", "codecs") from exc
    block: ModuleType = lz4.block
    return block


def _zstandard() -> ModuleType:
    try:
        import zstandard
    except ModuleNotFoundError as exc:
        raise library_missing(exc, "the zstd codec", "codecs") from exc
    return zstandard


class Lz4Codec(_Compressed):
    """``lz4``: LZ4 block compression (fast), of the byte-shuffled KV by default."""

    magic = b"LZ4K"

    def __init__(self, *, shuffle: bool = True, name: str = "lz4") -> None:
        self.name = name
        self.shuffle = shuffle

    def prepare(self) -> None:
        _lz4_block()

    def _compress(self, data: memoryview) -> bytes:
        compressed: bytes = _lz4_block().compress(data, store_size=False)
        return compressed

    def _decompress(self, data: memoryview, size: int) -> bytes:
        block = _lz4_block()
        try:
            plain: bytes = block.decompress(data, uncompressed_size=size)
            return plain
        except block.LZ4BlockError as exc:
            raise CorruptChunk(f"{self.name} chunk does not decompress: {exc}") from None


class ZstdCodec(_Compressed):
    """``zstd``: Zstandard at a fast level, of the byte-shuffled KV by default."""

    magic = b"ZSTK"

    def __init__(self, *, level: int = 1, shuffle: bool = True, name: str = "zstd") -> None:
        self.name = name
        self.level = level
        self.shuffle = shuffle
        self._local = threading.local()  # zstandard contexts are not safe to share between threads

    def prepare(self) -> None:
        _zstandard()

    def _contexts(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        contexts: tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor] | None = getattr(
            self._local, "contexts", None
        )
        if contexts is None:
            library = _zstandard()
            contexts = (library.ZstdCompressor(level=self.level), library.ZstdDecompressor())
            self._local.contexts = contexts
        return contexts

    def _compress(self, data: memoryview) -> bytes:
        return self._contexts()[0].compress(data)

    def _decompress(self, data: memoryview, size: int) -> bytes:
        library = _zstandard()
        try:
            declared = library.frame_content_size(data)
            if declared != size:  # also refuses to allocate what a damaged frame claims
                raise CorruptChunk(f"{self.name} chunk's frame holds {declared} bytes, {size} expected")
            return self._contexts()[1].decompress(data, max_output_size=size)
        except library.ZstdError as exc:
            raise CorruptChunk(f"{self.name} chunk does not decompress: {exc}") from None


# ---------------------------------------------------------------------------- lossy


def _group_size(hidden: int) -> int:
    return GROUP if hidden % GROUP == 0 else hidden


def _ceil_bfloat16(scale: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 values >= the positive finite float64 ``scale``."""
    single = scale.to(torch.float32)
    single = torch.where(single.double() < scale, torch.nextafter(single, torch.tensor(torch.inf)), single)
    bits = single.view(torch.int32)
    up = torch.bitwise_and(bits + 0xFFFF, ~0xFFFF)  # round the magnitude up to 8 mantissa bits
    return torch.bitwise_right_shift(up, 16).to(torch.int16).view(torch.bfloat16)


class _Quantized(ChunkCodec):
    """Lossy: one bfloat16 scale per group of values along the hidden dimension, one byte per value."""

    lossy = True
    magic: ClassVar[bytes]
    qmax: ClassVar[float]
    """The largest code magnitude a scaled value may reach."""

    def _check(self, dtype: torch.dtype) -> None:
        if dtype not in _FLOATS:
            raise ConfigError(
                f"codec {self.name!r} quantizes float32, float16 and bfloat16 KV, not {_dtype_name(dtype)}"
            )

    @staticmethod
    def _layout(shape: tuple[int, int, int, int]) -> tuple[int, int, int]:
        """(values, groups, group size) of a chunk shape."""
        values = shape[0] * shape[1] * shape[2] * shape[3]
        group = _group_size(shape[3])
        return values, (values // group if group else 0), group

    def max_encoded_size(self, kv: torch.Size, dtype: torch.dtype) -> int:
        self._check(dtype)
        values, groups, _ = self._layout(_shape(kv))
        return CodecHeader.SIZE + 2 * groups + values  # every chunk of this shape has exactly this size

    @abc.abstractmethod
    def _quantize(self, scaled: torch.Tensor, codes: torch.Tensor, finite: torch.Tensor | None) -> None:
        """Write the codes of ``scaled`` (values / scale, within +-qmax) into the uint8 ``codes``."""

    @abc.abstractmethod
    def _dequantize(self, codes: torch.Tensor, scale: torch.Tensor, nonfinite: bool) -> torch.Tensor:
        """The float32 values of the uint8 ``codes`` ``[groups, group]`` times their group's ``scale``.

        NaN where a code marks a non-finite value (only looked for when ``nonfinite``).
        """

    def encode(self, kv: torch.Tensor) -> memoryview:
        self._check(kv.dtype)
        shape = _shape(kv)
        values, groups, group = self._layout(shape)
        payload = 2 * groups + values
        buffer = torch.empty(CodecHeader.SIZE + payload, dtype=torch.uint8)
        view = buffer.numpy().data.cast("B")
        flags = 0
        if values:
            x = kv.contiguous().view(groups, group).float()  # float32 arithmetic is much faster on CPU
            amax = x.abs().amax(dim=1)
            finite: torch.Tensor | None = None
            if not bool(torch.isfinite(amax).all()):  # rare: the scale covers the finite values only
                finite = torch.isfinite(x)
                amax = torch.where(finite, x, 0).abs().amax(dim=1)
                flags |= _NONFINITE
            amax = amax.double()
            scale = torch.where(amax > 0, _ceil_bfloat16(amax / self.qmax), torch.ones((), dtype=torch.bfloat16))
            buffer[CodecHeader.SIZE : CodecHeader.SIZE + 2 * groups].view(torch.bfloat16).copy_(scale)
            scaled = torch.div(x, scale.float()[:, None])  # a new tensor: x may be the KV itself
            codes = buffer[CodecHeader.SIZE + 2 * groups :].view(groups, group)
            self._quantize(scaled, codes, finite)
        CodecHeader(self.magic, _DTYPES[kv.dtype], flags, shape, group, payload).pack_into(view)
        return view

    def decode(self, data: memoryview, out: torch.Tensor) -> None:
        self._check(out.dtype)
        data = memoryview(data).cast("B")
        header = CodecHeader.read(data, self.magic, self.name, out)
        values, groups, group = self._layout(header.shape)
        if header.group != group or header.payload != 2 * groups + values:
            raise CorruptChunk(
                f"{self.name} chunk of {header.payload} payload bytes in groups of {header.group}; "
                f"{2 * groups + values} bytes in groups of {group} expected"
            )
        if header.flags & ~_NONFINITE:
            raise CorruptChunk(f"{self.name} chunk with unknown flags {header.flags:#x}")
        if not values:
            return
        data = _writable(data)
        scale = _frombuffer(data, CodecHeader.SIZE, 2 * groups).clone().view(torch.bfloat16).float()
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise CorruptChunk(f"{self.name} chunk has invalid scales")
        codes = _frombuffer(data, CodecHeader.SIZE + 2 * groups, values).view(groups, group)
        decoded = self._dequantize(codes, scale, bool(header.flags & _NONFINITE))
        limit = torch.finfo(out.dtype).max
        decoded.clamp_(-limit, limit)  # a value at the dtype's edge may round just past it
        out.view(groups, group).copy_(decoded)


class Int8Codec(_Quantized):
    """``int8``: symmetric 8-bit integers, ``|error| <= scale / 2``; codes -127..127, -128 marks non-finite."""

    magic = b"I8QK"
    qmax = 127.0

    def __init__(self, *, name: str = "int8") -> None:
        self.name = name

    def _quantize(self, scaled: torch.Tensor, codes: torch.Tensor, finite: torch.Tensor | None) -> None:
        if finite is not None:
            scaled.masked_fill_(~finite, 0.0)
        scaled.round_().clamp_(-self.qmax, self.qmax)
        target = codes.view(torch.int8)
        target.copy_(scaled)
        if finite is not None:
            target.masked_fill_(~finite, -128)

    def _dequantize(self, codes: torch.Tensor, scale: torch.Tensor, nonfinite: bool) -> torch.Tensor:
        signed = codes.view(torch.int8)
        decoded = signed.to(torch.float32).mul_(scale[:, None])
        if nonfinite:
            decoded.masked_fill_(signed == -128, torch.nan)
        return decoded


_FP8_AS_FP16_MASK = -0x8000 | 0x7F << 7  # sign, then the 7 exponent and mantissa bits, as int16


class Fp8Codec(_Quantized):
    """``fp8``: float8 e4m3 (3 mantissa bits), ``|error| <= |x| / 16 + scale / 1024``; NaN marks non-finite."""

    magic = b"F8QK"
    qmax = 448.0

    def __init__(self, *, name: str = "fp8") -> None:
        self.name = name

    def _quantize(self, scaled: torch.Tensor, codes: torch.Tensor, finite: torch.Tensor | None) -> None:
        scaled.clamp_(-self.qmax, self.qmax)  # float division may land a hair past the largest code
        if finite is not None:
            scaled.masked_fill_(~finite, torch.nan)  # clamp would have made +-inf finite
        codes.view(torch.float8_e4m3fn).copy_(scaled)

    def _dequantize(self, codes: torch.Tensor, scale: torch.Tensor, nonfinite: bool) -> torch.Tensor:
        # torch's float8 -> float32 cast is slow on CPU. The e4m3 bits shifted left by 7 are the
        # float16 of the same value / 256 (subnormals included): exponent and mantissa line up.
        wide = codes.view(torch.int8).to(torch.int16)  # sign-extended: bit 15 is the sign
        half = torch.bitwise_and(torch.bitwise_left_shift(wide, 7), _FP8_AS_FP16_MASK)
        decoded = half.view(torch.float16).to(torch.float32).mul_((scale * 256)[:, None])
        if nonfinite:
            decoded.masked_fill_(torch.bitwise_and(codes, 0x7F) == 0x7F, torch.nan)
        return decoded


def default_codecs() -> list[ChunkCodec]:
    """The codecs this plugin registers: ``lz4``, ``zstd``, ``int8``, ``fp8``."""
    return [Lz4Codec(), ZstdCodec(), Int8Codec(), Fp8Codec()]
