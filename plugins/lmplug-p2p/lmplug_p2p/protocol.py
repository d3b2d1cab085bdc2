"""The ``LMPX`` peer protocol (version 1): frames, limits and their strict parsers.

The specification is ``PROTOCOL.md`` beside this package; this module is its reference
implementation, used by both sides in :mod:`lmplug_p2p.transfer`. Every frame is a fixed
24-byte little-endian header, a UTF-8 JSON object of ``meta_length`` bytes, then
``data_length`` raw bytes (packed 24-byte keys, or chunk records)::

    header   magic "LMPX" | version u8 | type u8 | flags u16 | request_id u32 | meta_length u32 | data_length u64

A *chunk record* is lmplug's serialized chunk (:class:`lmplug.tierkit.ChunkHeader` then the
payload), so a record names its key and carries an xxh3-64 checksum of its bytes.

Parsers never trust the peer: every length is checked against :class:`Limits` before
anything is allocated or read, and every failure raises :class:`ProtocolError` with the
:class:`ErrorCode` that the server answers with. Moving frames over sockets is
:mod:`lmplug_p2p.transfer`'s job.
"""

from __future__ import annotations

import enum
import hmac
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmplug.tierkit import ChunkKey

__all__ = [
    "FRAME",
    "KEY_BYTES",
    "MAGIC",
    "MAX_MESSAGE",
    "VERSION",
    "ErrorCode",
    "ErrorReply",
    "FrameHeader",
    "FrameType",
    "Limits",
    "ProtocolError",
    "check_hello",
    "encode_error",
    "encode_keys",
    "encode_frame",
    "encode_limits",
    "meta_int",
    "parse_error",
    "parse_header",
    "parse_limits",
    "parse_meta",
    "split_keys",
    "unpack_header",
]

MAGIC = b"LMPX"
VERSION = 1
FRAME = struct.Struct("<4sBBHIIQ")
"""magic, version, type, flags, request_id, meta_length, data_length: 24 bytes."""
KEY_BYTES = 24
"""A chunk key on the wire: 8 bytes of fingerprint, 16 of chained digest."""
MAX_MESSAGE = 1024
"""Longest ERROR message, characters."""
_U32 = 0xFFFF_FFFF


class FrameType(enum.IntEnum):
    HELLO = 0x01
    HELLO_OK = 0x02
    GET = 0x20
    GET_REPLY = 0x21
    EXISTS = 0x22
    EXISTS_REPLY = 0x23
    ERROR = 0x7F


REQUESTS = frozenset({FrameType.HELLO, FrameType.GET, FrameType.EXISTS})


class ErrorCode(enum.IntEnum):
    """Codes of ERROR frames (and of :class:`ProtocolError`)."""

    BAD_MAGIC = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_TYPE = 3
    MALFORMED = 4
    TOO_MANY_KEYS = 5
    META_TOO_LARGE = 6
    TOO_LARGE = 7
    HELLO_REQUIRED = 8
    AUTH_FAILED = 9
    FINGERPRINT_MISMATCH = 10
    TIMEOUT = 11
    INTERNAL = 12
    TRUNCATED = 13
    """The peer closed the connection in the middle of a frame (never sent; raised locally)."""


class ProtocolError(Exception):
    """A frame broke the protocol: ``code`` says how."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.detail = message


class ErrorReply(ProtocolError):
    """The peer answered with an ERROR frame (and closes the connection)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one side accepts. A server announces its own in HELLO_OK; a client keeps its
    requests within them and bounds what it reads by its own ``max_meta``."""

    max_keys: int = 4096
    """Most keys in one GET or EXISTS request."""
    max_meta: int = 64 << 10
    """Longest JSON meta of a frame, bytes."""
    max_bytes: int = 1 << 30
    """Most bytes of chunk records in one GET reply."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_keys <= _U32 // KEY_BYTES:
            raise ValueError(f"max_keys must be 1..{_U32 // KEY_BYTES}, not {self.max_keys}")
        if not 256 <= self.max_meta <= _U32:
            raise ValueError(f"max_meta must be 256..{_U32}, not {self.max_meta}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, not {self.max_bytes}")


@dataclass(frozen=True, slots=True)
class FrameHeader:
    type: FrameType
    request_id: int
    meta_length: int
    data_length: int


# ---------------------------------------------------------------------------- parsing


def unpack_header(data: bytes | bytearray | memoryview, limits: Limits) -> tuple[int, int, int, int]:
    """The checks every ``LMPX`` frame header passes, whatever its frame types (this module's,
    or a protocol's built on the same framing): its size, magic, version, flags and meta length.
    Returns ``(type, request_id, meta_length, data_length)``, the type as a number to check."""
    if len(data) != FRAME.size:
        raise ProtocolError(ErrorCode.MALFORMED, f"frame header of {len(data)} bytes, {FRAME.size} expected")
    magic, version, kind, flags, request_id, meta_length, data_length = FRAME.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_MAGIC, f"frame starts with {bytes(magic)!r}, not {MAGIC!r}")
    if version != VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {version}; this peer speaks {VERSION}")
    if flags:
        raise ProtocolError(ErrorCode.MALFORMED, f"flags {flags:#06x} set; version 1 has none")
    if meta_length > limits.max_meta:
        raise ProtocolError(ErrorCode.META_TOO_LARGE, f"meta of {meta_length} bytes exceeds {limits.max_meta}")
    return kind, request_id, meta_length, data_length


