"""Test helpers: real ``lmplug-server`` processes on loopback, and a minimal client.

For the server's own tests and for tests of ``lm://`` clients (lmplug-remote's); it needs
pytest (the ``testing`` extra). ``lm_server`` is one server for the whole session (256 MiB,
no auth, metrics on); ``lm_auth_server`` another that needs :data:`LM_TOKEN`, given in
``LMPLUG_SERVER_TOKEN``; ``lm_servers`` starts throwaway
servers for one test (small capacities, a disk store, kills and restarts) and stops
whatever is left when the test ends. Each server picks a free port (``--port 0``) and
reports it on its ready line.

:class:`WireClient` speaks the protocol plainly (one connection, one request at a time), so
the server's tests need no client library.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import anyio
import pytest

from lmplug_server import TOKEN_ENV
from lmplug_server.protocol import (
    ANY_LENGTH,
    ERROR_OPCODE,
    HEADER,
    ITEM,
    ItemStatus,
    Limits,
    Op,
    Reply,
    encode_auth,
    encode_keyed_request,
    encode_simple,
    parse_error_body,
    parse_limits,
    parse_reply_header,
    parse_reply_items,
)
from lmplug_server.server import LmServer, ServerConfig
from lmplug_server.sockio import recv_exactly, send_buffers

__all__ = [
    "LM_TOKEN",
    "LmServerProcess",
    "ServerFactory",
    "WireClient",
    "lm_auth_server",
    "lm_server",
    "lm_servers",
    "lm_url",
    "read_exactly",
    "serving",
]

LM_TOKEN = "lm-test-token"
_READY = re.compile(r"lmplug-server ready on lm://([\d.]+):(\d+)(?:.*metrics on http://[\d.]+:(\d+))?")
_START_LIMIT = 60.0


class LmServerProcess:
    """One server process; :meth:`start` again after :meth:`kill` or :meth:`stop` reuses its port."""

    def __init__(self, directory: Path, *arguments: str, command: tuple[str, ...] | None = None) -> None:
        self.directory = directory
        self.arguments = arguments
        self.command = command or (str(Path(sys.executable).parent / "lmplug-server"),)
        self.env = dict(os.environ)
        self.port = 0
        self.metrics_port: int | None = None
        self.process: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        self.log_path = directory / "server.log"
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"lm://127.0.0.1:{self.port}"

    def start(self) -> LmServerProcess:
        if self.process is not None:
            raise RuntimeError("already running")
        self._log = self.log_path.open("a")
        try:
            process = subprocess.Popen(
                [*self.command, "--host", "127.0.0.1", "--port", str(self.port), *self.arguments],
                stdout=subprocess.PIPE,
                stderr=self._log,
                text=True,
                env=self.env,
            )
        except BaseException:
            self._close()
            raise
        self.process = process
        assert process.stdout is not None
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(process.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(_START_LIMIT)
        match = _READY.search(line[0]) if line else None
        if match is None:
            self.kill()
            raise RuntimeError(f"lmplug-server did not start: {line!r}; log:\n{self.log_path.read_text()[-3000:]}")
        self.port = int(match.group(2))
        self.metrics_port = int(match.group(3)) if match.group(3) else None
        return self

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for it; its exit status."""
        process = self.process
        if process is None:
            return 0
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
        try:
            status = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            status = process.wait()
        self._close()
        return status

    def kill(self) -> None:
        """``kill -9``."""
        self.stop(signal.SIGKILL)

    def _close(self) -> None:
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None


