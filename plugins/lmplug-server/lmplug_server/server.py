"""``lmplug-server``: lmplug's own shared KV store, spoken to over ``lm://`` (see PROTOCOL.md).

One process serves many engines: a memory store with a byte capacity and LRU eviction,
optionally spilling evicted values to a disk directory (:mod:`lmplug_remote.server_store`),
an optional shared auth token, Prometheus metrics on an optional loopback HTTP port, and a
graceful stop on SIGTERM/SIGINT (stop accepting, finish the requests in flight, close).

It runs on anyio (asyncio or trio). Each connection is one task that reads a request,
answers it and reads the next; values travel between sockets and stored buffers through
``recv_into``/``sendmsg`` without copies. A frame that breaks the protocol gets an ERROR
reply and its connection is closed; no other connection notices.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import SocketStream, TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmplug_remote import protocol
from lmplug_remote.protocol import ErrorCode, Header, ItemStatus, Limits, Op, ProtocolError
from lmplug_remote.server_store import DiskStore, KVStore

__all__ = ["LmServer", "ServerConfig", "add_arguments", "config_from_arguments", "main", "run_from_arguments"]

logger = logging.getLogger("lmplug.server")
TOKEN_ENV = "LMPLUG_SERVER_TOKEN"
_SCRATCH = 1 << 20
_MAX_HTTP_REQUEST = 8192
_DRAIN_LIMIT = 4 << 20


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything ``lmplug-server`` is told on its command line."""

    host: str = "127.0.0.1"
    port: int = 9400
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


