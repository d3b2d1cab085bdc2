"""Fuzzing of the ``lm://`` protocol over real sockets, both ways.

- :func:`fuzz_server` talks to a running ``lmplug-server`` as a hostile client: on each
  connection a few well-formed requests (their replies are checked), then one abusive tail:
  a mutated frame, a valid header over a random body, wrong lengths, wrong key counts, a
  frame cut short, sent all at once, in pieces, or slowly. After every batch it checks the
  server (:func:`check_server`): still up, answering a well-behaved client, no memory
  reserved, no connection left open, and the values stored before the fuzz unchanged.
- :func:`fuzz_client` is a hostile *server*: it answers an ``lm://`` client's requests with
  mutated replies, and checks that the client either raises one of the errors it may raise
  or returns exactly what a strict reading of the bytes it was sent says, and never hangs.
  The client is duck-typed (:class:`LmClient`: the methods of lmplug-remote's connector),
  so this module needs neither lmplug nor lmplug-remote.

Both are driven by a seeded :class:`random.Random`; a failure raises :class:`FuzzFailure`
naming the seed and the case, so ``fuzz_*(..., seed=S)`` reproduces it.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from lmplug_server.protocol import (
    ANY_LENGTH,
    ERROR_OPCODE,
    HEADER,
    ITEM,
    MAGIC,
    REPLY_BIT,
    ErrorCode,
    ItemStatus,
    Limits,
    Op,
    ProtocolError,
    encode_auth,
    encode_body_reply,
    encode_error,
    encode_keyed_request,
    encode_limits,
    encode_reply,
    encode_simple,
    parse_error_body,
    parse_reply_header,
    parse_reply_items,
)
from lmplug_server.sockio import recv_exactly, send_buffers

__all__ = [
    "FUZZ_SERVER_ARGUMENTS",
    "FuzzFailure",
    "FuzzReport",
    "LmClient",
    "check_server",
    "fuzz_client",
    "fuzz_server",
]

FUZZ_SERVER_ARGUMENTS = (
    "--capacity",
    "64MiB",
    "--max-value",
    "1MiB",
    "--max-frame",
    "4MiB",
    "--max-keys",
    "64",
    "--request-timeout",
    "5",
)
"""Options of a server for :func:`fuzz_server`: small limits, so that mutated lengths reach them."""

_FUZZ_LIMITS = Limits(max_keys=64, max_value=1 << 20, max_frame=4 << 20)
_KEYS = 24
"""The fuzz's own well-formed keys, ``fz-0`` ... (mutations make others)."""
_SETTLE = 10.0
"""Seconds the server may take to close what the fuzz left behind."""
_CASE_LIMIT = 10.0
"""Seconds one connection or one client call may take before it counts as a hang."""


class FuzzFailure(AssertionError):
    """What the fuzz found; the message names the seed and the case."""


@dataclass(slots=True)
class FuzzReport:
    """What a fuzz run did."""

    seed: int
    cases: int = 0
    """Frames sent to the server (fuzz_server) or replies mutated (fuzz_client)."""
    connections: int = 0
    checks: int = 0
    """Oracle checks passed (fuzz_server: server checks after batches)."""
    outcomes: Counter[str] = field(default_factory=Counter)
    """How the cases ended (error codes the server replied with; client: accepted or refused)."""
    crashes: int = 0
    leaks: int = 0
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.cases / self.seconds if self.seconds else 0.0


# ============================================================================ frames

_INTERESTING = (0, 1, 2, 3, 15, 16, 17, 63, 64, 65, 127, 128, 255, 256, 1023, 1024, 1025, 0xFFFF, 0x10000)
_INTERESTING_BIG = (
    (1 << 20) - 1,
    1 << 20,
    (1 << 20) + 1,
    (4 << 20) - 1,
    4 << 20,
    (4 << 20) + 1,
    (1 << 31) - 1,
    (1 << 32) - 1,
    1 << 32,
    1 << 63,
    (1 << 64) - 1,
)
_FIELDS = {  # header field: (offset, format)
    "version": (4, "<B"),
    "opcode": (5, "<B"),
    "flags": (6, "<H"),
    "count": (12, "<I"),
    "body_length": (16, "<Q"),
}
_ITEM_FIELDS = ((0, "<H"), (2, "<H"), (4, "<I"), (8, "<Q"))


