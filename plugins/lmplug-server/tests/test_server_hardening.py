"""lmplug-server against bad peers: broken frames, limits, auth, disconnects and a crowd.

Every abuse goes to the session's server over a raw socket; afterwards a well-behaved
client still reads back exactly what it stored before and stores and reads new data, and the
server holds no memory reserved and no connection open for the abuser.
"""

from __future__ import annotations

import os
import socket
import struct

import anyio
import pytest

from lmplug_server import protocol
from lmplug_server.fuzzing import check_server
from lmplug_server.protocol import ErrorCode, ItemStatus, Op
from lmplug_server.testing import LM_TOKEN, LmServerProcess, ServerFactory, WireClient, read_exactly

SENTINEL = os.urandom(100_000)


def raw(server: LmServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_error(sock: socket.socket) -> protocol.ProtocolError:
    """The ERROR reply the server sends, after which it must close the connection."""
    header = protocol.HEADER.unpack(read_exactly(sock, 24))
    assert header[2] == protocol.ERROR_OPCODE
    error = protocol.parse_error_body(read_exactly(sock, header[6]))
    assert sock.recv(1) == b""  # closed
    return error


@pytest.fixture
def sentinel(lm_server: LmServerProcess) -> str:
    """A value stored before the abuse, checked after it."""
    name = f"sentinel-{os.getpid()}"

    async def store() -> None:
        async with WireClient.connect(lm_server.port) as client:
            assert await client.put(name, SENTINEL) is ItemStatus.OK

    anyio.run(store)
    return name


async def check_well_behaved_client(server: LmServerProcess, sentinel: str) -> None:
    """After an abuse: a client reads the sentinel back and stores and reads new data, and the
    abuser left nothing behind (no memory reserved, no connection open but the check's)."""
    async with WireClient.connect(server.port) as client:
        assert await client.get(sentinel) == SENTINEL
        fresh = os.urandom(50_000)
        assert await client.put(f"after-{sentinel}", fresh) is ItemStatus.OK
        assert await client.get(f"after-{sentinel}") == fresh
        await client.health()
    await check_server(server.port, None, {sentinel.encode(): SENTINEL})


def header(opcode: int, count: int = 0, body_length: int = 0, *, magic: bytes = b"LMKV", version: int = 1) -> bytes:
    return protocol.HEADER.pack(magic, version, opcode, 0, 77, count, body_length)


BAD_FRAMES = {
    "wrong magic": (header(Op.HEALTH, magic=b"HTTP"), ErrorCode.BAD_MAGIC),
    "http request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.BAD_MAGIC),
    "wrong version": (header(Op.HEALTH, version=9), ErrorCode.UNSUPPORTED_VERSION),
    "unknown opcode": (header(0x42), ErrorCode.UNKNOWN_OPCODE),
    "reply opcode as request": (header(Op.GET | 0x80, 1, 17), ErrorCode.UNKNOWN_OPCODE),
    "flags set": (protocol.HEADER.pack(b"LMKV", 1, Op.HEALTH, 0x8000, 1, 0, 0), ErrorCode.MALFORMED),
    "body past max_frame": (header(Op.PUT, 1, 1 << 62), ErrorCode.FRAME_TOO_LARGE),
    "too many keys": (header(Op.EXISTS, 1 << 30, 1 << 25), ErrorCode.TOO_MANY_KEYS),
    "key past max_key": (protocol.encode_keyed_request(Op.GET, 1, [b"k" * 2000]), ErrorCode.KEY_TOO_LONG),
    "items disagree with body": (
        header(Op.GET, 1, 40) + protocol.ITEM.pack(3, 0, 0, 10) + b"abc" + bytes(21),
        ErrorCode.MALFORMED,
    ),
    "put values past max_frame": (
        header(Op.PUT, 2, 2 * 17) + protocol.ITEM.pack(1, 0, 0, 1 << 40) + protocol.ITEM.pack(1, 0, 0, 1 << 40),
        ErrorCode.FRAME_TOO_LARGE,
    ),
    "body on health": (header(Op.HEALTH, 0, 8) + bytes(8), ErrorCode.MALFORMED),
    "long auth token": (header(Op.AUTH, 0, 5000), ErrorCode.FRAME_TOO_LARGE),
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
async def test_a_broken_frame_gets_an_error_and_a_closed_connection(
    lm_server: LmServerProcess, sentinel: str, name: str
) -> None:
    frame, code = BAD_FRAMES[name]
    with raw(lm_server) as sock:
        sock.sendall(frame)
        assert read_error(sock).code is code
    await check_well_behaved_client(lm_server, sentinel)


@pytest.mark.parametrize("cut", [3, 24, 30, 60, 5000])
async def test_a_client_that_disconnects_mid_frame_harms_no_one(
    lm_server: LmServerProcess, sentinel: str, cut: int
) -> None:
    key = b"half-written"
    frame = protocol.encode_keyed_request(Op.PUT, 1, [key], [0], [10_000]) + bytes(10_000)
    with raw(lm_server) as sock:
        sock.sendall(frame[:cut])
    with raw(lm_server) as sock:  # a request on a new connection: nothing of the half frame is stored
        sock.sendall(protocol.encode_keyed_request(Op.EXISTS, 2, [key]))
        reply = read_exactly(sock, 24 + 16)
        assert protocol.parse_reply_items(reply[24:], 1)[0].status is ItemStatus.NOT_FOUND
    await check_well_behaved_client(lm_server, sentinel)


async def test_a_value_past_max_value_is_refused_and_the_connection_stays_usable(
    lm_server: LmServerProcess, sentinel: str
) -> None:
    big = (64 << 20) + 1  # the session server's --max-value is 64 MiB
    with raw(lm_server) as sock:
        sock.sendall(protocol.encode_keyed_request(Op.PUT, 5, [b"too-big", b"fine"], [0, 0], [big, 3]))
        sock.sendall(bytes(big))
        sock.sendall(b"abc")
        reply = read_exactly(sock, 24 + 32)
        statuses = [item.status for item in protocol.parse_reply_items(reply[24:], 2)]
        assert statuses == [ItemStatus.TOO_LARGE, ItemStatus.OK]
        sock.sendall(protocol.encode_keyed_request(Op.GET, 6, [b"fine", b"too-big"], (), [100, 100]))
        reply = read_exactly(sock, 24 + 32 + 3)
        items = protocol.parse_reply_items(reply[24:56], 2)
        assert [(item.status, item.length) for item in items] == [(ItemStatus.OK, 3), (ItemStatus.NOT_FOUND, 0)]
        assert reply[56:] == b"abc"
    await check_well_behaved_client(lm_server, sentinel)


async def test_pipelined_requests_are_answered_in_order(lm_server: LmServerProcess) -> None:
    with raw(lm_server) as sock:
        frames = [protocol.encode_keyed_request(Op.PUT, 10, [b"p1"], [0], [2]) + b"v1"]
        frames += [protocol.encode_keyed_request(Op.EXISTS, 11 + i, [b"p1", b"nope"]) for i in range(5)]
        sock.sendall(b"".join(frames))
        ids = []
        for _ in frames:
            head = protocol.HEADER.unpack(read_exactly(sock, 24))
            read_exactly(sock, head[6])
            ids.append(head[4])
        assert ids == [10, 11, 12, 13, 14, 15]


async def test_a_hundred_concurrent_clients_get_their_own_values(lm_server: LmServerProcess) -> None:
    failures: list[str] = []

    async def client(index: int) -> None:
        data = struct.pack("<I", index) * (16_384 + index)
        async with WireClient.connect(lm_server.port) as connector:
            for round_ in range(3):
                key = f"crowd-{index}-{round_}"
                await connector.put(key, data)
                back = await connector.get(key)
                if back != data:
                    failures.append(f"client {index} round {round_}: {None if back is None else len(back)} bytes")
            if await connector.delete([f"crowd-{index}-{r}" for r in range(3)]) != 3:
                failures.append(f"client {index}: delete")

    async with anyio.create_task_group() as group:
        for index in range(100):
            group.start_soon(client, index)
    assert failures == []


# ---------------------------------------------------------------------------- auth


async def test_requests_before_auth_are_refused(lm_auth_server: LmServerProcess) -> None:
    with raw(lm_auth_server) as sock:
        sock.sendall(protocol.encode_keyed_request(Op.GET, 1, [b"k"], (), [10]))
        assert read_error(sock).code is ErrorCode.AUTH_REQUIRED


async def test_the_right_token_opens_the_store(lm_auth_server: LmServerProcess) -> None:
    async with WireClient.connect(lm_auth_server.port, LM_TOKEN.encode()) as client:
        assert await client.put("authed", b"secret value") is ItemStatus.OK
        assert await client.get("authed") == b"secret value"


async def test_a_wrong_token_is_refused_and_disconnected(lm_auth_server: LmServerProcess) -> None:
    with raw(lm_auth_server) as sock:
        sock.sendall(protocol.encode_auth(1, b"not-the-token"))
        assert read_error(sock).code is ErrorCode.AUTH_FAILED


BEFORE_AUTH = {
    "PUT": protocol.encode_keyed_request(Op.PUT, 1, [b"sneaky"], [0], [5]) + b"value",
    "DELETE": protocol.encode_keyed_request(Op.DELETE, 1, [b"authed"]),
    "EXISTS": protocol.encode_keyed_request(Op.EXISTS, 1, [b"authed"]),
    "STATS": protocol.encode_simple(Op.STATS, 1),
    "HEALTH": protocol.encode_simple(Op.HEALTH, 1),
}


@pytest.mark.parametrize("name", sorted(BEFORE_AUTH))
async def test_every_request_before_auth_is_refused(lm_auth_server: LmServerProcess, name: str) -> None:
    with raw(lm_auth_server) as sock:
        sock.sendall(BEFORE_AUTH[name])
        assert read_error(sock).code is ErrorCode.AUTH_REQUIRED
    async with WireClient.connect(lm_auth_server.port, LM_TOKEN.encode()) as client:
        assert await client.get("sneaky") is None  # nothing was written


@pytest.mark.parametrize(
    "token", [b"", LM_TOKEN.encode()[:-1], LM_TOKEN.encode() + b"x", LM_TOKEN.encode().upper(), b"\0" * len(LM_TOKEN)]
)
async def test_near_miss_tokens_are_refused(lm_auth_server: LmServerProcess, token: bytes) -> None:
    """An empty token, a prefix or an extension of the right one, another case, zeros: all refused."""
    assert token != LM_TOKEN.encode()
    with raw(lm_auth_server) as sock:
        sock.sendall(protocol.encode_auth(1, token))
        assert read_error(sock).code is ErrorCode.AUTH_FAILED


async def test_a_request_pipelined_behind_a_failed_auth_is_never_run(lm_auth_server: LmServerProcess) -> None:
    with raw(lm_auth_server) as sock:
        put = protocol.encode_keyed_request(Op.PUT, 2, [b"pipelined"], [0], [5]) + b"value"
        sock.sendall(protocol.encode_auth(1, b"wrong") + put)
        assert read_error(sock).code is ErrorCode.AUTH_FAILED  # and the connection is closed
    async with WireClient.connect(lm_auth_server.port, LM_TOKEN.encode()) as client:
        assert await client.get("pipelined") is None


def _tagged(key: int, writer: int, size: int) -> bytes:
    """A value that says which key and writer it belongs to, in every 8 bytes of it."""
    return struct.pack("<II", key, writer) * (size // 8)


async def test_a_hundred_clients_racing_on_the_same_keys_under_memory_pressure(
    lm_servers: ServerFactory, anyio_backend: str
) -> None:
    """100 clients PUT, GET and DELETE the same 12 keys over the wire on a 1 MiB server that must
    evict to take them (values of 64-192 KiB): every GET is a miss or one whole value that some
    writer PUT under that key, never a mix or another key's; the server evicts, stays up, and
    once the crowd leaves nothing is reserved and no connection is left open."""
    server = lm_servers("--capacity", "1MiB", start=False)
    server.env["LMPLUG_SERVER_BACKEND"] = anyio_backend
    server.start()
    failures: list[str] = []
    gets = {"hit": 0, "miss": 0}

    async def client(writer: int) -> None:
        async with WireClient.connect(server.port) as connector:
            for round_ in range(12):
                key = (writer + round_) % 12
                name = f"race-{key}"
                size = 65_536 * (1 + (writer + round_) % 3)
                if round_ % 3 == 0:
                    await connector.put(name, _tagged(key, writer, size))
                elif round_ % 3 == 1:
                    value = await connector.get(name)
                    if value is None:
                        gets["miss"] += 1
                        continue
                    gets["hit"] += 1
                    owner_key, owner = struct.unpack_from("<II", value)
                    if owner_key != key or value != _tagged(key, owner, len(value)) or len(value) % 65_536:
                        failures.append(f"{name}: {len(value)} bytes, tagged key {owner_key} writer {owner}")
                else:
                    await connector.delete([name])

    async with anyio.create_task_group() as group:
        for writer in range(100):
            group.start_soon(client, writer)
    assert failures == []
    assert gets["hit"] > 0  # the race is real: values were read back while others wrote
    async with WireClient.connect(server.port) as connector:
        stats = await connector.stats()
    assert stats["evictions"] > 0  # 1 MiB held less than what was written
    assert stats["memory"]["reserved"] == 0
    assert stats["memory"]["used"] <= stats["memory"]["capacity"]
    assert stats["connections"]["open"] == 1  # this one