class _Collector(Collector):
    """Reads the server's counters at scrape time."""

    def __init__(self, server: LmServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server, store = self.server, self.server.store
        requests = CounterMetricFamily("lmplug_server_requests", "Requests answered, by opcode.", labels=["op"])
        for op, count in sorted(server.requests.items()):
            requests.add_metric([op], count)
        yield requests
        keys = CounterMetricFamily("lmplug_server_keys", "Keys named in requests, by opcode.", labels=["op"])
        for op, count in sorted(server.keys.items()):
            keys.add_metric([op], count)
        yield keys
        errors = CounterMetricFamily("lmplug_server_errors", "Error replies and broken connections.", labels=["code"])
        for code, count in sorted(server.errors.items()):
            errors.add_metric([code], count)
        yield errors
        moved = CounterMetricFamily("lmplug_server_bytes", "Value bytes moved.", labels=["direction"])
        moved.add_metric(["in"], server.bytes_in)
        moved.add_metric(["out"], server.bytes_out)
        yield moved
        if store is None:
            return
        counters = store.counters
        yield CounterMetricFamily("lmplug_server_hits", "GET keys found.", value=counters.hits)
        yield CounterMetricFamily("lmplug_server_disk_hits", "GET keys found on disk.", value=counters.disk_hits)
        yield CounterMetricFamily("lmplug_server_misses", "GET keys not found.", value=counters.misses)
        yield CounterMetricFamily("lmplug_server_evictions", "Values evicted from memory.", value=counters.evictions)
        yield CounterMetricFamily("lmplug_server_spills", "Evicted values written to disk.", value=counters.spilled)
        yield CounterMetricFamily("lmplug_server_refused", "PUT values refused for space.", value=counters.refused)
        yield CounterMetricFamily("lmplug_server_disk_errors", "Disk store I/O errors.", value=counters.disk_errors)
        yield CounterMetricFamily("lmplug_server_connections", "Connections accepted.", value=server.connections)
        yield GaugeMetricFamily("lmplug_server_open_connections", "Connections open.", value=server.open_connections)
        yield GaugeMetricFamily("lmplug_server_memory_used_bytes", "Bytes of values in memory.", value=store.used)
        yield GaugeMetricFamily("lmplug_server_memory_capacity_bytes", "Memory capacity.", value=store.capacity)
        yield GaugeMetricFamily("lmplug_server_memory_items", "Values in memory.", value=len(store))
        if store.disk is not None:
            yield GaugeMetricFamily("lmplug_server_disk_used_bytes", "Bytes of spill files.", value=store.disk.used)
            yield GaugeMetricFamily("lmplug_server_disk_items", "Values on disk.", value=len(store.disk))


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
        self.connections = self.open_connections = 0
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))
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
                        self.metrics_address = await group.start(self._serve_metrics, config.metrics_port)
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
                logger.warning("lmplug-server: accept failed: %s", exc)
                await anyio.sleep(0.1)
                continue
            connection.setblocking(False)  # noqa: FBT003
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            group.start_soon(self._connection, connection)

    # ------------------------------------------------------------------ one connection

    async def _connection(self, sock: socket.socket) -> None:
        self.connections += 1
        self.open_connections += 1
        header_buffer = bytearray(protocol.HEADER.size)
        connection = _Connection(sock, authenticated=self.config.auth_token is None)
        try:
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
                    await protocol.recv_exactly(sock, memoryview(header_buffer)[first:])
                    header = protocol.parse_request_header(header_buffer, self.config.limits)
                    connection.request_id = header.request_id
                    await self._request(connection, header)
        except ProtocolError as exc:
            await self._refuse(connection, exc)
        except TimeoutError:
            await self._refuse(connection, ProtocolError(ErrorCode.TIMEOUT, "request took too long"))
        except OSError as exc:
            self.errors["connection"] += 1
            logger.debug("lmplug-server: connection failed: %s", exc)
        finally:
            self.open_connections -= 1
            sock.close()
            if self._stopping and not self.open_connections and self._drained is not None:
                self._drained.set()

    async def _refuse(self, connection: _Connection, error: ProtocolError) -> None:
        """Tell the peer why (best effort), then the caller closes the connection."""
        self.errors[error.code.name.lower()] += 1
        if error.code is ErrorCode.TRUNCATED:
            logger.debug("lmplug-server: %s", error)
            return  # the peer is gone
        logger.info("lmplug-server: closing a connection: %s", error)
        reply = protocol.encode_error(error.code, error.detail, connection.request_id)
        with anyio.move_on_after(1.0), contextlib.suppress(OSError):
            await protocol.send_buffers(connection.sock, [reply])
            # Closing with unread input would reset the connection and could destroy the reply
            # before the peer reads it: say goodbye first, then drain briefly until the peer closes.
            connection.sock.shutdown(socket.SHUT_WR)
            await protocol.drain_until_closed(connection.sock, connection.scratch(), _DRAIN_LIMIT)

    async def _request(self, connection: _Connection, header: Header) -> None:
        op = Op(header.opcode)
        sock = connection.sock
        if op is Op.AUTH:
            token = bytearray(header.body_length)
            await protocol.recv_exactly(sock, memoryview(token))
            expected = self.config.auth_token
            if expected is not None and not hmac.compare_digest(bytes(token), expected):
                raise ProtocolError(ErrorCode.AUTH_FAILED, "wrong auth token")
            connection.authenticated = True
            body = protocol.encode_limits(self.config.limits)
            await protocol.send_buffers(sock, [protocol.encode_body_reply(op, header.request_id, body)])
        elif not connection.authenticated:
            raise ProtocolError(ErrorCode.AUTH_REQUIRED, f"{op.name} before AUTH; this server needs a token")
        elif op is Op.HEALTH:
            await protocol.send_buffers(sock, [protocol.encode_body_reply(op, header.request_id, b"")])
        elif op is Op.STATS:
            body = json.dumps(self.statistics(), sort_keys=True).encode()
            await protocol.send_buffers(sock, [protocol.encode_body_reply(op, header.request_id, body)])
        else:
            await self._keyed(connection, op, header)
        self.requests[op.name] += 1

    async def _keyed(self, connection: _Connection, op: Op, header: Header) -> None:
        sock, limits, store = connection.sock, self.config.limits, self.store
        assert store is not None
        items = bytearray(header.count * protocol.ITEM.size)
        await protocol.recv_exactly(sock, memoryview(items))
        table = protocol.parse_items(header, items, limits)
        blob = bytearray(table.keys_length)
        await protocol.recv_exactly(sock, memoryview(blob))
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
        await protocol.send_buffers(sock, [reply, *values])
        self.bytes_out += moved

    async def _put_one(self, connection: _Connection, key: bytes, size: int, ttl_ms: int) -> ItemStatus:
        store = self.store
        assert store is not None
        if size > self.config.limits.max_value:
            await protocol.skip_bytes(connection.sock, size, connection.scratch())
            return ItemStatus.TOO_LARGE
        if not await store.reserve(size):
            await protocol.skip_bytes(connection.sock, size, connection.scratch())
            return ItemStatus.NO_SPACE
        value = store.buffer(size)
        try:
            await protocol.recv_exactly(connection.sock, memoryview(value))
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
            "connections": {"accepted": self.connections, "open": self.open_connections},
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

    async def _serve_metrics(self, port: int, *, task_status: TaskStatus[tuple[str, int]]) -> None:
        """A minimal HTTP endpoint on loopback: ``GET /metrics`` (Prometheus text) and ``GET /health``."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        async with listener:
            sockname = listener.extra(anyio.abc.SocketAttribute.local_address)
            task_status.started((str(sockname[0]), int(sockname[1])))
            await listener.serve(self._metrics_request)

    async def _metrics_request(self, stream: SocketStream) -> None:
        async with stream:
            request = b""
            with anyio.move_on_after(5.0):
                while b"\r\n\r\n" not in request and len(request) < _MAX_HTTP_REQUEST:
                    try:
                        request += await stream.receive(_MAX_HTTP_REQUEST)
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
            line = request.split(b"\r\n", 1)[0].split()
            path = line[1].split(b"?", 1)[0] if len(line) >= 2 and line[0] == b"GET" else b""
            kind = "text/plain; charset=utf-8"
            if path == b"/metrics":
                status, kind, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
            elif path == b"/health":
                status, body = ("503 Service Unavailable", b"stopping\n") if self._stopping else ("200 OK", b"ok\n")
            else:
                status, body = "404 Not Found", b"not found\n"
            head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await stream.send(head.encode() + b"Connection: close\r\n\r\n" + body)


@dataclass(slots=True)
class _Connection:
    sock: socket.socket
    authenticated: bool
    request_id: int = 0
    _scratch: memoryview | None = None

    def scratch(self) -> memoryview:
        """A buffer to drain refused values through."""
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_SCRATCH))
        return self._scratch


# ---------------------------------------------------------------------------- command line


def _size(text: str) -> int:
    from lmplug import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lmplug-server`` and ``lmplug server``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9400, help="TCP port (default 9400; 0 picks a free one)")
    parser.add_argument("--capacity", type=_size, default="4GiB", help="memory for values, e.g. 4GiB (default)")
    parser.add_argument("--disk-path", type=Path, default=None, help="directory evicted values spill to (off)")
    parser.add_argument("--disk-capacity", type=_size, default="64GiB", help="bytes of spill files (default 64GiB)")
    parser.add_argument(
        "--auth-token", default=None, help=f"clients must send this token (default: ${TOKEN_ENV}; none if unset)"
    )
    parser.add_argument("--max-value", type=_size, default="256MiB", help="longest value accepted (default 256MiB)")
    parser.add_argument("--max-frame", type=_size, default="1GiB", help="longest request body (default 1GiB)")
    parser.add_argument("--max-keys", type=int, default=4096, help="most keys in one request (default 4096)")
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on 127.0.0.1:PORT (off)"
    )
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds one request may take (60)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def config_from_arguments(args: argparse.Namespace) -> ServerConfig:
    token = args.auth_token if args.auth_token is not None else os.environ.get(TOKEN_ENV) or None
    if args.max_value > args.max_frame:
        raise ValueError(f"--max-value {args.max_value} exceeds --max-frame {args.max_frame}")
    return ServerConfig(
        host=args.host,
        port=args.port,
        capacity=args.capacity,
        disk_path=args.disk_path,
        disk_capacity=args.disk_capacity,
        auth_token=None if token is None else token.encode(),
        limits=Limits(max_value=args.max_value, max_frame=args.max_frame, max_keys=args.max_keys),
        metrics_port=args.metrics_port,
        request_timeout=args.request_timeout,
    )


async def serve_until_signalled(config: ServerConfig) -> None:
    """Run a server until SIGTERM or SIGINT (a second one stops it at once)."""
    server = LmServer(config)
    async with anyio.create_task_group() as group:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    logger.info("lmplug-server: %s, stopping", signal.Signals(signum).name)
                    server.shutdown()

        async def run(*, task_status: TaskStatus[tuple[str, int]]) -> None:
            await server.serve(task_status=task_status)
            group.cancel_scope.cancel()  # stopped: the signal watcher is done too

        group.start_soon(watch_signals)
        host, port = await group.start(run)
        metrics = "" if server.metrics_address is None else f", metrics on http://127.0.0.1:{server.metrics_address[1]}"
        capacity = f"{config.capacity / 2**30:.2f} GiB memory"
        if config.disk_path is not None:
            capacity += f", {config.disk_capacity / 2**30:.2f} GiB disk at {config.disk_path}"
        auth = "token required" if config.auth_token else "no auth"
        print(f"lmplug-server ready on lm://{host}:{port} ({capacity}; {auth}{metrics})", flush=True)


def run_from_arguments(args: argparse.Namespace) -> int:
    """Run the server the parsed arguments describe; the exit status."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_arguments(args)
    except ValueError as exc:
        print(f"lmplug-server: {exc}", file=sys.stderr)
        return 2
    backend = os.environ.get("LMPLUG_SERVER_BACKEND", "asyncio")
    try:
        anyio.run(serve_until_signalled, config, backend=backend)
    except OSError as exc:
        print(f"lmplug-server: cannot serve on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lmplug-server`` console script."""
    parser = argparse.ArgumentParser(prog="lmplug-server", description="lmplug's shared KV store (lm:// URLs)")
    add_arguments(parser)
    return run_from_arguments(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
