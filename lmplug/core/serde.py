"""The serialized form of a chunk: a small fixed little-endian header, then the raw KV bytes.

Header (``HEADER.size`` = 76 bytes), all little-endian::

    magic        8s   b"LMPLUGKV"
    version      u16  FORMAT_VERSION
    header_size  u16  HEADER.size
    dtype        u8   code from DTYPE_CODES
    reserved     3x
    planes       u32  2 (K and V)
    layers       u32
    tokens       u32
    hidden       u32  kv_heads * head_size
    nbytes       u64  payload bytes that follow
    key          24s  the chunk key the bytes belong to
    checksum     u64  xxh3-64 of the payload
    header_crc   u32  crc32 of every header byte before it

Writers and readers move the payload with memoryviews straight to and from chunk memory;
only the header is built or parsed here. A reader checks the header with
:meth:`ChunkHeader.expect` and the payload with :func:`payload_checksum`, so a corrupt,
truncated or foreign file is recognised and never served.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from lmplug.core.keys import ChunkKey
from lmplug.core.layout import DTYPES, KVLayout
from lmplug.errors import CorruptChunk

MAGIC = b"LMPLUGKV"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHHB3xIIIIQ24sQI")
DTYPE_CODES = {dtype: code for code, dtype in enumerate(DTYPES.values(), start=1)}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def payload_checksum(payload: memoryview) -> int:
    """The payload checksum stored in a header (xxh3-64, several GB/s)."""
    return int(xxhash.xxh3_64_intdigest(payload))


def slice_parts(parts: Sequence[memoryview], start: int, end: int) -> list[memoryview]:
    """The pieces of ``parts`` (bytes in order, split anywhere) that hold bytes ``[start, end)``."""
    pieces: list[memoryview] = []
    offset = 0
    for part in parts:
        size = part.nbytes
        low, high = max(start - offset, 0), min(end - offset, size)
        if low < high:
            pieces.append(part if (low, high) == (0, size) else part[low:high])
        offset += size
        if offset >= end:
            break
    return pieces


def parts_checksum(parts: Sequence[memoryview]) -> int:
    """:func:`payload_checksum` of the concatenation of ``parts``, without joining them."""
    if len(parts) == 1:
        return int(xxhash.xxh3_64_intdigest(parts[0]))
    state = xxhash.xxh3_64()
    for part in parts:
        state.update(part)
    return int(state.intdigest())


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """What a serialized chunk says about itself."""

    key: bytes
    layers: int
    tokens: int
    hidden: int
    dtype_code: int
    nbytes: int
    checksum: int

    @classmethod
    def for_chunk(cls, key: ChunkKey, layout: KVLayout, tokens: int, checksum: int) -> ChunkHeader:
        """The header of a chunk of ``tokens`` tokens of ``layout`` stored under ``key``."""
        return cls(
            bytes(key),
            layout.num_layers,
            tokens,
            layout.hidden_size,
            DTYPE_CODES[layout.dtype],
            layout.nbytes(tokens),
            checksum,
        )

    def pack(self) -> bytes:
        body = HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            HEADER.size,
            self.dtype_code,
            2,
            self.layers,
            self.tokens,
            self.hidden,
            self.nbytes,
            self.key,
            self.checksum,
            0,
        )[: HEADER.size - 4]
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> ChunkHeader:
        """Parse and verify a header; :class:`CorruptChunk` says why one is not valid."""
        if len(data) < HEADER.size:
            raise CorruptChunk(f"truncated header: {len(data)} of {HEADER.size} bytes")
        raw = bytes(data[: HEADER.size])
        magic, version, size, dtype_code, planes, layers, tokens, hidden, nbytes, key, checksum, crc = HEADER.unpack(
            raw
        )
        if magic != MAGIC:
            raise CorruptChunk("not an lmplug chunk (bad magic)")
        if version != FORMAT_VERSION or size != HEADER.size:
            raise CorruptChunk(f"unsupported chunk format version {version} (header size {size})")
        if zlib.crc32(raw[:-4]) != crc:
            raise CorruptChunk("chunk header checksum mismatch")
        if planes != 2 or dtype_code not in _CODE_DTYPES:
            raise CorruptChunk(f"unknown chunk layout (planes {planes}, dtype code {dtype_code})")
        return cls(key, layers, tokens, hidden, dtype_code, nbytes, checksum)

    def expect(self, key: ChunkKey, layout: KVLayout, tokens: int | None = None) -> None:
        """Raise :class:`CorruptChunk` unless this header describes ``key``'s KV in ``layout``."""
        if self.key != key:
            raise CorruptChunk("chunk belongs to another key (foreign or misplaced file)")
        if (self.layers, self.hidden, _CODE_DTYPES[self.dtype_code]) != (
            layout.num_layers,
            layout.hidden_size,
            layout.dtype,
        ):
            raise CorruptChunk("chunk layout differs from the configured KV layout")
        if tokens is not None and self.tokens != tokens:
            raise CorruptChunk(f"chunk holds {self.tokens} tokens, {tokens} expected")
        if self.nbytes != layout.nbytes(self.tokens):
            raise CorruptChunk(f"chunk payload size {self.nbytes} does not match its shape")