def _interesting(rng: random.Random, fmt: str, current: int) -> int:
    bits = struct.calcsize(fmt) * 8
    choices = [*_INTERESTING, *(_INTERESTING_BIG if bits > 16 else ()), current + 1, current - 1, current * 2]
    return int(rng.choice(choices)) % (1 << bits)


def _overwrite(frame: bytearray, offset: int, fmt: str, rng: random.Random) -> None:
    if offset + struct.calcsize(fmt) <= len(frame):
        (current,) = struct.unpack_from(fmt, frame, offset)
        struct.pack_into(fmt, frame, offset, _interesting(rng, fmt, current))


def mutate(rng: random.Random, frame: bytes, *, items: int = 0) -> bytes:
    """``frame`` with one to three mutations: bits, bytes, header or item fields, cuts, growth, splices."""
    data = bytearray(frame)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.randrange(9)
        if kind == 0 and data:  # flip bits, anywhere
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1 and data:  # random bytes, mostly in the header and item table
            span = min(len(data), HEADER.size + ITEM.size * max(items, 1)) if rng.random() < 0.7 else len(data)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(span)] = rng.randrange(256)
        elif kind == 2:  # a header field set to a boundary value
            offset, fmt = _FIELDS[rng.choice(list(_FIELDS))]
            _overwrite(data, offset, fmt, rng)
        elif kind == 3 and items:  # an item field set to a boundary value
            item = HEADER.size + ITEM.size * rng.randrange(items)
            offset, fmt = rng.choice(_ITEM_FIELDS)
            _overwrite(data, item + offset, fmt, rng)
        elif kind == 4 and data:  # cut short
            del data[rng.randrange(len(data)) :]
        elif kind == 5:  # grown
            data += rng.randbytes(rng.choice((1, 3, 16, 24, 100)))
        elif kind == 6 and len(data) > 2:  # a slice removed or repeated
            start = rng.randrange(len(data) - 1)
            end = rng.randrange(start + 1, min(len(data), start + 40) + 1)
            if rng.random() < 0.5:
                del data[start:end]
            else:
                data[start:start] = data[start:end]
        elif kind == 7 and len(data) >= HEADER.size:  # the body length off by a little
            (length,) = struct.unpack_from("<Q", data, 16)
            struct.pack_into("<Q", data, 16, max(0, length + rng.choice((-17, -16, -1, 1, 16, 17))) % (1 << 64))
        elif kind == 8 and len(data) >= HEADER.size:  # the key count off by a little
            (count,) = struct.unpack_from("<I", data, 12)
            struct.pack_into("<I", data, 12, max(0, count + rng.choice((-2, -1, 1, 2))) & 0xFFFF_FFFF)
    return bytes(data)


def _key(rng: random.Random) -> bytes:
    return f"fz-{rng.randrange(_KEYS)}".encode()


def _request(rng: random.Random, request_id: int) -> tuple[Op, bytes, int]:
    """A well-formed request, its opcode and its number of keys."""
    roll = rng.random()
    if roll < 0.04:
        return Op.HEALTH, encode_simple(Op.HEALTH, request_id), 0
    if roll < 0.05:
        return Op.STATS, encode_simple(Op.STATS, request_id), 0
    op = rng.choice((Op.PUT, Op.PUT, Op.GET, Op.GET, Op.EXISTS, Op.DELETE))
    keys = [_key(rng) for _ in range(rng.choice((1, 1, 1, 2, 3, 8)))]
    if op is Op.PUT:
        values = [rng.randbytes(rng.choice((0, 1, 17, 300, 4096, 20_000))) for _ in keys]
        ttls = [rng.choice((0, 0, 0, 1, 60_000)) for _ in keys]
        head = encode_keyed_request(op, request_id, keys, ttls, [len(value) for value in values])
        return op, head + b"".join(values), len(keys)
    if op is Op.GET:
        rooms = [rng.choice((ANY_LENGTH, ANY_LENGTH, 0, 100, 5000)) for _ in keys]
        return op, encode_keyed_request(op, request_id, keys, (), rooms), len(keys)
    return op, encode_keyed_request(op, request_id, keys), len(keys)


