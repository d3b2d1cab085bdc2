"""The ``lm://host:port`` connector: a client of ``lmplug-server`` (protocol: PROTOCOL.md).

A small pool of TCP connections (``connections``) lets parallel reads and writes proceed at
once; each call borrows one connection for one request and its reply. Connections open
lazily, so a server that is down at start is not an error until a call needs it; a
connection that failed, or whose call was cancelled in the middle of a frame, is closed
(it is no longer in a known state) and the next call opens a fresh one. A dead server
answers with *connection refused* at once, which becomes :class:`lmplug.TierUnavailable`.

Sockets are non-blocking stdlib sockets driven through anyio's readiness waits (asyncio
and trio alike): a PUT sends the caller's memoryviews with ``sendmsg`` and a GET receives
straight into the caller's buffers with ``recvmsg_into``; values are never joined or copied.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio

from lmplug import ConfigError, CorruptChunk, TierUnavailable
from lmplug.tierkit import RemoteConnector
from lmplug_remote.lm.options import LmOptions
from lmplug_server import DEFAULT_PORT, TOKEN_ENV, protocol
from lmplug_server.protocol import ERROR_OPCODE, ITEM, ItemStatus, Limits, Op, ProtocolError, Reply
from lmplug_server.sockio import connect, recv_exactly, recv_exactly_into, send_buffers

__all__ = ["LmConnector"]

_MAX_TTL_MS = 0xFFFF_FFFF


class _Connection:
    """One open, authenticated connection and what the server said it accepts."""

    def __init__(self, sock: socket.socket, limits: Limits) -> None:
        self.sock = sock
        self.limits = limits
        self._next_id = 0

    def request_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFF_FFFF
        return self._next_id

    def close(self) -> None:
        self.sock.close()


class LmConnector(RemoteConnector):
    """A pooled client of one ``lmplug-server``; see the module docstring."""

    def __init__(self, url: str, options: LmOptions) -> None:
        parts = urlsplit(url)
        if parts.scheme.lower() != "lm" or not parts.hostname:
            raise ConfigError(f"{url!r}: expected lm://host[:port]")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
            raise ConfigError(f"{url!r}: an lm:// URL is only lm://host[:port] (the token goes in auth_token)")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError as exc:
            raise ConfigError(f"{url!r}: {exc}") from None
        self.url = url
        self.options = options
        self.host = parts.hostname
        self.port = port
        token = options.auth_token if options.auth_token is not None else os.environ.get(TOKEN_ENV)
        self._token = (token or "").encode()
        if len(self._token) > protocol.MAX_TOKEN:
            raise ConfigError(f"{url!r}: auth_token longer than {protocol.MAX_TOKEN} bytes")
        self._idle: list[_Connection] = []
        self._limiter: anyio.CapacityLimiter | None = None
        self._closed = False
        self._opened = self._dropped = self._requests = self._failures = 0
        self._bytes_sent = self._bytes_received = 0

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Lazy: connections open on first use (a server that is down now is not an error)."""
        self._closed = False
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.options.connections)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    async def _open(self) -> _Connection:
        try:
            with anyio.fail_after(self.options.connect_timeout):
                sock = await connect(self.host, self.port)
                try:
                    limits = await self._authenticate(sock)
                except BaseException:
                    sock.close()
                    raise
        except TimeoutError:
            raise TierUnavailable(f"{self.url}: no connection within {self.options.connect_timeout:g} s") from None
        self._opened += 1
        return _Connection(sock, limits)

    async def _authenticate(self, sock: socket.socket) -> Limits:
        await send_buffers(sock, [protocol.encode_auth(1, self._token)])
        header = await _reply_header(sock, Op.AUTH, 1, 0, protocol.LIMITS.size)
        body = bytearray(header.body_length)
        await recv_exactly(sock, memoryview(body))
        return protocol.parse_limits(body)

    @contextlib.asynccontextmanager
    async def _borrow(self, operation: str) -> AsyncIterator[_Connection]:
        """A connection for one request; closed instead of returned if anything interrupts it."""
        if self._closed:
            raise TierUnavailable(f"{self.url}: connector is closed")
        limiter = self._limiter
        if limiter is None:
            limiter = self._limiter = anyio.CapacityLimiter(self.options.connections)
        try:
            limiter.acquire_nowait()  # the usual case; skips the extra event-loop trip of acquire()
        except anyio.WouldBlock:
            await limiter.acquire()
        try:
            with self._translate(operation):
                connection = self._idle.pop() if self._idle else await self._open()
                finished = False
                try:
                    yield connection
                    finished = True
                finally:
                    self._requests += 1
                    if finished and not self._closed:
                        self._idle.append(connection)
                    else:
                        self._dropped += 1
                        connection.close()
        finally:
            limiter.release()

    @contextlib.contextmanager
    def _translate(self, operation: str) -> Iterator[None]:
        try:
            yield
        except ProtocolError as exc:
            self._failures += 1
            raise TierUnavailable(f"{self.url}: {operation}: {exc}") from exc
        except OSError as exc:
            self._failures += 1
            raise TierUnavailable(f"{self.url}: {operation}: {exc.strerror or exc}") from exc

    # ------------------------------------------------------------------ the contract

    def _encode_keys(self, keys: Sequence[str], limits: Limits) -> list[bytes]:
        encoded = [key.encode() for key in keys]
        for key in encoded:
            if not 0 < len(key) <= limits.max_key:
                raise TierUnavailable(f"{self.url}: key of {len(key)} bytes; the server takes 1..{limits.max_key}")
        return encoded

    async def put(self, key: str, parts: Sequence[memoryview], ttl: float | None) -> None:
        await self.put_many([(key, parts)], ttl)

    async def put_many(self, entries: Sequence[tuple[str, Sequence[memoryview]]], ttl: float | None) -> None:
        """Store several values, as many per frame as the server's limits allow (each replaces its key atomically)."""
        if not entries:
            return
        ttl_ms = 0 if ttl is None else min(_MAX_TTL_MS, max(1, math.ceil(ttl * 1000)))
        async with self._borrow("put") as connection:
            limits = connection.limits
            keys = self._encode_keys([key for key, _ in entries], limits)
            views = [[memoryview(part).cast("B") for part in parts] for _, parts in entries]
            sizes = [sum(len(view) for view in value) for value in views]
            for size in sizes:
                if size > limits.max_value:
                    raise TierUnavailable(f"{self.url}: value of {size} bytes exceeds max_value {limits.max_value}")
            sock = connection.sock
            for first, end in _frames(keys, sizes, limits):
                body = sum(
                    ITEM.size + len(key) + size for key, size in zip(keys[first:end], sizes[first:end], strict=True)
                )
                if body > limits.max_frame:
                    raise TierUnavailable(f"{self.url}: a value of {sizes[first]} bytes exceeds max_frame")
                request_id = connection.request_id()
                batch = keys[first:end]
                request = protocol.encode_keyed_request(
                    Op.PUT, request_id, batch, [ttl_ms] * len(batch), sizes[first:end]
                )
                values = [view for value in views[first:end] for view in value]
                self._bytes_sent += await send_buffers(sock, [request, *values])
                replies = await _reply_items(sock, Op.PUT, request_id, len(batch), len(batch) * ITEM.size)
                for (name, _), reply in zip(entries[first:end], replies, strict=True):
                    if reply.status is ItemStatus.NO_SPACE:
                        raise TierUnavailable(
                            f"{self.url}: {name}: the value is larger than the server's whole capacity"
                        )
                    if reply.status is not ItemStatus.OK:
                        raise TierUnavailable(f"{self.url}: {name}: server refused the value ({reply.status.name})")

    async def get_into(self, key: str, parts: Sequence[memoryview]) -> int | None:
        (length,) = await self.get_many_into([(key, parts)])
        return length

    async def get_many_into(self, entries: Sequence[tuple[str, Sequence[memoryview]]]) -> list[int | None]:
        """Read several values in one frame, each into its own parts; lengths (``None``: miss)."""
        if not entries:
            return []
        targets = [[memoryview(part).cast("B") for part in parts] for _, parts in entries]
        room = [sum(len(view) for view in views) for views in targets]
        too_large: list[tuple[str, int, int]] = []
        lengths: list[int | None] = []
        async with self._borrow("get") as connection:
            keys = self._encode_keys([key for key, _ in entries], connection.limits)
            request_id = connection.request_id()
            sock = connection.sock
            await send_buffers(sock, [protocol.encode_keyed_request(Op.GET, request_id, keys, (), room)])
            count = len(keys)
            header = await _reply_header(sock, Op.GET, request_id, count, count * ITEM.size + sum(room))
            table = bytearray(count * ITEM.size)
            await recv_exactly(sock, memoryview(table))
            replies = protocol.parse_reply_items(table, count)
            into: list[memoryview] = []
            for (key, _), reply, views, space in zip(entries, replies, targets, room, strict=True):
                if reply.status is ItemStatus.OK:
                    if reply.length > space:
                        raise ProtocolError(protocol.ErrorCode.MALFORMED, f"{reply.length} bytes sent for {space}")
                    into += _prefix(views, reply.length)
                    lengths.append(reply.length)
                elif reply.status is ItemStatus.TOO_LARGE:
                    too_large.append((key, reply.length, space))
                    lengths.append(None)
                elif reply.status is ItemStatus.NOT_FOUND:
                    lengths.append(None)
                else:
                    raise ProtocolError(protocol.ErrorCode.MALFORMED, f"GET item status {reply.status.name}")
            moved = sum(length or 0 for length in lengths)
            if header.body_length != len(table) + moved:
                raise ProtocolError(protocol.ErrorCode.MALFORMED, "GET reply length disagrees with its items")
            await recv_exactly_into(sock, into)
            self._bytes_received += moved
        if too_large:
            key, length, space = too_large[0]
            raise CorruptChunk(f"{self.url}: {key} holds {length} bytes, more than the {space} expected")
        return lengths

    async def exists(self, keys: Sequence[str]) -> list[bool]:
        replies = await self._keyed(Op.EXISTS, "exists", keys)
        return [reply.status is ItemStatus.OK for reply in replies]

    async def delete(self, keys: Sequence[str]) -> int:
        replies = await self._keyed(Op.DELETE, "delete", keys)
        return sum(reply.status is ItemStatus.OK for reply in replies)

    async def _keyed(self, op: Op, operation: str, keys: Sequence[str]) -> list[Reply]:
        replies: list[Reply] = []
        if not keys:
            return replies
        async with self._borrow(operation) as connection:
            encoded = self._encode_keys(keys, connection.limits)
            step = connection.limits.max_keys
            for start in range(0, len(encoded), step):
                batch = encoded[start : start + step]
                request_id = connection.request_id()
                await send_buffers(connection.sock, [protocol.encode_keyed_request(op, request_id, batch)])
                replies += await _reply_items(connection.sock, op, request_id, len(batch), len(batch) * ITEM.size)
        return replies

    async def health(self) -> None:
        await self._body_request(Op.HEALTH, "health", 0)

    async def server_statistics(self) -> dict[str, Any]:
        """The server's STATS reply: its counters, capacity and limits."""
        body = await self._body_request(Op.STATS, "stats", protocol.MAX_STATS_BODY)
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON ("[[[[...")
            raise TierUnavailable(f"{self.url}: stats: unreadable reply ({type(exc).__name__}: {exc})") from None
        if not isinstance(answer, dict):
            raise TierUnavailable(f"{self.url}: stats: reply is not an object")
        return answer

    async def _body_request(self, op: Op, operation: str, max_body: int) -> bytes:
        async with self._borrow(operation) as connection:
            request_id = connection.request_id()
            await send_buffers(connection.sock, [protocol.encode_simple(op, request_id)])
            header = await _reply_header(connection.sock, op, request_id, 0, max_body)
            body = bytearray(header.body_length)
            await recv_exactly(connection.sock, memoryview(body))
        return bytes(body)

    def statistics(self) -> dict[str, float]:
        return {
            "connections_opened": self._opened,
            "connections_dropped": self._dropped,
            "connections_idle": len(self._idle),
            "requests": self._requests,
            "failures": self._failures,
            "bytes_sent": self._bytes_sent,
            "bytes_received": self._bytes_received,
        }


