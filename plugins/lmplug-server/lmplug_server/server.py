"""``lmplug-server``: lmplug's own shared KV store, spoken to over ``lm://`` (see PROTOCOL.md).

One process serves many engines: a memory store with a byte capacity and LRU eviction,
optionally spilling evicted values to a disk directory (:mod:`lmplug_server.store`),
an optional shared auth token, Prometheus metrics on an optional loopback HTTP port, and a
graceful stop on SIGTERM/SIGINT (stop accepting, finish the requests in flight, close).

It runs on anyio (asyncio or trio). Each connection is one task that reads a request,
answers it and reads the next; values travel between sockets and stored buffers through
``recv_into``/``sendmsg`` without copies. A frame that breaks the protocol gets an ERROR
reply and its connection is closed; no other connection notices.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry

from lmplug_server import DEFAULT_PORT, protocol
from lmplug_server.metrics import ServerCollector, serve_metrics
from lmplug_server.protocol import ErrorCode, Header, ItemStatus, Limits, Op, ProtocolError
from lmplug_server.sockio import drain_until_closed, recv_exactly, send_buffers, skip_bytes
from lmplug_server.store import DiskStore, KVStore
from lmplug_server.throttle import ThrottledLog

__all__ = ["LmServer", "ServerConfig"]

logger = logging.getLogger("lmplug.server")
_SCRATCH = 1 << 20
_DRAIN_LIMIT = 4 << 20


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything ``lmplug-server`` is told on its command line."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    capacity: int = 4 << 30
    disk_path: Path | None = None
    disk_capacity: int = 64 << 30
    auth_token: bytes | None = None
    limits: Limits = field(default_factory=Limits)
    metrics_port: int | None = None
    request_timeout: float = 60.0
    """Longest time one request may take once its first byte arrived (slow or stalled peers)."""
    grace: float = 10.0
    """How long a graceful stop waits for requests in flight before cutting them off."""
    auth_deadline: float = 5.0
    """With a token: seconds a connection may stay open before it authenticates."""
    max_unauthenticated: int = 256
    """With a token: connections waiting for their AUTH at once; more are refused on arrival."""
    log_every: float = 10.0
    """Bad clients are logged once per kind of trouble per this many seconds (the rest at DEBUG)."""

    def __post_init__(self) -> None:
        if not self.auth_deadline > 0:
            raise ValueError(f"auth_deadline must be positive, not {self.auth_deadline}")
        if self.max_unauthenticated < 1:
            raise ValueError(f"max_unauthenticated must be at least 1, not {self.max_unauthenticated}")


class LmServer:
    """The server; ``await server.serve()`` runs it until :meth:`shutdown` (or cancellation)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.store: KVStore | None = None
        self.address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.requests: Counter[str] = Counter()
        self.keys: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.bytes_in = self.bytes_out = 0
        self.connections = self.open_connections = self.unauthenticated = 0
        self._bad_clients = ThrottledLog(logger, config.log_every)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(ServerCollector(self))
        self._stopping = False
        self._accepting: anyio.CancelScope | None = None
        self._idle: set[anyio.CancelScope] = set()
        self._all: anyio.CancelScope | None = None
        self._drained: anyio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    async def serve(self, *, task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen, serve, and return after a graceful :meth:`shutdown`; ``task_status`` gets the address."""
        config = self.config
        disk = None
        if config.disk_path is not None:
            disk = await anyio.to_thread.run_sync(DiskStore, config.disk_path, config.disk_capacity)
        self.store = KVStore(config.capacity, disk)
        self._drained = anyio.Event()
        listener = socket.create_server((config.host, config.port), backlog=1024)
        listener.setblocking(False)  # noqa: FBT003
        try:
            host, port = listener.getsockname()[:2]
            self.address = (host, port)
            with anyio.CancelScope() as everything:
                self._all = everything
                async with anyio.create_task_group() as group:
                    if config.metrics_port is not None:
                        self.metrics_address = await group.start(
                            serve_metrics, config.metrics_port, self.registry, lambda: not self._stopping
                        )
                    with anyio.CancelScope() as accepting:
                        self._accepting = accepting
                        if self._stopping:
                            accepting.cancel()
                        task_status.started(self.address)
                        await self._accept(listener, group)
                    listener.close()
                    logger.info("lmplug-server: stopped accepting; finishing %d connections", self.open_connections)
                    if self.open_connections:
                        with anyio.move_on_after(config.grace):
                            await self._drained.wait()
                    group.cancel_scope.cancel()
        finally:
            listener.close()
            self.store.close()
        logger.info("lmplug-server: stopped")

    def shutdown(self) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace`` s), close idle connections."""
        if self._stopping:
            if self._all is not None:
                self._all.cancel()  # asked twice: stop now
            return
        self._stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
        for scope in self._idle:
            scope.cancel()

    async def _accept(self, listener: socket.socket, group: anyio.abc.TaskGroup) -> None:
        while True:
            await anyio.wait_readable(listener)
            try:
                connection, _ = listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:  # out of file descriptors and the like: back off, keep serving
                self._bad_clients.report("accept", "lmplug-server: accept failed: %s", exc)
                await anyio.sleep(0.1)
                continue
            connection.setblocking(False)  # noqa: FBT003
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            group.start_soon(self._connection, connection)

    # ------------------------------------------------------------------ one connection

    async def _connection(self, sock: socket.socket) -> None:
        self.connections += 1
        self.open_connections += 1
        connection = _Connection(sock, authenticated=self.config.auth_token is None)
        try:
            if not connection.authenticated:
                if self.unauthenticated >= self.config.max_unauthenticated:
                    self._turn_away(connection)
                    return
                self.unauthenticated += 1
                connection.waiting_for_auth = True
            deadline = math.inf if connection.authenticated else anyio.current_time() + self.config.auth_deadline
            with anyio.CancelScope(deadline=deadline) as connection.auth_scope:
                await self._serve_requests(connection)
            if connection.auth_scope.cancelled_caught:
                raise ProtocolError(ErrorCode.TIMEOUT, f"no AUTH within {self.config.auth_deadline:g} s")
        except ProtocolError as exc:
            await self._refuse(connection, exc)
        except TimeoutError:
            await self._refuse(connection, ProtocolError(ErrorCode.TIMEOUT, "request took too long"))
        except OSError as exc:
            self.errors["connection"] += 1
            logger.debug("lmplug-server: connection failed: %s", exc)
        finally:
            self._stop_waiting_for_auth(connection)
            self.open_connections -= 1
            sock.close()
            if self._stopping and not self.open_connections and self._drained is not None:
                self._drained.set()

    def _turn_away(self, connection: _Connection) -> None:
        """Refuse a connection at once: too many others are still to authenticate (a flood, or a slowloris)."""
        error = ProtocolError(ErrorCode.AUTH_REQUIRED, "too many connections waiting for AUTH; try again later")
        self.errors["unauthenticated_limit"] += 1
        self._bad_clients.report("unauthenticated_limit", "lmplug-server: refusing a connection: %s", error)
        with contextlib.suppress(OSError):  # best effort: the reply is small, the send buffer empty
            connection.sock.send(protocol.encode_error(error.code, error.detail))

    def _authenticated(self, connection: _Connection) -> None:
        connection.authenticated = True
        self._stop_waiting_for_auth(connection)
        if connection.auth_scope is not None:
            connection.auth_scope.deadline = math.inf

    def _stop_waiting_for_auth(self, connection: _Connection) -> None:
        """Give back the connection's place among those waiting for AUTH (authenticated, or on its way out)."""
        if connection.waiting_for_auth:
            connection.waiting_for_auth = False
            self.unauthenticated -= 1

    async def _serve_requests(self, connection: _Connection) -> None:
        """Read a request, answer it, read the next, until the peer leaves or the server stops."""
        sock = connection.sock
        header_buffer = bytearray(protocol.HEADER.size)
        while not self._stopping:
            with anyio.CancelScope() as idle:
                self._idle.add(idle)
                try:
                    await anyio.wait_readable(sock)
                finally:
                    self._idle.discard(idle)
            if idle.cancelled_caught:
                break
            try:
                first = sock.recv_into(header_buffer)
            except BlockingIOError:
                continue
            if not first:
                break  # closed between requests: a clean goodbye
            with anyio.fail_after(self.config.request_timeout):
                await recv_exactly(sock, memoryview(header_buffer)[first:])
                header = protocol.parse_request_header(header_buffer, self.config.limits)
                connection.request_id = header.request_id
                await self._request(connection, header)

    async def _refuse(self, connection: _Connection, error: ProtocolError) -> None:
        """Tell the peer why (best effort), then the caller closes the connection."""
        self._stop_waiting_for_auth(connection)  # its goodbye may take a while: make room for others
        self.errors[error.code.name.lower()] += 1
        if error.code is ErrorCode.TRUNCATED:
            logger.debug("lmplug-server: %s", error)
            return  # the peer is gone
        self._bad_clients.report(error.code.name, "lmplug-server: closing a connection: %s", error)
        reply = protocol.encode_error(error.code, error.detail, connection.request_id)
        with anyio.move_on_after(1.0), contextlib.suppress(OSError):
            await send_buffers(connection.sock, [reply])
            # Closing with unread input would reset the connection and could destroy the reply
            # before the peer reads it: say goodbye first, then drain briefly until the peer closes.
            connection.sock.shutdown(socket.SHUT_WR)
            await drain_until_closed(connection.sock, connection.scratch(), _DRAIN_LIMIT)

    async def _request(self, connection: _Connection, header: Header) -> None:
        op = Op(header.opcode)
        sock = connection.sock
        if op is Op.AUTH:
            token = bytearray(header.body_length)
            await recv_exactly(sock, memoryview(token))
            expected = self.config.auth_token
            if expected is not None and not hmac.compare_digest(bytes(token), expected):
                raise ProtocolError(ErrorCode.AUTH_FAILED, "wrong auth token")
            self._authenticated(connection)
            body = protocol.encode_limits(self.config.limits)
            await send_buffers(sock, [protocol.encode_body_reply(op, header.request_id, body)])
        elif not connection.authenticated:
            raise ProtocolError(ErrorCode.AUTH_REQUIRED, f"{op.name} before AUTH; this server needs a token")
        elif op is Op.HEALTH:
            await send_buffers(sock, [protocol.encode_body_reply(op, header.request_id, b"")])
        elif op is Op.STATS:
            body = json.dumps(self.statistics(), sort_keys=True).encode()
            await send_buffers(sock, [protocol.encode_body_reply(op, header.request_id, body)])
        else:
            await self._keyed(connection, op, header)
        self.requests[op.name] += 1

    async def _keyed(self, connection: _Connection, op: Op, header: Header) -> None:
        sock, limits, store = connection.sock, self.config.limits, self.store
        assert store is not None
        items = bytearray(header.count * protocol.ITEM.size)
        await recv_exactly(sock, memoryview(items))
        table = protocol.parse_items(header, items, limits)
        blob = bytearray(table.keys_length)
        await recv_exactly(sock, memoryview(blob))
        keys = protocol.split_keys(table, blob)
        self.keys[op.name] += len(keys)
        replies: list[tuple[int, int]] = []
        values: list[bytearray | bytes] = []
        if op is Op.GET:
            for key, item in zip(keys, table.items, strict=True):
                value = await store.get(key)
                if value is None:
                    replies.append((ItemStatus.NOT_FOUND, 0))
                elif len(value) > item.arg64:
                    replies.append((ItemStatus.TOO_LARGE, len(value)))
                else:
                    replies.append((ItemStatus.OK, len(value)))
                    values.append(value)
        elif op is Op.EXISTS:
            replies = [(ItemStatus.OK if there else ItemStatus.NOT_FOUND, 0) for there in store.exists(keys)]
        elif op is Op.DELETE:
            removed = await store.delete(keys)
            replies = [(ItemStatus.OK if gone else ItemStatus.NOT_FOUND, 0) for gone in removed]
        else:
            for key, item in zip(keys, table.items, strict=True):
                replies.append((await self._put_one(connection, key, item.arg64, item.arg32), 0))
        moved = sum(len(value) for value in values)
        reply = protocol.encode_reply(op, header.request_id, replies, moved)
        await send_buffers(sock, [reply, *values])
        self.bytes_out += moved

    async def _put_one(self, connection: _Connection, key: bytes, size: int, ttl_ms: int) -> ItemStatus:
        store = self.store
        assert store is not None
        if size > self.config.limits.max_value:
            await skip_bytes(connection.sock, size, connection.scratch())
            return ItemStatus.TOO_LARGE
        if not await store.reserve(size):
            await skip_bytes(connection.sock, size, connection.scratch())
            return ItemStatus.NO_SPACE
        value = store.buffer(size)
        try:
            await recv_exactly(connection.sock, memoryview(value))
        except BaseException:
            store.release(size, value)
            raise
        await store.commit(key, value, ttl_ms / 1000 if ttl_ms else None, size)
        self.bytes_in += size
        return ItemStatus.OK

    # ------------------------------------------------------------------ reporting

    def statistics(self) -> dict[str, object]:
        """What STATS answers (and the metrics say)."""
        store = self.store
        assert store is not None
        limits = self.config.limits
        counters = store.counters
        return {
            "version": protocol.VERSION,
            "limits": {
                "max_key": limits.max_key,
                "max_keys": limits.max_keys,
                "max_value": limits.max_value,
                "max_frame": limits.max_frame,
            },
            "memory": {
                "capacity": store.capacity,
                "used": store.used,
                "reserved": store.reserved,
                "free": store.free,
                "items": len(store),
            },
            "disk": None
            if store.disk is None
            else {"capacity": store.disk.capacity, "used": store.disk.used, "items": len(store.disk)},
            "connections": {
                "accepted": self.connections,
                "open": self.open_connections,
                "unauthenticated": self.unauthenticated,
            },
            "requests": dict(self.requests),
            "keys": dict(self.keys),
            "errors": dict(self.errors),
            "bytes": {"in": self.bytes_in, "out": self.bytes_out},
            "hits": counters.hits,
            "disk_hits": counters.disk_hits,
            "misses": counters.misses,
            "evictions": counters.evictions,
            "spilled": counters.spilled,
            "expired": counters.expired,
            "refused": counters.refused,
            "reused_buffers": counters.reused,
            "disk_errors": counters.disk_errors,
        }


@dataclass(slots=True)
class _Connection:
    sock: socket.socket
    authenticated: bool
    request_id: int = 0
    waiting_for_auth: bool = False
    """Counted in :attr:`LmServer.unauthenticated`."""
    auth_scope: anyio.CancelScope | None = None
    """Closes the connection at the AUTH deadline; lifted once it authenticates."""
    _scratch: memoryview | None = None

    def scratch(self) -> memoryview:
        """A buffer to drain refused values through."""
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_SCRATCH))
        return self._scratch