def _abusive_tail(rng: random.Random, request_id: int) -> bytes:
    """What ends a fuzz connection."""
    roll = rng.random()
    if roll < 0.55:
        _, frame, count = _request(rng, request_id)
        return mutate(rng, frame, items=count)
    if roll < 0.7:  # a valid header over a random body
        op = rng.choice(list(Op))
        count = rng.choice((0, 1, 2, 5, 64, 65))
        body = rng.randbytes(rng.choice((0, 1, 16, 17, 40, 200)))
        length = len(body) if rng.random() < 0.7 else rng.choice((0, len(body) + 1, 1 << 20, 1 << 40))
        return HEADER.pack(MAGIC, 1, op, 0, request_id, count, length) + body
    if roll < 0.8:  # cut short: the peer leaves mid-frame
        _, frame, _ = _request(rng, request_id)
        return frame[: rng.randrange(len(frame))]
    if roll < 0.9:  # an item table that disagrees with the header
        keys = [_key(rng) for _ in range(rng.randint(1, 4))]
        table = bytearray(encode_keyed_request(Op.GET, request_id, keys, (), [ANY_LENGTH] * len(keys)))
        struct.pack_into("<I", table, 12, len(keys) + rng.choice((-1, 1, 1000)) & 0xFFFF_FFFF)
        return bytes(table)
    return rng.randbytes(rng.randint(1, 64))  # noise


# ============================================================================ the server under fuzz


async def _connect(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)  # noqa: FBT003
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.connect(("127.0.0.1", port))
    except BlockingIOError:
        await anyio.wait_writable(sock)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            sock.close()
            raise ConnectionRefusedError(error, "connect failed") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def _send_slowly(sock: socket.socket, data: bytes, rng: random.Random) -> None:
    """All of ``data``, at once, in pieces, or (rarely) with pauses: a slow client."""
    mode = rng.random()
    if mode < 0.7 or len(data) < 2:
        await send_buffers(sock, [data])
        return
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 6))))
    pause = 0.002 if mode > 0.97 else 0.0
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        await send_buffers(sock, [data[start:end]])
        await anyio.sleep(pause)


async def _read_all(sock: socket.socket) -> bytes:
    data = bytearray()
    scratch = bytearray(1 << 16)
    while True:
        try:
            got = sock.recv_into(scratch)
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        except ConnectionResetError:
            return bytes(data)
        if not got:
            return bytes(data)
        data += scratch[:got]


def _check_replies(stream: bytes, expected: Sequence[tuple[Op, int, int]], outcomes: Counter[str]) -> None:
    """The server's replies: one well-formed reply per well-formed request, in order; then
    well-formed frames only, and nothing after an ERROR frame."""
    view = memoryview(stream)
    offset = 0
    index = 0
    while offset < len(view):
        if len(view) - offset < HEADER.size:
            raise AssertionError(f"{len(view) - offset} bytes of a reply header, then the server closed")
        head = view[offset : offset + HEADER.size]
        magic, version, opcode, flags, request_id, count, length = HEADER.unpack(head)
        if (magic, version, flags) != (MAGIC, 1, 0):
            raise AssertionError(f"a reply header with magic {bytes(magic)!r}, version {version}, flags {flags}")
        body = view[offset + HEADER.size : offset + HEADER.size + length]
        if len(body) != length:
            raise AssertionError(f"a reply body of {len(body)} bytes, the header says {length}")
        offset += HEADER.size + length
        if opcode == ERROR_OPCODE:
            error = parse_error_body(body)
            if error.code in (ErrorCode.MALFORMED, ErrorCode.INTERNAL) and error.detail.startswith("error "):
                raise AssertionError(f"an unreadable error body: {error}")
            if error.code is ErrorCode.INTERNAL:
                raise AssertionError(f"the server failed inside: {error}")
            if offset != len(view):
                raise AssertionError("the server sent more after an ERROR reply")
            if index < len(expected) and error.code not in (ErrorCode.AUTH_REQUIRED, ErrorCode.AUTH_FAILED):
                raise AssertionError(f"ERROR {error.code.name} to well-formed request {index}: {error}")
            outcomes[error.code.name] += 1
            return
        if index < len(expected):
            op, want_id, want_count = expected[index]
        else:  # the abusive tail was read as a valid request: any well-formed reply will do
            try:
                op = Op(opcode & ~REPLY_BIT)
            except ValueError:
                raise AssertionError(f"reply opcode {opcode:#04x}") from None
            want_id, want_count = request_id, count
            outcomes["accepted"] += 1
        try:
            parse_reply_header(head, op, want_id, want_count, 1 << 40)
            if count:
                replies = parse_reply_items(body[: count * ITEM.size], count)
                values = sum(reply.length for reply in replies if reply.status is ItemStatus.OK and op is Op.GET)
                if length != count * ITEM.size + values:
                    raise AssertionError(f"{op.name} reply of {length} bytes for {count} items and {values} of values")
        except ProtocolError as exc:
            raise AssertionError(f"reply {index}: {exc}") from None
        index += 1
    if index < len(expected):
        raise AssertionError(f"{len(expected) - index} well-formed requests were not answered")
    outcomes["closed"] += 1


