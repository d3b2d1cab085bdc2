"""The live server under a socket-level fuzz, killed and stalled clients, and a crowd racing
on the same keys under memory pressure; after each, nothing leaked (see lmplug_server.fuzzing).

The server is a real process; it runs on the test's own backend (``LMPLUG_SERVER_BACKEND``).
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct

import anyio

from lmplug_server import protocol
from lmplug_server.fuzzing import FUZZ_SERVER_ARGUMENTS, check_server, fuzz_server
from lmplug_server.protocol import ErrorCode, ItemStatus, Op
from lmplug_server.testing import LmServerProcess, ServerFactory, WireClient, read_exactly

TOKEN = b"fuzz-token"
CASES_PER_BACKEND = 6000
SEEDS = {"asyncio": 20261206, "trio": 20261207}


def start(lm_servers: ServerFactory, backend: str, *arguments: str) -> LmServerProcess:
    server = lm_servers(*arguments, "--auth-token", TOKEN.decode(), start=False)
    server.env["LMPLUG_SERVER_BACKEND"] = backend
    return server.start()


def alive(server: LmServerProcess) -> bool:
    return server.process is not None and server.process.poll() is None


async def test_the_live_server_survives_a_fuzz_of_its_frames(lm_servers: ServerFactory, anyio_backend: str) -> None:
    """Mutated frames, valid headers over random bodies, wrong lengths and key counts, cut and
    slow sends, bad tokens; checked every 500 frames: up, answering, nothing reserved or left
    open, the values stored before unchanged (a failure names the seed: fuzz_server(seed=...))."""
    server = start(lm_servers, anyio_backend, *FUZZ_SERVER_ARGUMENTS)
    report = await fuzz_server(
        server.port, seed=SEEDS[anyio_backend], cases=CASES_PER_BACKEND, token=TOKEN, alive=lambda: alive(server)
    )
    assert report.cases >= CASES_PER_BACKEND
    assert (report.crashes, report.leaks) == (0, 0)
    # the fuzz reaches deep: replies of every kind, and abusive frames the server took as valid
    assert report.outcomes["accepted"] > 50
    assert report.outcomes["closed"] > 200  # frames cut short, the peer gone mid-frame
    for code in ("MALFORMED", "BAD_MAGIC", "AUTH_FAILED", "AUTH_REQUIRED", "TOO_MANY_KEYS", "FRAME_TOO_LARGE"):
        assert report.outcomes[code] > 0, code


def raw(server: LmServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def auth(sock: socket.socket) -> None:
    sock.sendall(protocol.encode_auth(1, TOKEN))
    head = protocol.HEADER.unpack(read_exactly(sock, 24))
    read_exactly(sock, head[6])


async def test_stalled_and_killed_uploads_give_their_reservations_back(
    lm_servers: ServerFactory, anyio_backend: str
) -> None:
    server = start(lm_servers, anyio_backend, "--capacity", "8MiB", "--request-timeout", "0.5")
    stored = {b"kept": b"v" * 5000}
    async with WireClient.connect(server.port, TOKEN) as client:
        assert await client.put("kept", stored[b"kept"]) is ItemStatus.OK
    head = protocol.encode_keyed_request(Op.PUT, 2, [b"big"], [0], [6 << 20])
    with raw(server) as stalled:  # half a value, then nothing: cut off after --request-timeout
        auth(stalled)
        stalled.sendall(head + bytes(3 << 20))
        fields = protocol.HEADER.unpack(read_exactly(stalled, 24))
        assert protocol.parse_error_body(read_exactly(stalled, fields[6])).code is ErrorCode.TIMEOUT
    for _ in range(3):  # killed mid-value: a reset, not a goodbye
        killed = raw(server)
        auth(killed)
        killed.sendall(head + bytes(1 << 20))
        killed.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        killed.close()
    stats = await check_server(server.port, TOKEN, stored, lambda: alive(server))
    assert stats["errors"]["timeout"] == 1
    async with WireClient.connect(server.port, TOKEN) as client:
        assert await client.exists(["big"]) == [False]
        assert await client.put("big", bytes(6 << 20)) is ItemStatus.OK  # the room came back


def written(writer: int, round_: int, size: int) -> bytes:
    """A value that names who wrote it, so that a reader can tell a whole one from a mixture."""
    seed = hashlib.blake2b(struct.pack("<III", writer, round_, size), digest_size=8).digest()
    body = (seed * (size // 8 + 1))[: size - 12]
    return struct.pack("<III", writer, round_, size) + body


def whole(value: bytes) -> bool:
    writer, round_, size = struct.unpack_from("<III", value)
    return len(value) == size and value == written(writer, round_, size)


async def test_a_hundred_clients_racing_on_the_same_keys_under_memory_pressure(
    lm_servers: ServerFactory, anyio_backend: str
) -> None:
    """100 clients PUT, GET and DELETE 8 shared keys with 64-256 KiB values on a 1 MiB server: far
    more than fits, so writers wait for room and evict one another. Every value read back is one
    that was written, whole; afterwards nothing is reserved and no connection is left open."""
    server = start(lm_servers, anyio_backend, "--capacity", "1MiB")
    mixtures: list[str] = []
    reads = [0, 0]  # hits, misses

    async def client(writer: int) -> None:
        rng = random.Random(writer)
        async with WireClient.connect(server.port, TOKEN) as wire:
            for round_ in range(12):
                key = f"shared-{rng.randrange(8)}"
                roll = rng.random()
                if roll < 0.45:
                    value = written(writer, round_, rng.randrange(64 << 10, 256 << 10))
                    assert await wire.put(key, value) is ItemStatus.OK
                elif roll < 0.9:
                    value = await wire.get(key)
                    reads[value is None] += 1
                    if value is not None and not whole(value):
                        mixtures.append(f"{key}: {len(value)} bytes, header {struct.unpack_from('<III', value)}")
                else:
                    await wire.delete([key])

    with anyio.fail_after(120):
        async with anyio.create_task_group() as group:
            for writer in range(100):
                group.start_soon(client, writer)
    assert mixtures == []
    assert reads[0] > 50  # the readers did see values, not only misses
    stats = await check_server(server.port, TOKEN, {}, lambda: alive(server))
    assert stats["evictions"] > 0
    assert stats["memory"]["used"] <= stats["memory"]["capacity"]
    assert stats["connections"]["accepted"] >= 101
