"""The ``lm://`` wire protocol (version 1): frames and their strict parsers.

The specification is ``PROTOCOL.md`` beside this package; this module is its reference
implementation, shared by ``lmplug-server`` and the ``lm://`` connector. In short, every
frame is a fixed 24-byte little-endian header followed by ``body_length`` bytes::

    header   magic "LMKV" | version u8 | opcode u8 | flags u16 | request_id u32 | count u32 | body_length u64
    keyed    count items (16 B: key_length u16 | reserved u16 | arg32 u32 | arg64 u64), the keys, then
             (PUT only) the values, in item order
    reply    opcode | 0x80, same request_id; count items (16 B: status u16 | 0 u16 | 0 u32 | length u64)
             then the values of found items (GET)
    error    opcode 0xFF; body: code u16 | message_length u16 | UTF-8 message; the connection then closes

Parsers never trust the peer: every length is checked against :class:`Limits` before
anything is allocated or read, reserved fields must be zero, and every failure raises
:class:`ProtocolError` (nothing else) with the :class:`ErrorCode` the server replies with.

Moving frames over sockets is :mod:`lmplug_server.sockio`'s job.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ERROR_OPCODE",
    "HEADER",
    "ITEM",
    "LIMITS",
    "MAGIC",
    "MAX_ERROR_MESSAGE",
    "MAX_STATS_BODY",
    "MAX_TOKEN",
    "REPLY_BIT",
    "VERSION",
    "ErrorCode",
    "Header",
    "Item",
    "ItemStatus",
    "ItemTable",
    "Limits",
    "Op",
    "ProtocolError",
    "Reply",
    "Request",
    "decode_request",
    "encode_auth",
    "encode_body_reply",
    "encode_error",
    "encode_keyed_request",
    "encode_limits",
    "encode_reply",
    "encode_simple",
    "parse_error_body",
    "parse_items",
    "parse_limits",
    "parse_reply_header",
    "parse_reply_items",
    "parse_request_header",
    "split_keys",
]

MAGIC = b"LMKV"
VERSION = 1
HEADER = struct.Struct("<4sBBHIIQ")
"""magic, version, opcode, flags, request_id, count, body_length: 24 bytes."""
ITEM = struct.Struct("<HHIQ")
"""One item of a keyed request (key_length, reserved, arg32, arg64) or of a reply (status, 0, 0, length)."""
LIMITS = struct.Struct("<HHIQQ")
"""The AUTH reply: max_key u16, reserved u16, max_keys u32, max_value u64, max_frame u64."""
ERROR = struct.Struct("<HH")
"""An error body's start: code u16, message_length u16."""

REPLY_BIT = 0x80
ERROR_OPCODE = 0xFF
MAX_TOKEN = 1024
"""Longest AUTH token, bytes."""
MAX_ERROR_MESSAGE = 1024
"""Longest error message, bytes."""
MAX_STATS_BODY = 1 << 20
"""Longest STATS reply body a client accepts."""
MAX_KEY_BYTES = 4 << 20
"""Most key bytes in one frame, whatever the other limits allow."""
_U32 = 0xFFFF_FFFF
ANY_LENGTH = (1 << 64) - 1
"""A GET item's arg64 meaning 'any length is fine'."""


class Op(enum.IntEnum):
    """Request opcodes; a reply carries ``opcode | REPLY_BIT``."""

    AUTH = 0x01
    HEALTH = 0x02
    STATS = 0x03
    PUT = 0x10
    GET = 0x11
    EXISTS = 0x12
    DELETE = 0x13


KEYED_OPS = frozenset({Op.PUT, Op.GET, Op.EXISTS, Op.DELETE})


class ErrorCode(enum.IntEnum):
    """Codes of ERROR replies (and of :class:`ProtocolError`)."""

    BAD_MAGIC = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_OPCODE = 3
    MALFORMED = 4
    KEY_TOO_LONG = 5
    TOO_MANY_KEYS = 6
    FRAME_TOO_LARGE = 7
    AUTH_REQUIRED = 8
    AUTH_FAILED = 9
    SHUTTING_DOWN = 10
    TIMEOUT = 11
    INTERNAL = 12
    TRUNCATED = 13
    """The peer closed the connection in the middle of a frame (never sent; raised locally)."""


class ItemStatus(enum.IntEnum):
    """Per-key outcome in a reply item."""

    OK = 0
    """PUT stored / GET found (value follows) / EXISTS present / DELETE removed."""
    NOT_FOUND = 1
    """GET, EXISTS, DELETE: no such key (or it expired)."""
    TOO_LARGE = 2
    """PUT: value longer than the server's max_value; GET: longer than the client accepts (length given)."""
    NO_SPACE = 3
    """PUT: value longer than the server's whole memory capacity."""