async def _fuzz_connection(port: int, token: bytes | None, rng: random.Random, report: FuzzReport) -> None:
    frames: list[bytes] = []
    expected: list[tuple[Op, int, int]] = []
    auth = rng.random()
    if token is not None and auth < 0.05:  # a wrong token: a prefix, an extension, empty, or another
        frames.append(encode_auth(1, rng.choice((token[:-1], token + b"x", b"", rng.randbytes(len(token))))))
    elif token is not None and auth < 0.08:
        pass  # no AUTH at all
    else:
        frames.append(encode_auth(1, token or b""))
        expected.append((Op.AUTH, 1, 0))
        for request_id in range(2, 2 + rng.choice((0, 1, 2, 4, 8))):
            op, frame, count = _request(rng, request_id)
            frames.append(frame)
            expected.append((op, request_id, count))
    if rng.random() < 0.9:
        frames.append(_abusive_tail(rng, 1000))
    report.cases += len(frames)
    report.connections += 1
    sock = await _connect(port)
    received: list[bytes] = []

    async def send() -> None:  # beside the reading: replies may fill the socket buffers first
        with contextlib.suppress(OSError):
            await _send_slowly(sock, b"".join(frames), rng)
            sock.shutdown(socket.SHUT_WR)

    async def read() -> None:
        received.append(await _read_all(sock))

    try:
        with anyio.fail_after(_CASE_LIMIT):
            async with anyio.create_task_group() as group:
                group.start_soon(send)
                group.start_soon(read)
        stream = received[0]
        _check_replies(stream, expected if (token is None or auth >= 0.08) else [], report.outcomes)
    finally:
        sock.close()


async def _request_reply(sock: socket.socket, frame: bytes, op: Op, request_id: int, count: int) -> bytearray:
    await send_buffers(sock, [frame])
    head = bytearray(HEADER.size)
    await recv_exactly(sock, memoryview(head))
    header = parse_reply_header(head, op, request_id, count, 1 << 30)
    body = bytearray(header.body_length)
    await recv_exactly(sock, memoryview(body))
    if header.opcode == ERROR_OPCODE:
        raise parse_error_body(body)
    return body


async def check_server(
    port: int, token: bytes | None, stored: dict[bytes, bytes], alive: Callable[[], bool] = lambda: True
) -> dict[str, Any]:
    """The oracle: the server is up, answers, holds ``stored`` exactly, and once what others left
    behind has closed, has no memory reserved and only this check's connection open. Its STATS."""
    if not alive():
        raise AssertionError("the server process is gone")
    sock = await _connect(port)
    stats: dict[str, Any] = {}
    try:
        with anyio.fail_after(_SETTLE):
            await _request_reply(sock, encode_auth(1, token or b""), Op.AUTH, 1, 0)
            await _request_reply(sock, encode_simple(Op.HEALTH, 2), Op.HEALTH, 2, 0)
            keys = list(stored)
            if keys:
                body = await _request_reply(
                    sock, encode_keyed_request(Op.GET, 3, keys, (), [ANY_LENGTH] * len(keys)), Op.GET, 3, len(keys)
                )
                replies = parse_reply_items(body[: len(keys) * ITEM.size], len(keys))
                offset = len(keys) * ITEM.size
                for key, reply in zip(keys, replies, strict=True):
                    if reply.status is not ItemStatus.OK:
                        raise AssertionError(f"stored value {key!r} is gone ({reply.status.name})")
                    if body[offset : offset + reply.length] != stored[key]:
                        raise AssertionError(f"stored value {key!r} changed")
                    offset += reply.length
            while True:
                stats = json.loads(await _request_reply(sock, encode_simple(Op.STATS, 4), Op.STATS, 4, 0))
                memory, connections = stats["memory"], stats["connections"]
                settled = connections["open"] == 1 and connections.get("unauthenticated", 0) == 0
                if settled and memory["reserved"] == 0:
                    break
                await anyio.sleep(0.01)
        if memory["used"] + memory["free"] > memory["capacity"]:
            raise AssertionError(f"memory accounting past capacity: {memory}")
        return stats
    except TimeoutError:
        raise AssertionError(f"the server did not settle within {_SETTLE:g} s (leak): {stats}") from None
    finally:
        sock.close()