def _frames(keys: Sequence[bytes], sizes: Sequence[int], limits: Limits) -> Iterator[tuple[int, int]]:
    """``(first, end)`` ranges of entries, each as many as one PUT frame may carry (at least one)."""
    first = 0
    body = 0
    for index, (key, size) in enumerate(zip(keys, sizes, strict=True)):
        item = ITEM.size + len(key) + size
        if index > first and (body + item > limits.max_frame or index - first >= limits.max_keys):
            yield first, index
            first, body = index, 0
        body += item
    yield first, len(keys)


def _prefix(views: Sequence[memoryview], length: int) -> list[memoryview]:
    """The views that hold the first ``length`` bytes, the last one cut short."""
    out: list[memoryview] = []
    for view in views:
        if length <= 0:
            break
        take = min(len(view), length)
        out.append(view[:take])
        length -= take
    return out


async def _reply_header(sock: socket.socket, op: Op, request_id: int, count: int, max_body: int) -> protocol.Header:
    """The reply's header; an ERROR reply is read and raised as :class:`ProtocolError`."""
    data = bytearray(protocol.HEADER.size)
    await recv_exactly(sock, memoryview(data))
    header = protocol.parse_reply_header(data, op, request_id, count, max_body)
    if header.opcode == ERROR_OPCODE:
        body = bytearray(header.body_length)
        await recv_exactly(sock, memoryview(body))
        raise protocol.parse_error_body(body)
    return header


async def _reply_items(sock: socket.socket, op: Op, request_id: int, count: int, max_body: int) -> list[Reply]:
    header = await _reply_header(sock, op, request_id, count, max_body)
    if header.body_length != count * ITEM.size:
        raise ProtocolError(protocol.ErrorCode.MALFORMED, f"{op.name} reply body of {header.body_length} bytes")
    table = bytearray(header.body_length)
    await recv_exactly(sock, memoryview(table))
    return protocol.parse_reply_items(table, count)
