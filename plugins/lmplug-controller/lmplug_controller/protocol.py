"""The worker protocol (PROTOCOL.md): message kinds, framing, packed keys, shared value types.

A message is the multipart ``[kind, meta, blob?]``: ``kind`` an ASCII name, ``meta`` a JSON
object, ``blob`` (optional) keys of :data:`KEY_SIZE` bytes packed back to back. On the
controller's ROUTER socket the worker's routing id comes first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "KEY_SIZE",
    "Holder",
    "Kind",
    "Message",
    "ProtocolError",
    "TierInfo",
    "decode",
    "encode",
    "pack_keys",
    "parse_hex_keys",
    "unpack_keys",
]

KEY_SIZE = 24
"""Bytes of one chunk key: an 8-byte fingerprint (model, config, rank), then a chained token hash."""

SNAPSHOT_PART_KEYS = 8192
"""Keys per SNAPSHOT_KEYS message (192 KiB)."""


class Kind(StrEnum):
    """Message kinds. Worker to controller first, then controller to worker."""

    REGISTER = "REGISTER"
    EVENTS = "EVENTS"
    HEARTBEAT = "HEARTBEAT"
    SNAPSHOT_BEGIN = "SNAPSHOT_BEGIN"
    SNAPSHOT_KEYS = "SNAPSHOT_KEYS"
    SNAPSHOT_END = "SNAPSHOT_END"
    LOOKUP = "LOOKUP"
    COMMAND_RESULT = "COMMAND_RESULT"

    REGISTERED = "REGISTERED"
    ERROR = "ERROR"
    ACK = "ACK"
    RESYNC = "RESYNC"
    LOOKUP_RESULT = "LOOKUP_RESULT"
    COMMAND = "COMMAND"


_KINDS = {kind.value.encode(): kind for kind in Kind}


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text names what is wrong."""


@dataclass(frozen=True, slots=True)
class TierInfo:
    """One tier of a worker, as it registers it. The order of a worker's tiers is its preference."""

    name: str
    type: str
    capacity_bytes: int

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "capacity_bytes": self.capacity_bytes}

    @classmethod
    def from_json(cls, value: object) -> TierInfo:
        if not isinstance(value, dict):
            raise ProtocolError(f"a tier is an object with name, type, capacity_bytes, not {value!r}")
        name, kind, capacity = value.get("name"), value.get("type"), value.get("capacity_bytes", 0)
        if not isinstance(name, str) or not name or not isinstance(kind, str) or not isinstance(capacity, int):
            raise ProtocolError(f"a tier needs a name (str), a type (str) and capacity_bytes (int): {value!r}")
        return cls(name, kind, capacity)


@dataclass(frozen=True, slots=True)
class Holder:
    """An instance that holds the first ``chunks`` keys of a lookup in one of its tiers."""

    instance_id: str
    tier: str
    endpoint: str
    chunks: int

    def as_json(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "tier": self.tier, "endpoint": self.endpoint, "chunks": self.chunks}

    @classmethod
    def from_json(cls, value: object) -> Holder:
        if not isinstance(value, dict):
            raise ProtocolError(f"a holder is an object, not {value!r}")
        try:
            return cls(str(value["instance_id"]), str(value["tier"]), str(value["endpoint"]), int(value["chunks"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"bad holder {value!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message: its kind, its meta object and its blob (``b""`` when absent)."""

    kind: Kind
    meta: dict[str, Any]
    blob: bytes = b""


def encode(kind: Kind, meta: dict[str, Any], blob: bytes | None = None) -> list[bytes]:
    """The frames of one message (without a routing id)."""
    frames = [kind.value.encode(), json.dumps(meta, separators=(",", ":")).encode()]
    if blob is not None:
        frames.append(blob)
    return frames


def decode(frames: Sequence[bytes]) -> Message:
    """The message in ``frames`` (without a routing id); :class:`ProtocolError` if malformed."""
    if not 2 <= len(frames) <= 3:
        raise ProtocolError(f"a message has 2 or 3 frames (kind, meta, blob?), not {len(frames)}")
    kind = _KINDS.get(bytes(frames[0]))
    if kind is None:
        raise ProtocolError(f"unknown message kind {bytes(frames[0])[:32]!r}")
    try:
        meta = json.loads(frames[1])
    except ValueError as exc:
        raise ProtocolError(f"the meta frame of {kind} is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"the meta frame of {kind} is not a JSON object")
    return Message(kind, meta, bytes(frames[2]) if len(frames) == 3 else b"")


def pack_keys(keys: Sequence[bytes]) -> bytes:
    """Keys back to back; :class:`ProtocolError` unless each is :data:`KEY_SIZE` bytes."""
    blob = b"".join(keys)
    if len(blob) != KEY_SIZE * len(keys):
        bad = next(key for key in keys if len(key) != KEY_SIZE)
        raise ProtocolError(f"a key is {KEY_SIZE} bytes, not {len(bad)}: {bytes(bad[:32])!r}")
    return blob


def unpack_keys(blob: bytes, start: int = 0, count: int | None = None) -> list[bytes]:
    """``count`` keys (all that remain when ``None``) of ``blob`` from key number ``start``."""
    begin = start * KEY_SIZE
    end = len(blob) if count is None else begin + count * KEY_SIZE
    if end > len(blob) or (end - begin) % KEY_SIZE:
        raise ProtocolError(f"the blob holds {len(blob)} bytes, not whole keys up to byte {end}")
    return [blob[offset : offset + KEY_SIZE] for offset in range(begin, end, KEY_SIZE)]


def parse_hex_keys(value: object, what: str = "keys") -> list[bytes]:
    """Keys given as a JSON list of hex strings; :class:`ProtocolError` naming the first bad one."""
    if not isinstance(value, list):
        raise ProtocolError(f"{what} must be a list of {KEY_SIZE * 2}-digit hex strings")
    keys = []
    for position, text in enumerate(value):
        try:
            key = bytes.fromhex(text) if isinstance(text, str) else b""
        except ValueError:
            key = b""
        if len(key) != KEY_SIZE:
            raise ProtocolError(f"{what}[{position}] is not a {KEY_SIZE * 2}-digit hex string: {str(text)[:64]!r}")
        keys.append(key)
    return keys