async def fuzz_server(
    port: int,
    *,
    seed: int,
    cases: int,
    token: bytes | None = None,
    batch: int = 500,
    alive: Callable[[], bool] = lambda: True,
) -> FuzzReport:
    """Send about ``cases`` frames (well-formed and abusive) to the server on loopback ``port``,
    checking it after every ``batch``; :class:`FuzzFailure` on the first thing wrong."""
    rng = random.Random(seed)
    report = FuzzReport(seed)
    stored = {
        f"sentinel-{seed}-{index}-{rng.randbytes(24).hex()}".encode(): rng.randbytes(rng.choice((1, 1000, 70_000)))
        for index in range(6)
    }
    started = time.perf_counter()
    sock = await _connect(port)
    try:
        await _request_reply(sock, encode_auth(1, token or b""), Op.AUTH, 1, 0)
        keys, values = list(stored), list(stored.values())
        frame = encode_keyed_request(Op.PUT, 2, keys, (), [len(value) for value in values]) + b"".join(values)
        statuses = parse_reply_items(await _request_reply(sock, frame, Op.PUT, 2, len(keys)), len(keys))
        if any(reply.status is not ItemStatus.OK for reply in statuses):
            raise FuzzFailure(f"seed {seed}: could not store the sentinels: {statuses}")
    finally:
        sock.close()
    checked = 0
    try:
        while report.cases < cases:
            case = report.connections
            try:
                await _fuzz_connection(port, token, rng, report)
            except (AssertionError, OSError, TimeoutError) as exc:
                report.crashes += 1
                raise FuzzFailure(f"seed {seed}, connection {case}: {type(exc).__name__}: {exc}") from exc
            if report.cases - checked >= batch or report.cases >= cases:
                checked = report.cases
                try:
                    await check_server(port, token, stored, alive)
                except (AssertionError, OSError) as exc:
                    report.leaks += 1
                    raise FuzzFailure(f"seed {seed}, after connection {case}: {exc}") from exc
                report.checks += 1
    finally:
        report.seconds = time.perf_counter() - started
    return report


# ============================================================================ the client under fuzz


class LmClient(Protocol):
    """What :func:`fuzz_client` calls: the methods of lmplug-remote's ``LmConnector``."""

    async def put_many(self, entries: Sequence[tuple[str, Sequence[memoryview]]], ttl: float | None) -> None: ...
    async def get_many_into(self, entries: Sequence[tuple[str, Sequence[memoryview]]]) -> list[int | None]: ...
    async def exists(self, keys: Sequence[str]) -> list[bool]: ...
    async def delete(self, keys: Sequence[str]) -> int: ...
    async def health(self) -> None: ...
    async def server_statistics(self) -> dict[str, Any]: ...


class _Refused:
    def __repr__(self) -> str:
        return "a refusal"


_REFUSED = _Refused()
"""What the strict reading says the client must do with a reply: raise."""