class ProtocolError(Exception):
    """A frame broke the protocol (or the server replied ERROR): ``code`` says how."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.detail = message


@dataclass(frozen=True, slots=True)
class Limits:
    """What one server accepts; sent to the client in the AUTH reply."""

    max_key: int = 1024
    """Longest key, bytes (at most 65535)."""
    max_keys: int = 4096
    """Most keys in one frame."""
    max_value: int = 256 << 20
    """Longest value, bytes."""
    max_frame: int = 1 << 30
    """Longest request body, bytes."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_key <= 0xFFFF:
            raise ValueError(f"max_key must be 1..65535, not {self.max_key}")
        if not 1 <= self.max_keys <= _U32:
            raise ValueError(f"max_keys must be 1..{_U32}, not {self.max_keys}")
        if self.max_value < 1:
            raise ValueError(f"max_value must be positive, not {self.max_value}")
        if self.max_frame < ITEM.size + 1:
            raise ValueError(f"max_frame must be at least {ITEM.size + 1}, not {self.max_frame}")


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed frame header."""

    opcode: int
    flags: int
    request_id: int
    count: int
    body_length: int

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, self.opcode, self.flags, self.request_id, self.count, self.body_length)


@dataclass(frozen=True, slots=True)
class Item:
    """One item of a keyed request."""

    key_length: int
    arg32: int
    """PUT: time to live in milliseconds (0: none); otherwise 0."""
    arg64: int
    """PUT: value length; GET: the longest value the client accepts; otherwise 0."""


@dataclass(frozen=True, slots=True)
class ItemTable:
    """The validated items of a keyed request and the lengths of what follows them."""

    items: tuple[Item, ...]
    keys_length: int
    values_length: int


@dataclass(frozen=True, slots=True)
class Request:
    """A whole decoded request (see :func:`decode_request`)."""

    header: Header
    keys: tuple[bytes, ...]
    items: tuple[Item, ...]
    values: tuple[memoryview, ...]
    token: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply item: a status and (GET, TOO_LARGE) a length."""

    status: ItemStatus
    length: int


# ---------------------------------------------------------------------------- parsing


def _header_fields(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int]:
    if len(data) != HEADER.size:
        raise ProtocolError(ErrorCode.MALFORMED, f"a header is {HEADER.size} bytes, got {len(data)}")
    magic, version, opcode, flags, request_id, count, body_length = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_MAGIC, f"frame starts with {bytes(magic)!r}, not {MAGIC!r}")
    if version != VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {version}; this side speaks {VERSION}")
    if flags:
        raise ProtocolError(ErrorCode.MALFORMED, f"flags {flags:#06x} set; version {VERSION} defines none")
    return opcode, flags, request_id, count, body_length


def parse_request_header(data: bytes | bytearray | memoryview, limits: Limits) -> Header:
    """A request header, checked against ``limits`` and the opcode's shape."""
    opcode, flags, request_id, count, body_length = _header_fields(data)
    try:
        op = Op(opcode)
    except ValueError:
        raise ProtocolError(ErrorCode.UNKNOWN_OPCODE, f"unknown request opcode {opcode:#04x}") from None
    if body_length > limits.max_frame:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"body of {body_length} bytes exceeds max_frame {limits.max_frame}"
        )
    if op in KEYED_OPS:
        if count == 0:
            raise ProtocolError(ErrorCode.MALFORMED, f"{op.name} names no key")
        if count > limits.max_keys:
            raise ProtocolError(ErrorCode.TOO_MANY_KEYS, f"{count} keys exceed max_keys {limits.max_keys}")
        if body_length < count * (ITEM.size + 1):
            raise ProtocolError(ErrorCode.MALFORMED, f"body of {body_length} bytes is too short for {count} keys")
    elif count:
        raise ProtocolError(ErrorCode.MALFORMED, f"{op.name} carries count {count}; it must be 0")
    elif op is Op.AUTH:
        if body_length > MAX_TOKEN:
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"token of {body_length} bytes exceeds {MAX_TOKEN}")
    elif body_length:
        raise ProtocolError(ErrorCode.MALFORMED, f"{op.name} carries a body of {body_length} bytes")
    return Header(opcode, flags, request_id, count, body_length)