class ServerFactory:
    """Starts servers for one test; stops them all at its end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[LmServerProcess] = []

    def __call__(self, *arguments: str, start: bool = True) -> LmServerProcess:
        server = LmServerProcess(self.directory / f"server-{len(self.started)}", *arguments)
        self.started.append(server)
        return server.start() if start else server

    def close(self) -> None:
        for server in self.started:
            server.kill()


@pytest.fixture(scope="session")
def lm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LmServerProcess]:
    """A session-wide server: 256 MiB of memory, 64 MiB values at most, metrics on."""
    server = LmServerProcess(
        tmp_path_factory.mktemp("lm-server"), "--capacity", "256MiB", "--max-value", "64MiB", "--metrics-port", "0"
    )
    server.env.pop(TOKEN_ENV, None)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def lm_url(lm_server: LmServerProcess) -> str:
    return lm_server.url


@pytest.fixture(scope="session")
def lm_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LmServerProcess]:
    """A server that needs :data:`LM_TOKEN`, given in the environment."""
    server = LmServerProcess(tmp_path_factory.mktemp("lm-auth-server"), "--capacity", "32MiB")
    server.env[TOKEN_ENV] = LM_TOKEN
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def lm_servers(tmp_path: Path) -> Iterator[ServerFactory]:
    """``lm_servers("--capacity", "1MiB", ...)`` starts a server for this test only."""
    factory = ServerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


class WireClient:
    """A minimal ``lm://`` client for tests of the server: one connection, one request at a time.

    Replies go through the protocol module's parsers; an ERROR reply raises the
    :class:`~lmplug_server.protocol.ProtocolError` it describes.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._request_id = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, port: int, token: bytes | None = None) -> AsyncIterator[WireClient]:
        """A client of the server on loopback ``port`` (authenticated with ``token`` when given)."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)  # noqa: FBT003
        client = cls(sock)
        try:
            if token is not None:
                await client.auth(token)
            yield client
        finally:
            sock.close()

    def _next_id(self) -> int:
        self._request_id += 1
        return self._request_id

    async def _reply(self, op: Op, request_id: int, count: int) -> bytearray:
        head = bytearray(HEADER.size)
        await recv_exactly(self.sock, memoryview(head))
        header = parse_reply_header(head, op, request_id, count, 1 << 40)
        body = bytearray(header.body_length)
        await recv_exactly(self.sock, memoryview(body))
        if header.opcode == ERROR_OPCODE:
            raise parse_error_body(body)
        return body

    async def keyed(
        self,
        op: Op,
        keys: Sequence[str],
        arg32: Sequence[int] = (),
        arg64: Sequence[int] = (),
        values: Sequence[bytes] = (),
    ) -> tuple[list[Reply], bytes]:
        """One keyed request; its reply items and the values that follow them."""
        request_id = self._next_id()
        request = encode_keyed_request(op, request_id, [key.encode() for key in keys], arg32, arg64)
        await send_buffers(self.sock, [request, *values])
        body = await self._reply(op, request_id, len(keys))
        table = len(keys) * ITEM.size
        return parse_reply_items(body[:table], len(keys)), bytes(body[table:])

    async def put_many(self, entries: Sequence[tuple[str, bytes]], ttl_ms: int = 0) -> list[ItemStatus]:
        keys = [key for key, _ in entries]
        values = [value for _, value in entries]
        replies, _ = await self.keyed(Op.PUT, keys, [ttl_ms] * len(keys), [len(v) for v in values], values)
        return [reply.status for reply in replies]

    async def put(self, key: str, value: bytes, ttl_ms: int = 0) -> ItemStatus:
        return (await self.put_many([(key, value)], ttl_ms))[0]

    async def get_many(self, keys: Sequence[str], room: int = ANY_LENGTH) -> list[bytes | None]:
        replies, data = await self.keyed(Op.GET, keys, (), [room] * len(keys))
        found: list[bytes | None] = []
        offset = 0
        for reply in replies:
            if reply.status is ItemStatus.OK:
                found.append(data[offset : offset + reply.length])
                offset += reply.length
            else:
                found.append(None)
        return found

    async def get(self, key: str) -> bytes | None:
        return (await self.get_many([key]))[0]

    async def exists(self, keys: Sequence[str]) -> list[bool]:
        replies, _ = await self.keyed(Op.EXISTS, keys)
        return [reply.status is ItemStatus.OK for reply in replies]

    async def delete(self, keys: Sequence[str]) -> int:
        replies, _ = await self.keyed(Op.DELETE, keys)
        return sum(reply.status is ItemStatus.OK for reply in replies)

    async def _simple(self, op: Op) -> bytearray:
        request_id = self._next_id()
        await send_buffers(self.sock, [encode_simple(op, request_id)])
        return await self._reply(op, request_id, 0)

    async def health(self) -> None:
        await self._simple(Op.HEALTH)

    async def stats(self) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(await self._simple(Op.STATS))
        return answer

    async def auth(self, token: bytes) -> Limits:
        request_id = self._next_id()
        await send_buffers(self.sock, [encode_auth(request_id, token)])
        return parse_limits(await self._reply(Op.AUTH, request_id, 0))


@contextlib.asynccontextmanager
async def serving(config: ServerConfig) -> AsyncIterator[LmServer]:
    """An :class:`LmServer` serving in this event loop (asyncio or trio) until the block ends."""
    server = LmServer(config)
    async with anyio.create_task_group() as group:
        await group.start(server.serve)
        try:
            yield server
        finally:
            server.shutdown()


def read_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from a blocking socket; :class:`EOFError` when the peer closes first."""
    data = bytearray()
    while len(data) < size:
        piece = sock.recv(size - len(data))
        if not piece:
            raise EOFError(f"closed after {len(data)} of {size} bytes")
        data += piece
    return bytes(data)