class _Stream:
    """The bytes a hostile server sent, read strictly; :data:`_REFUSED` as soon as they break a rule."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int) -> bytes | None:
        if self.offset + size > len(self.data):
            return None
        piece = self.data[self.offset : self.offset + size]
        self.offset += size
        return piece

    def reply(self, opcode: int, request_id: int, count: int, max_body: int) -> tuple[int, bytes] | None:
        """``(count, body)`` of a reply that a careful client accepts, else ``None``."""
        head = self.take(24)
        if head is None:
            return None
        magic, version, got_opcode, flags, got_id, got_count, length = struct.unpack("<4sBBHIIQ", head)
        if magic != b"LMKV" or version != 1 or flags or got_opcode == 0xFF:
            return None
        if (got_opcode, got_id, got_count) != (opcode | 0x80, request_id, count) or length > max_body:
            return None
        body = self.take(length)
        return None if body is None else (got_count, body)


def _statuses(body: bytes, count: int) -> list[tuple[int, int]] | None:
    table = []
    for index in range(count):
        status, zero16, zero32, length = struct.unpack_from("<HHIQ", body, 16 * index)
        if zero16 or zero32 or status > 3:
            return None
        table.append((status, length))
    return table


def _expected(op: Op | str, request: dict[str, Any], stream: _Stream) -> object:
    """What a careful ``lm://`` client returns for the bytes in ``stream`` (or :data:`_REFUSED`)."""
    auth = stream.reply(Op.AUTH, 1, 0, 24)
    if auth is None or len(auth[1]) != 24:
        return _REFUSED
    max_key, reserved, max_keys, max_value, max_frame = struct.unpack("<HHIQQ", auth[1])
    if reserved or min(max_key, max_keys, max_value) < 1 or max_frame < 17:
        return _REFUSED
    if op in ("health", "stats"):
        reply = stream.reply(
            Op.HEALTH if op == "health" else Op.STATS, request["id"], 0, 0 if op == "health" else 1 << 20
        )
        if reply is None:
            return _REFUSED
        if op == "health":
            return None
        try:
            answer = json.loads(reply[1])
        except ValueError:
            return _REFUSED
        return answer if isinstance(answer, dict) else _REFUSED
    count = len(request.get("keys", []))
    rooms: list[int] = request.get("rooms", [])
    limit = 16 * count + (sum(rooms) if op is Op.GET else 0)
    assert isinstance(op, Op)
    reply = stream.reply(op, request["id"], count, limit)
    if reply is None or len(reply[1]) < 16 * count:
        return _REFUSED
    body = reply[1]
    table = _statuses(body, count)
    if table is None:
        return _REFUSED
    if op is not Op.GET:
        if len(body) != 16 * count:
            return _REFUSED
        if op is Op.PUT:
            return None if all(status == ItemStatus.OK for status, _ in table) else _REFUSED
        if op is Op.EXISTS:
            return [status == ItemStatus.OK for status, _ in table]
        return sum(status == ItemStatus.OK for status, _ in table)
    lengths: list[int | None] = []
    for (status, length), room in zip(table, rooms, strict=True):
        if status == ItemStatus.NO_SPACE or (status == ItemStatus.OK and length > room):
            return _REFUSED
        lengths.append(length if status == ItemStatus.OK else None)
    if any(status == ItemStatus.TOO_LARGE for status, _ in table):
        return _REFUSED
    if len(body) != 16 * count + sum(length or 0 for length in lengths):
        return _REFUSED
    values: list[bytes | None] = []
    offset = 16 * count
    for got in lengths:
        values.append(None if got is None else body[offset : offset + got])
        offset += got or 0
    return values


@dataclass(slots=True)
class _ClientCase:
    op: Op | str
    auth_reply: bytes = b""
    replies: Callable[[dict[str, Any]], bytes] = lambda request: b""
    sent: bytes = b""
    request: dict[str, Any] = field(default_factory=dict)


def _honest_auth() -> bytes:
    return encode_body_reply(Op.AUTH, 1, encode_limits(Limits()))