def parse_items(header: Header, data: bytes | bytearray | memoryview, limits: Limits) -> ItemTable:
    """The item table of a keyed request, consistent with the header and within ``limits``."""
    count = header.count
    if len(data) != count * ITEM.size:
        raise ProtocolError(ErrorCode.MALFORMED, f"{count} items are {count * ITEM.size} bytes, got {len(data)}")
    op = Op(header.opcode)
    items: list[Item] = []
    keys_length = values_length = 0
    for key_length, reserved, arg32, arg64 in ITEM.iter_unpack(data):
        if reserved:
            raise ProtocolError(ErrorCode.MALFORMED, "an item's reserved field is not zero")
        if key_length == 0:
            raise ProtocolError(ErrorCode.MALFORMED, "an empty key")
        if key_length > limits.max_key:
            raise ProtocolError(ErrorCode.KEY_TOO_LONG, f"key of {key_length} bytes exceeds max_key {limits.max_key}")
        if op is Op.PUT:
            values_length += arg64
            if values_length > limits.max_frame:
                raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"values exceed max_frame {limits.max_frame}")
        elif arg32 or (arg64 and op is not Op.GET):
            raise ProtocolError(ErrorCode.MALFORMED, f"{op.name} item arguments must be zero")
        keys_length += key_length
        items.append(Item(key_length, arg32, arg64))
    if keys_length > MAX_KEY_BYTES:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"{keys_length} key bytes exceed {MAX_KEY_BYTES}")
    expected = len(data) + keys_length + values_length
    if expected != header.body_length:
        raise ProtocolError(
            ErrorCode.MALFORMED, f"items describe a body of {expected} bytes, the header says {header.body_length}"
        )
    return ItemTable(tuple(items), keys_length, values_length)


def split_keys(table: ItemTable, data: bytes | bytearray | memoryview) -> list[bytes]:
    """The keys of the key blob, cut at the items' lengths."""
    if len(data) != table.keys_length:
        raise ProtocolError(ErrorCode.MALFORMED, f"key blob of {len(data)} bytes, {table.keys_length} expected")
    view = memoryview(data)
    keys: list[bytes] = []
    offset = 0
    for item in table.items:
        keys.append(bytes(view[offset : offset + item.key_length]))
        offset += item.key_length
    return keys


def decode_request(frame: bytes | bytearray | memoryview, limits: Limits) -> Request:
    """A whole request frame held in memory (tests, tools); exactly one frame, nothing after it."""
    view = memoryview(frame).cast("B")
    if len(view) < HEADER.size:
        raise ProtocolError(ErrorCode.TRUNCATED, f"frame of {len(view)} bytes is shorter than a header")
    header = parse_request_header(view[: HEADER.size], limits)
    body = view[HEADER.size :]
    if len(body) != header.body_length:
        code = ErrorCode.TRUNCATED if len(body) < header.body_length else ErrorCode.MALFORMED
        raise ProtocolError(code, f"body of {len(body)} bytes, the header says {header.body_length}")
    if header.opcode not in KEYED_OPS:
        return Request(header, (), (), (), bytes(body))
    items_end = header.count * ITEM.size
    table = parse_items(header, body[:items_end], limits)
    keys_end = items_end + table.keys_length
    keys = split_keys(table, body[items_end:keys_end])
    values: list[memoryview] = []
    if header.opcode == Op.PUT:
        offset = keys_end
        for item in table.items:
            values.append(body[offset : offset + item.arg64])
            offset += item.arg64
    return Request(header, tuple(keys), table.items, tuple(values), b"")


def parse_reply_header(
    data: bytes | bytearray | memoryview, opcode: Op, request_id: int, count: int, max_body: int
) -> Header:
    """A reply header for request ``opcode``/``request_id``; an ERROR reply header is returned as is."""
    reply_opcode, flags, reply_id, reply_count, body_length = _header_fields(data)
    if reply_opcode == ERROR_OPCODE:
        if reply_count or not ERROR.size <= body_length <= ERROR.size + MAX_ERROR_MESSAGE:
            raise ProtocolError(ErrorCode.MALFORMED, f"error reply with count {reply_count}, body {body_length}")
        return Header(reply_opcode, flags, reply_id, reply_count, body_length)
    if reply_opcode != opcode | REPLY_BIT:
        raise ProtocolError(ErrorCode.MALFORMED, f"reply opcode {reply_opcode:#04x} to a {opcode.name} request")
    if reply_id != request_id:
        raise ProtocolError(ErrorCode.MALFORMED, f"reply to request {reply_id}, {request_id} expected")
    if reply_count != count:
        raise ProtocolError(ErrorCode.MALFORMED, f"reply with {reply_count} items to a request with {count}")
    if body_length > max_body:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"reply body of {body_length} bytes exceeds {max_body}")
    return Header(reply_opcode, flags, reply_id, reply_count, body_length)


