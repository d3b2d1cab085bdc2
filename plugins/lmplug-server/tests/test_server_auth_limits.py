"""A token server against peers that never authenticate: the AUTH deadline, the cap on
connections waiting for AUTH, and a log that bad clients cannot flood.

The deadline and the cap run against real server processes (their command-line options);
the log against a server in the test's event loop, to read its records.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import anyio
import pytest

from lmplug_server import protocol
from lmplug_server.protocol import ErrorCode, ItemStatus, Op
from lmplug_server.server import ServerConfig
from lmplug_server.testing import LmServerProcess, ServerFactory, WireClient, read_exactly, serving
from lmplug_server.throttle import ThrottledLog

TOKEN = b"limits-token"


def raw(server: LmServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def refusal(sock: socket.socket) -> ErrorCode | None:
    """The code of the ERROR reply the server closes with (``None``: closed without one)."""
    try:
        head = read_exactly(sock, protocol.HEADER.size)
        fields = protocol.HEADER.unpack(head)
        assert fields[2] == protocol.ERROR_OPCODE
        code = protocol.parse_error_body(read_exactly(sock, fields[6])).code
        assert sock.recv(1) == b""
    except (EOFError, ConnectionResetError):
        return None
    return code


async def connections(server: LmServerProcess) -> dict[str, int]:
    """The server's connection counts once the checking client's own is the only one open."""
    async with WireClient.connect(server.port, TOKEN) as client:
        with anyio.fail_after(10):
            while True:
                counts: dict[str, int] = (await client.stats())["connections"]
                if counts["open"] == 1 and counts["unauthenticated"] == 0:
                    return counts
                await anyio.sleep(0.02)


@pytest.fixture
def token_server(lm_servers: ServerFactory) -> LmServerProcess:
    return lm_servers(
        "--capacity", "1MiB", "--auth-token", TOKEN.decode(), "--auth-deadline", "0.4", "--max-unauthenticated", "4"
    )


async def test_an_idle_connection_that_never_authenticates_is_closed_at_the_deadline(
    token_server: LmServerProcess,
) -> None:
    with raw(token_server) as sock:
        start = time.monotonic()
        assert refusal(sock) is ErrorCode.TIMEOUT
        assert 0.3 < time.monotonic() - start < 5
    await connections(token_server)


@pytest.mark.parametrize("sent", [1, 23, 24 + 3])
async def test_a_slow_auth_is_cut_off_at_the_deadline(token_server: LmServerProcess, sent: int) -> None:
    """Slowloris: part of an AUTH frame, then nothing; the request timeout (60 s) is not what saves us."""
    with raw(token_server) as sock:
        sock.sendall(protocol.encode_auth(1, TOKEN)[:sent])
        start = time.monotonic()
        assert refusal(sock) is ErrorCode.TIMEOUT
        assert time.monotonic() - start < 5
    await connections(token_server)


async def test_authenticating_lifts_the_deadline(token_server: LmServerProcess) -> None:
    async with WireClient.connect(token_server.port, TOKEN) as client:
        await anyio.sleep(1.0)  # more than twice the deadline
        assert await client.put("after-the-deadline", b"still here") is ItemStatus.OK
        assert await client.get("after-the-deadline") == b"still here"


async def test_requests_other_than_auth_do_not_reset_the_deadline(token_server: LmServerProcess) -> None:
    """Each refused request closes the connection; a new one starts a new deadline, never a longer one."""
    for op in (Op.HEALTH, Op.STATS):
        with raw(token_server) as sock:
            sock.sendall(protocol.encode_simple(op, 1))
            assert refusal(sock) is ErrorCode.AUTH_REQUIRED
    await connections(token_server)


async def test_connections_waiting_for_auth_are_capped(token_server: LmServerProcess) -> None:
    async with WireClient.connect(token_server.port, TOKEN) as early:
        idle = [raw(token_server) for _ in range(4)]
        try:
            await anyio.sleep(0.1)  # let the server count them
            with raw(token_server) as fifth:
                start = time.monotonic()
                assert refusal(fifth) in (ErrorCode.AUTH_REQUIRED, None)
                assert time.monotonic() - start < 0.3  # at once, not at the deadline
            # connections that authenticated before the flood keep working during it
            assert await early.put("during-the-flood", b"ok") is ItemStatus.OK
        finally:
            for sock in idle:
                sock.close()
    counts = await connections(token_server)  # the slots come back once they leave
    assert counts["accepted"] >= 7


async def test_the_cap_frees_slots_at_the_deadline(token_server: LmServerProcess) -> None:
    idle = [raw(token_server) for _ in range(4)]
    try:
        for sock in idle:
            assert refusal(sock) is ErrorCode.TIMEOUT
        async with WireClient.connect(token_server.port, TOKEN) as client:
            await client.health()
    finally:
        for sock in idle:
            sock.close()
    await connections(token_server)


@pytest.fixture
def server_records(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="lmplug.server"):
        yield caplog


async def test_bad_clients_cannot_flood_the_log(server_records: pytest.LogCaptureFixture) -> None:
    config = ServerConfig(port=0, capacity=1 << 20, auth_token=TOKEN, log_every=0.5)
    async with serving(config) as server:
        assert server.address is not None

        async def bad_client() -> None:
            async with await anyio.connect_tcp("127.0.0.1", server.address[1]) as stream:  # type: ignore[index]
                await stream.send(b"GET / HTTP/1.1\r\n\r\n" + bytes(24))
                with anyio.fail_after(5):
                    while True:
                        try:
                            await stream.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            return

        for _ in range(50):
            await bad_client()
        loud = [r for r in server_records.records if r.levelno >= logging.INFO and "closing" in r.getMessage()]
        assert len(loud) == 1
        await anyio.sleep(0.6)
        await bad_client()
        loud = [r for r in server_records.records if r.levelno >= logging.INFO and "closing" in r.getMessage()]
        assert len(loud) == 2
        assert "and 49 more like it" in loud[1].getMessage()
        assert server.errors["bad_magic"] == 51


def test_the_throttled_log_reports_each_kind_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    log = ThrottledLog(logging.getLogger("lmplug.server.test"), every=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.DEBUG, logger="lmplug.server.test"):
        assert log.report("a", "trouble %s", 1)
        assert not log.report("a", "trouble %s", 2)
        assert log.report("b", "other")  # another kind is not held back
        now[0] += 10.0
        assert log.report("a", "trouble %s", 3)
    loud = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert loud == ["trouble 1", "other", "trouble 3 (and 1 more like it in 10 s)"]