def _client_case(rng: random.Random) -> _ClientCase:
    """A call to make and how the hostile server answers it (one of its two replies mutated)."""
    op: Op | str = rng.choice((Op.PUT, Op.GET, Op.GET, Op.GET, Op.EXISTS, Op.DELETE, "health", "stats"))
    mutate_auth = rng.random() < 0.1
    if mutate_auth:
        op = "health"
    case = _ClientCase(op)
    case.auth_reply = _honest_auth()
    if mutate_auth:
        # The client may refuse it, wait for more of it, or accept it and ask for HEALTH: the
        # server cannot tell, so it sends the HEALTH reply (to request 1, a new connection's
        # first) right behind it and closes, and never waits on the client.
        case.auth_reply = mutate(rng, case.auth_reply) + encode_body_reply(Op.HEALTH, 1, b"")
        case.request = {"id": 1}

    def answer(request: dict[str, Any]) -> bytes:
        request_id, keys = request["id"], request["keys"]
        if op == "health":
            honest = encode_body_reply(Op.HEALTH, request_id, b"")
        elif op == "stats":
            honest = encode_body_reply(
                Op.STATS, request_id, json.dumps({"memory": {"used": rng.randrange(99)}}).encode()
            )
        elif op is Op.GET:
            replies, values = [], []
            for room in request["rooms"]:
                roll = rng.random()
                if roll < 0.2:
                    replies.append((ItemStatus.NOT_FOUND, 0))
                elif roll < 0.25:
                    replies.append((ItemStatus.TOO_LARGE, room + 1))
                else:
                    value = rng.randbytes(rng.randint(0, room))
                    replies.append((ItemStatus.OK, len(value)))
                    values.append(value)
            honest = encode_reply(op, request_id, replies, sum(map(len, values))) + b"".join(values)
        else:
            statuses = [ItemStatus.OK if rng.random() < 0.8 else ItemStatus.NOT_FOUND for _ in keys]
            if op is Op.PUT:
                statuses = [
                    rng.choice((ItemStatus.OK,) * 8 + (ItemStatus.NO_SPACE, ItemStatus.TOO_LARGE)) for _ in keys
                ]
            assert isinstance(op, Op)
            honest = encode_reply(op, request_id, [(status, 0) for status in statuses])
        if mutate_auth:
            return honest
        roll = rng.random()
        if roll < 0.08:  # an ERROR reply instead, well-formed or not
            error = encode_error(rng.choice(list(ErrorCode)), "hostile", request_id)
            return error if rng.random() < 0.5 else mutate(rng, error)
        if roll < 0.12:
            return honest  # an honest control: it must be read right
        return mutate(rng, honest, items=len(keys))

    case.replies = answer
    return case


async def _serve_case(sock: socket.socket, case: _ClientCase, rng: random.Random) -> None:
    """One connection of the hostile server: AUTH, one request, the (mutated) replies, goodbye."""
    head = bytearray(HEADER.size)
    try:
        await recv_exactly(sock, memoryview(head))
        auth_body = bytearray(HEADER.unpack(head)[6])
        await recv_exactly(sock, memoryview(auth_body))
        case.sent += case.auth_reply  # before sending: the client may be done before this task runs again
        await _send_pieces(sock, case.auth_reply, rng)
        if case.request:
            return  # it was all in the AUTH reply (the ``finally`` says goodbye)
        await recv_exactly(sock, memoryview(head))
        _, _, opcode, _, request_id, count, length = HEADER.unpack(head)
        body = bytearray(length)
        await recv_exactly(sock, memoryview(body))
        request: dict[str, Any] = {"id": request_id, "keys": [], "rooms": []}
        offset = 16 * count
        for index in range(count):
            key_length, _, _, arg64 = ITEM.unpack_from(body, 16 * index)
            request["keys"].append(bytes(body[offset : offset + key_length]))
            request["rooms"].append(arg64)
            offset += key_length
        if opcode == Op.PUT:
            request["values"] = bytes(body[offset:])
        case.request = request
        reply = case.replies(request)
        case.sent += reply
        await _send_pieces(sock, reply, rng)
    except (ProtocolError, OSError):
        pass  # the client left
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


async def _send_pieces(sock: socket.socket, data: bytes, rng: random.Random) -> None:
    if rng.random() < 0.8 or len(data) < 2:
        await send_buffers(sock, [data])
        return
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 5))))
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        await send_buffers(sock, [data[start:end]])
        await anyio.lowlevel.checkpoint()


