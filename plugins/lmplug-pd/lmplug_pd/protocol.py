"""The push frames of ``LMPX`` (``PROTOCOL.md`` beside this package): a prefill instance hands
a prompt's chunks to a decode instance.

The framing, its limits, the ERROR frame and the chunk records are lmplug-p2p's
(:mod:`lmplug_p2p.protocol`); this module adds the frame types of a push and their strict
parser. A parser never trusts the peer: every length is checked before anything is read or
allocated, and every violation raises :class:`ProtocolError` with the :class:`ErrorCode` that
is answered.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from lmplug.tierkit import HEADER
from lmplug_p2p.protocol import (
    FRAME,
    KEY_BYTES,
    MAGIC,
    VERSION,
    ErrorCode,
    Limits,
    ProtocolError,
    unpack_header,
)

__all__ = ["MAX_XFER_ID", "PushFrame", "PushHeader", "RejectReason", "encode", "parse_header", "xfer_id_of"]

MAX_XFER_ID = 256
"""Longest transfer id, characters."""


class PushFrame(enum.IntEnum):
    """Frame types of a push; HELLO, HELLO_OK and ERROR keep lmplug-p2p's numbers."""

    HELLO = 0x01
    HELLO_OK = 0x02
    OPEN = 0x10
    ACCEPT = 0x11
    REJECT = 0x12
    CHUNK = 0x13
    END = 0x14
    DONE = 0x15
    ABORT = 0x16
    ERROR = 0x7F


SENDER_FRAMES = frozenset({PushFrame.HELLO, PushFrame.OPEN, PushFrame.CHUNK, PushFrame.END, PushFrame.ABORT})
"""What the prefill side sends (and the receiver reads)."""
RECEIVER_FRAMES = frozenset({PushFrame.HELLO_OK, PushFrame.ACCEPT, PushFrame.REJECT, PushFrame.DONE, PushFrame.ERROR})


class RejectReason(enum.StrEnum):
    BUSY = "busy"
    """No room in the in-flight budget within ``admit_timeout``."""
    TOO_LARGE = "too_large"
    """More bytes than the whole in-flight budget."""
    DUPLICATE = "duplicate"
    """A transfer id the receiver has seen within ``hold``."""
    SHUTTING_DOWN = "shutting_down"


@dataclass(frozen=True, slots=True)
class PushHeader:
    type: PushFrame
    request_id: int
    meta_length: int
    data_length: int


def parse_header(data: bytes | bytearray | memoryview, limits: Limits, *, from_sender: bool) -> PushHeader:
    """A frame header, checked against ``limits`` before anything after it is read.

    ``from_sender``: the receiver reads the prefill side's frames, the sender the receiver's.
    """
    kind, request_id, meta_length, data_length = unpack_header(data, limits)
    try:
        frame_type = PushFrame(kind)
    except ValueError:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind:#04x}") from None
    if frame_type not in (SENDER_FRAMES if from_sender else RECEIVER_FRAMES):
        side = "the receiver" if from_sender else "the sender"
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{frame_type.name} is not a frame {side} reads")
    if frame_type is PushFrame.OPEN:
        if data_length % KEY_BYTES:
            raise ProtocolError(ErrorCode.MALFORMED, f"{data_length} bytes of keys is not a whole number of keys")
        if not 0 < data_length // KEY_BYTES <= limits.max_keys:
            raise ProtocolError(
                ErrorCode.TOO_MANY_KEYS, f"OPEN of {data_length // KEY_BYTES} keys; 1..{limits.max_keys} accepted"
            )
    elif frame_type is PushFrame.CHUNK:
        if not HEADER.size < data_length <= HEADER.size + limits.max_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"a chunk record of {data_length} bytes")
    elif data_length:
        raise ProtocolError(ErrorCode.MALFORMED, f"{frame_type.name} with {data_length} bytes of data")
    return PushHeader(frame_type, request_id, meta_length, data_length)


def xfer_id_of(meta: dict[str, Any]) -> str:
    value = meta.get("xfer_id")
    if not isinstance(value, str) or not 0 < len(value) <= MAX_XFER_ID:
        raise ProtocolError(ErrorCode.MALFORMED, f"xfer_id must be a string of 1..{MAX_XFER_ID} characters")
    return value


def encode(frame_type: PushFrame, request_id: int, meta: dict[str, Any] | None = None, data_length: int = 0) -> bytes:
    """A frame's header and meta; ``data_length`` bytes of data follow it."""
    body = json.dumps(meta, separators=(",", ":")).encode() if meta else b""
    return FRAME.pack(MAGIC, VERSION, frame_type, 0, request_id, len(body), data_length) + body