def parse_header(data: bytes | bytearray | memoryview, limits: Limits, *, request: bool) -> FrameHeader:
    """A frame header, checked completely against ``limits`` before anything after it is read.

    ``request``: the server reads requests (HELLO, GET, EXISTS), a client replies and ERROR.
    """
    kind, request_id, meta_length, data_length = unpack_header(data, limits)
    try:
        frame_type = FrameType(kind)
    except ValueError:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind:#04x}") from None
    if (frame_type in REQUESTS) != request and frame_type is not FrameType.ERROR:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{frame_type.name} is not a {'request' if request else 'reply'}")
    if frame_type in (FrameType.GET, FrameType.EXISTS):
        if data_length % KEY_BYTES:
            raise ProtocolError(ErrorCode.MALFORMED, f"{data_length} bytes of keys is not a whole number of keys")
        if data_length // KEY_BYTES > limits.max_keys:
            raise ProtocolError(
                ErrorCode.TOO_MANY_KEYS, f"{data_length // KEY_BYTES} keys exceed the limit of {limits.max_keys}"
            )
    elif frame_type is not FrameType.GET_REPLY and data_length:
        raise ProtocolError(ErrorCode.MALFORMED, f"{frame_type.name} with {data_length} bytes of data")
    return FrameHeader(frame_type, request_id, meta_length, data_length)


def parse_meta(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """A frame's meta: a JSON object (an empty meta is ``{}``)."""
    if not data:
        return {}
    try:
        meta = json.loads(bytes(data))
    except ValueError as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"meta is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "meta is not a JSON object")
    return meta


def meta_int(meta: dict[str, Any], name: str, low: int, high: int) -> int:
    """An integer field of ``meta`` within ``[low, high]``."""
    value = meta.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(ErrorCode.MALFORMED, f"meta field {name!r} must be an integer in {low}..{high}")
    return value


def split_keys(data: bytes | bytearray | memoryview) -> list[ChunkKey]:
    """The keys of a GET or EXISTS request's data."""
    raw = bytes(data)
    if len(raw) % KEY_BYTES:
        raise ProtocolError(ErrorCode.MALFORMED, f"{len(raw)} bytes of keys is not a whole number of keys")
    return [ChunkKey(raw[start : start + KEY_BYTES]) for start in range(0, len(raw), KEY_BYTES)]


def check_hello(
    meta: dict[str, Any], *, token: bytes | None, fingerprint: bytes, mismatch: Callable[[str, str], str]
) -> None:
    """A HELLO's meta against this server's ``token`` (None: any) and key ``fingerprint``:
    :class:`ProtocolError` ``MALFORMED``, ``AUTH_FAILED`` (compared in constant time) or
    ``FINGERPRINT_MISMATCH``, whose message is ``mismatch(ours, theirs)`` (the fingerprints' hex)."""
    given = meta.get("token")
    if given is not None and not isinstance(given, str):
        raise ProtocolError(ErrorCode.MALFORMED, "HELLO token must be a string")
    if token is not None and not hmac.compare_digest((given or "").encode(), token):
        raise ProtocolError(ErrorCode.AUTH_FAILED, "wrong or missing token")
    theirs = meta.get("fingerprint")
    if not isinstance(theirs, str):
        raise ProtocolError(ErrorCode.MALFORMED, "HELLO without a fingerprint")
    ours = fingerprint.hex()
    if theirs.lower() != ours:
        raise ProtocolError(ErrorCode.FINGERPRINT_MISMATCH, mismatch(ours, theirs))


def parse_limits(meta: dict[str, Any]) -> Limits:
    """The limits a HELLO_OK announces."""
    limits = meta.get("limits")
    if not isinstance(limits, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "HELLO_OK without limits")
    try:
        return Limits(
            meta_int(limits, "max_keys", 1, _U32),
            meta_int(limits, "max_meta", 256, _U32),
            meta_int(limits, "max_bytes", 1, 1 << 62),
        )
    except ValueError as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"HELLO_OK limits: {exc}") from None


def parse_error(meta: dict[str, Any]) -> ErrorReply:
    """The error an ERROR frame describes (returned, for the caller to raise)."""
    code, message = meta.get("code"), meta.get("message")
    text = message if isinstance(message, str) else "(no message)"
    if isinstance(code, int) and code in ErrorCode.__members__.values():
        return ErrorReply(ErrorCode(code), f"peer: {text}")
    return ErrorReply(ErrorCode.INTERNAL, f"peer error {code!r}: {text}")


# ---------------------------------------------------------------------------- encoding


def encode_frame(
    frame_type: FrameType, request_id: int, meta: dict[str, Any] | None = None, data_length: int = 0
) -> bytes:
    """A frame's header and meta; ``data_length`` bytes of data follow it."""
    body = json.dumps(meta, separators=(",", ":")).encode() if meta else b""
    return FRAME.pack(MAGIC, VERSION, frame_type, 0, request_id, len(body), data_length) + body


def encode_keys(
    frame_type: FrameType, request_id: int, keys: Sequence[bytes], meta: dict[str, Any] | None = None
) -> bytes:
    """A whole GET or EXISTS request."""
    for key in keys:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a chunk key is {KEY_BYTES} bytes, not {len(key)}")
    return encode_frame(frame_type, request_id, meta, KEY_BYTES * len(keys)) + b"".join(keys)


def encode_limits(limits: Limits) -> dict[str, Any]:
    return {"limits": {"max_keys": limits.max_keys, "max_meta": limits.max_meta, "max_bytes": limits.max_bytes}}


def encode_error(code: ErrorCode, message: str, request_id: int = 0) -> bytes:
    return encode_frame(FrameType.ERROR, request_id, {"code": int(code), "message": message[:MAX_MESSAGE]})