@contextlib.asynccontextmanager
async def _hostile_server(cases: list[_ClientCase], rng: random.Random) -> AsyncIterator[int]:
    """A loopback listener whose every connection serves the oldest case not yet served."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)  # noqa: FBT003

    async def accept() -> None:
        while True:
            await anyio.wait_readable(listener)
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                continue
            sock.setblocking(False)  # noqa: FBT003
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else replies in pieces wait for ACKs
            group.start_soon(serve, sock)

    async def serve(sock: socket.socket) -> None:
        with sock:
            if cases:
                await _serve_case(sock, cases.pop(0), rng)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(accept)
            yield listener.getsockname()[1]
            group.cancel_scope.cancel()
    finally:
        listener.close()


async def fuzz_client(
    open_client: Callable[[str], contextlib.AbstractAsyncContextManager[LmClient]],
    refusals: tuple[type[BaseException], ...],
    *,
    seed: int,
    cases: int,
) -> FuzzReport:
    """Make ``cases`` calls of a client of a hostile server; each must raise one of ``refusals``
    or return what the bytes it was sent say (see the module docstring)."""
    rng = random.Random(seed)
    report = FuzzReport(seed)
    started = time.perf_counter()
    queue: list[_ClientCase] = []
    failure: str | None = None
    async with _hostile_server(queue, rng) as port:
        for index in range(cases):
            failure = await _client_case_run(open_client, refusals, port, rng, queue, report)
            if failure is not None:
                failure = f"seed {seed}, case {index}: {failure}"
                break
    report.seconds = time.perf_counter() - started
    if failure is not None:  # raised out here, not from inside the server's task group
        report.crashes += 1
        raise FuzzFailure(failure)
    return report


async def _client_case_run(
    open_client: Callable[[str], contextlib.AbstractAsyncContextManager[LmClient]],
    refusals: tuple[type[BaseException], ...],
    port: int,
    rng: random.Random,
    queue: list[_ClientCase],
    report: FuzzReport,
) -> str | None:
    """One call of a fresh client against the hostile server; what went wrong, if anything."""
    case = _client_case(rng)
    queue[:] = [case]
    result: object = _REFUSED
    keys = [f"k{rng.randrange(1000)}" for _ in range(rng.choice((1, 1, 2, 4)))]
    buffers = [bytearray(b"\xee" * rng.choice((0, 1, 64, 3000))) for _ in keys]
    try:
        with anyio.fail_after(_CASE_LIMIT):
            async with open_client(f"lm://127.0.0.1:{port}") as client:
                result = await _call(client, case.op, keys, buffers, rng)
    except refusals:
        pass
    except TimeoutError:
        return f"the client hung ({case.op})"
    except Exception as exc:  # anything but the refusals is what the fuzz looks for
        return f"{case.op} raised {type(exc).__name__}: {exc}; sent {case.sent.hex()[:400]}"
    report.cases += 1
    report.connections += 1
    case.request.setdefault("id", 1)
    expected = _expected(case.op, case.request, _Stream(case.sent))
    if case.op is Op.GET and result is not _REFUSED:
        try:
            result = _read_back(result, buffers)
        except AssertionError as exc:
            return str(exc)
    if json.dumps(result, default=repr, sort_keys=True) != json.dumps(expected, default=repr, sort_keys=True):
        return f"{case.op} returned {result!r:.200}, the bytes say {expected!r:.200}; sent {case.sent.hex()[:400]}"
    report.outcomes["refused" if result is _REFUSED else "accepted"] += 1
    return None


async def _call(
    client: LmClient, op: Op | str, keys: list[str], buffers: list[bytearray], rng: random.Random
) -> object:
    if op == "health":
        await client.health()
        return None
    if op == "stats":
        return await client.server_statistics()
    if op is Op.PUT:
        values = [[memoryview(rng.randbytes(rng.choice((0, 10, 500))))] for _ in keys]
        await client.put_many(list(zip(keys, values, strict=True)), rng.choice((None, 1.0)))
        return None
    if op is Op.GET:
        return await client.get_many_into(
            [(key, [memoryview(buffer)]) for key, buffer in zip(keys, buffers, strict=True)]
        )
    if op is Op.EXISTS:
        return await client.exists(keys)
    return await client.delete(keys)


def _read_back(lengths: object, buffers: list[bytearray]) -> list[bytes | None]:
    """What a GET put into the caller's buffers; bytes past each length must be untouched."""
    assert isinstance(lengths, list)
    values: list[bytes | None] = []
    for length, buffer in zip(lengths, buffers, strict=True):
        if length is None:
            values.append(None)
            continue
        if buffer[length:] != b"\xee" * (len(buffer) - length):
            raise AssertionError("a GET wrote past the length it returned")
        values.append(bytes(buffer[:length]))
    return values