def parse_reply_items(data: bytes | bytearray | memoryview, count: int) -> list[Reply]:
    """The item table of a reply."""
    if len(data) != count * ITEM.size:
        raise ProtocolError(ErrorCode.MALFORMED, f"{count} reply items are {count * ITEM.size} bytes, got {len(data)}")
    replies: list[Reply] = []
    for status, reserved16, reserved32, length in ITEM.iter_unpack(data):
        if reserved16 or reserved32:
            raise ProtocolError(ErrorCode.MALFORMED, "a reply item's reserved fields are not zero")
        try:
            replies.append(Reply(ItemStatus(status), length))
        except ValueError:
            raise ProtocolError(ErrorCode.MALFORMED, f"unknown item status {status}") from None
    return replies


def parse_error_body(data: bytes | bytearray | memoryview) -> ProtocolError:
    """The error an ERROR reply's body describes (returned, for the caller to raise)."""
    if len(data) < ERROR.size:
        return ProtocolError(ErrorCode.MALFORMED, f"error body of {len(data)} bytes")
    code, length = ERROR.unpack_from(data)
    if length != len(data) - ERROR.size:
        return ProtocolError(ErrorCode.MALFORMED, f"error message of {length} bytes in a body of {len(data)}")
    message = bytes(data[ERROR.size :]).decode("utf-8", errors="replace")
    try:
        return ProtocolError(ErrorCode(code), f"server: {message}")
    except ValueError:
        return ProtocolError(ErrorCode.INTERNAL, f"server error {code}: {message}")


def parse_limits(data: bytes | bytearray | memoryview) -> Limits:
    """The limits an AUTH reply announces."""
    if len(data) != LIMITS.size:
        raise ProtocolError(ErrorCode.MALFORMED, f"AUTH reply body of {len(data)} bytes, {LIMITS.size} expected")
    max_key, reserved, max_keys, max_value, max_frame = LIMITS.unpack(data)
    try:
        if reserved:
            raise ValueError("reserved field is not zero")
        return Limits(max_key, max_keys, max_value, max_frame)
    except ValueError as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"AUTH reply limits: {exc}") from None


# ---------------------------------------------------------------------------- encoding


def encode_simple(opcode: Op, request_id: int) -> bytes:
    """A HEALTH or STATS request."""
    return HEADER.pack(MAGIC, VERSION, opcode, 0, request_id, 0, 0)


def encode_auth(request_id: int, token: bytes) -> bytes:
    if len(token) > MAX_TOKEN:
        raise ValueError(f"token of {len(token)} bytes exceeds {MAX_TOKEN}")
    return HEADER.pack(MAGIC, VERSION, Op.AUTH, 0, request_id, 0, len(token)) + token


def encode_keyed_request(
    opcode: Op, request_id: int, keys: Sequence[bytes], arg32: Sequence[int] = (), arg64: Sequence[int] = ()
) -> bytes:
    """Header, items and keys of a keyed request; a PUT's values (``arg64`` long) are sent after it."""
    count = len(keys)
    arg32 = arg32 or [0] * count
    arg64 = arg64 or [0] * count
    items = b"".join(ITEM.pack(len(key), 0, a32, a64) for key, a32, a64 in zip(keys, arg32, arg64, strict=True))
    blob = b"".join(keys)
    body_length = len(items) + len(blob) + (sum(arg64) if opcode is Op.PUT else 0)
    return HEADER.pack(MAGIC, VERSION, opcode, 0, request_id, count, body_length) + items + blob


def encode_reply(opcode: int, request_id: int, replies: Sequence[tuple[int, int]], values_length: int = 0) -> bytes:
    """Header and items of a reply; ``values_length`` bytes of values follow it."""
    items = b"".join(ITEM.pack(status, 0, 0, length) for status, length in replies)
    body_length = len(items) + values_length
    return HEADER.pack(MAGIC, VERSION, opcode | REPLY_BIT, 0, request_id, len(replies), body_length) + items


def encode_body_reply(opcode: int, request_id: int, body: bytes) -> bytes:
    """A reply whose body is opaque bytes (AUTH limits, STATS JSON)."""
    return HEADER.pack(MAGIC, VERSION, opcode | REPLY_BIT, 0, request_id, 0, len(body)) + body


def encode_limits(limits: Limits) -> bytes:
    return LIMITS.pack(limits.max_key, 0, limits.max_keys, limits.max_value, limits.max_frame)


def encode_error(code: ErrorCode, message: str, request_id: int = 0) -> bytes:
    text = message.encode("utf-8")[:MAX_ERROR_MESSAGE]
    body = ERROR.pack(code, len(text)) + text
    return HEADER.pack(MAGIC, VERSION, ERROR_OPCODE, 0, request_id, 0, len(body)) + body
