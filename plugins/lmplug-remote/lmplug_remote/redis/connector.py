"""The redis connectors: redis-py's sync client in worker threads.

One chunk is one string value: the tier's parts (header, payload) go out as one ``SET``
(with ``PX`` for a ttl), so a reader sees the old value, the new one or nothing, never half
of one. The sync client in worker threads is as fast as ``redis.asyncio`` or faster under
both asyncio and trio (which would reach ``redis.asyncio`` only through a loop thread), its
cluster client is the mature one, and its calls can be cancelled safely
(:mod:`~lmplug_remote.redis.calls`). Values go out through a zero-copy packer
(:mod:`~lmplug_remote.redis.resp`); reads skip redis-py's parser: ``GET`` goes out on a
pooled connection and the connector reads the reply itself, the value ``recv_into`` the
caller's parts. A cluster read goes to the node the slot table names; a redirect or a failing
node hands it to the cluster client (bytes, one copy). Measurements: the README.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from lmplug import CorruptChunk, TierUnavailable
from lmplug.tierkit import RemoteConnector
from lmplug_remote.redis.calls import Abandoned, Call, Connection, SSLConnection, current
from lmplug_remote.redis.options import RedisOptions
from lmplug_remote.redis.resp import Concat
from lmplug_remote.redis.url import Target, netloc

__all__ = ["RedisConnector"]

T = TypeVar("T")
Client = redis.Redis | RedisCluster

_LINE = 16 * 1024
"""The first read of a GET reply: its line, and the start of the value that came with it."""


class RedisConnector(RemoteConnector):
    """A Redis server or Redis Cluster, through redis-py's sync client in worker threads."""

    def __init__(self, url: str, options: RedisOptions) -> None:
        self.url = url
        self.options = options
        self.target = Target(url, options)
        self._limiter = anyio.CapacityLimiter(options.max_connections)
        self._client: Client | None = None
        self._client_lock = threading.Lock()
        self._live: set[Call] = set()
        self._idle = threading.Condition()
        self._closed = False
        self._counters = {"calls": 0.0, "failures": 0.0, "bytes_written": 0.0, "bytes_read": 0.0, "cancelled": 0.0}

    # ------------------------------------------------------------------ client (built in a worker thread)

    def _connection_kwargs(self) -> dict[str, Any]:
        options, target = self.options, self.target
        kwargs: dict[str, Any] = {
            "username": target.username,
            "password": target.password,
            "socket_timeout": options.socket_timeout,
            "socket_connect_timeout": options.connect_timeout,
            "max_connections": options.max_connections,
            "retry": Retry(NoBackoff(), options.retries),
            "connection_class": SSLConnection if target.tls else Connection,
        }
        if target.tls:
            tls = options.tls
            kwargs |= {
                "ssl_ca_certs": tls.ca_file,
                "ssl_certfile": tls.cert_file,
                "ssl_keyfile": tls.key_file,
                "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.verify else ssl.CERT_NONE,
                "ssl_check_hostname": tls.verify,
            }
        return kwargs

    def _make_client(self) -> Client:
        kwargs = self._connection_kwargs()
        # Blocking pools: a call abandoned on cancel may still hold a connection for a moment.
        kwargs["timeout"] = self.options.connect_timeout
        (host, port), *others = self.target.hosts
        if self.target.cluster:
            # Given a URL, redis-py builds the nodes' pools from these kwargs (our connection
            # class included); given only startup nodes it would drop the connection class.
            return RedisCluster(
                url=f"redis://{netloc(host, port)}",
                startup_nodes=[ClusterNode(host, port) for host, port in others],  # type: ignore[no-untyped-call]
                connection_pool_class=redis.BlockingConnectionPool,
                **kwargs,
            )
        pool = redis.BlockingConnectionPool(host=host, port=port, db=self.target.db, **kwargs)  # type: ignore[no-untyped-call]
        return redis.Redis(connection_pool=pool)

    def _get_client(self) -> Client:
        client = self._client
        if client is None:
            with self._client_lock:
                if self._closed:
                    raise Abandoned("the connector is closed")
                if self._client is None:
                    self._client = self._make_client()  # a cluster asks for its slots here
                client = self._client
        return client

    # ------------------------------------------------------------------ calls

    async def _run(self, operation: str, function: Callable[..., T], *args: Any) -> T:
        """``function(client, *args)`` in a worker thread; redis errors become TierUnavailable."""
        if self._closed:
            raise TierUnavailable(f"redis {self.target.where}: the connector is closed")
        call = Call()
        with self._idle:
            self._live.add(call)

        def work() -> T:
            current.call = call
            try:
                return function(self._get_client(), *args)
            finally:
                current.call = None
                with self._idle:
                    self._live.discard(call)
                    self._idle.notify_all()

        self._counters["calls"] += 1
        try:
            return await anyio.to_thread.run_sync(work, limiter=self._limiter, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            self._counters["cancelled"] += 1
            call.cancel()
            raise
        except (RedisError, RedisClusterException, OSError, Abandoned) as exc:
            self._counters["failures"] += 1
            raise TierUnavailable(f"redis {self.target.where}: {operation} failed: {_describe(exc)}") from exc

    async def connect(self) -> None:
        """Nothing to do: connections open on the first call (and reopen after a failure)."""
        self._closed = False

    async def aclose(self) -> None:
        self._closed = True
        with self._idle:
            live = list(self._live)
        for call in live:  # abandoned calls still in their threads: stop them
            call.cancel()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close_sync)

    def _close_sync(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: not self._live, timeout=self.options.socket_timeout)
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    async def put(self, key: str, parts: Sequence[memoryview], ttl: float | None) -> None:
        await self.put_many([(key, parts)], ttl)

    async def put_many(self, entries: Sequence[tuple[str, Sequence[memoryview]]], ttl: float | None) -> None:
        """One ``SET`` per value, pipelined (one round trip per server), in one worker-thread call."""
        if not entries:
            return
        values = [(key, parts[0] if len(parts) == 1 else Concat(parts)) for key, parts in entries]
        px = max(1, round(ttl * 1000)) if ttl is not None else None
        await self._run("SET", _set_many, values, px)
        self._counters["bytes_written"] += sum(part.nbytes for _, parts in entries for part in parts)

    async def get_into(self, key: str, parts: Sequence[memoryview]) -> int | None:
        length = await self._run("GET", _get_into, key, parts, self.target.where)
        if length is not None:
            self._counters["bytes_read"] += length
        return length

    async def exists(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        return await self._run("EXISTS", _exists, list(keys))

    async def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        return await self._run("UNLINK", _unlink, list(keys))

    async def health(self) -> None:
        await self._run("PING", _ping)

    def statistics(self) -> dict[str, float]:
        return dict(self._counters)


# ---------------------------------------------------------------------------- blocking bodies (worker threads)


def _set_many(client: Client, values: list[tuple[str, memoryview | Concat]], px: int | None) -> None:
    if len(values) == 1:
        ((key, value),) = values
        client.set(key, value, px=px)  # type: ignore[arg-type]
        return
    # Pipelined: the next value is on its way while the server still takes in the last one.
    with client.pipeline(transaction=False) as pipe:
        for key, value in values:
            pipe.set(key, value, px=px)  # type: ignore[arg-type]
        pipe.execute()


def _get_into(client: Client, key: str, parts: Sequence[memoryview], where: str) -> int | None:
    call: Call = current.call
    targets = [part if part.format == "B" and part.ndim == 1 else part.cast("B") for part in parts]
    if isinstance(client, redis.Redis):
        pool = client.connection_pool
        connection = pool.get_connection()
        try:
            result: int | None = connection.retry.call_with_retry(
                lambda: _get_reply_into(connection, call, key, targets, where),
                lambda _: connection.disconnect(),  # type: ignore[no-untyped-call]
            )
            return result
        finally:
            pool.release(connection)
    # A cluster: straight to the node that the slot table names; the cluster client handles a
    # redirect (a slot that moved) or a node that fails, and refreshes its slot table.
    try:
        node_pool = client.get_redis_connection(client.get_node_from_key(key)).connection_pool  # type: ignore[no-untyped-call]
        connection = node_pool.get_connection()
        try:
            return _get_reply_into(connection, call, key, targets, where)
        finally:
            node_pool.release(connection)
    except (_Redirected, redis.ConnectionError, redis.TimeoutError, RedisClusterException):
        pass
    return _get_copy_into(client, call, key, targets, where)


def _get_copy_into(client: Client, call: Call, key: str, targets: list[memoryview], where: str) -> int | None:
    """GET through the client (bytes), then one copy into the parts."""
    try:
        value = client.get(key)
    except redis.ResponseError as exc:
        if str(exc).startswith("WRONGTYPE"):
            raise CorruptChunk(f"redis {where}: {key} does not hold a string ({exc})") from exc
        raise
    if value is None:
        return None
    if not isinstance(value, bytes):
        raise CorruptChunk(f"redis {where}: {key} holds a {type(value).__name__}, not a string")
    capacity = sum(target.nbytes for target in targets)
    if len(value) > capacity:
        raise CorruptChunk(f"redis {where}: {key} holds {len(value)} bytes, at most {capacity} expected")
    source = memoryview(value)
    with call.memory:  # a cancelled caller may have released the parts: never write into them then
        if call.cancelled:
            raise Abandoned("the call was cancelled")
        offset = 0
        for target in targets:
            piece = source[offset : offset + target.nbytes]
            target[: len(piece)] = piece
            offset += len(piece)
    return len(value)


class _Redirected(Exception):
    """A cluster node answered MOVED, ASK, TRYAGAIN or CLUSTERDOWN: the cluster client must route it."""


_REDIRECTS = (b"MOVED ", b"ASK ", b"TRYAGAIN", b"CLUSTERDOWN")


def _get_reply_into(
    connection: redis.Connection, call: Call, key: str, targets: list[memoryview], where: str
) -> int | None:
    """``GET key`` on ``connection``, its value read from the socket straight into ``targets``.

    The reply's first line (``$<length>``, ``$-1`` for a miss, or ``-ERROR``) is read into a small
    buffer; the value's bytes that came with it are copied, the rest is ``recv_into`` the targets.
    A connection left in the middle of a reply (an error, an oversized value, a cancelled call) is
    closed, never reused.
    """
    connection.send_command("GET", key)  # type: ignore[no-untyped-call]  # registers the connection with the call (cancellable)
    sock = connection._sock
    if sock is None:
        raise redis.ConnectionError(f"no connection to {where}")
    complete = False
    try:
        head = bytearray(_LINE)
        view = memoryview(head)
        filled = 0
        while (end := head.find(b"\r\n", 0, filled)) < 0:
            if filled == len(head):
                raise redis.InvalidResponse(f"redis {where}: a reply line longer than {_LINE} bytes")
            filled += _recv(sock, view[filled:], where)
        kind, line = head[:1], bytes(head[1:end])
        extra = view[end + 2 : filled]  # what came after the line
        if kind in (b"$", b"_"):
            try:
                length = int(line) if kind == b"$" else -1
            except ValueError:
                raise redis.InvalidResponse(f"redis {where}: bad length {line!r} in the reply to GET") from None
        elif kind == b"-":
            complete = len(extra) == 0
            if line.startswith(_REDIRECTS):
                raise _Redirected(line.decode(errors="replace"))
            if line.startswith(b"WRONGTYPE"):
                raise CorruptChunk(f"redis {where}: {key} does not hold a string ({line.decode(errors='replace')})")
            raise redis.ResponseError(line.decode(errors="replace"))
        else:
            raise redis.InvalidResponse(f"redis {where}: unexpected reply {bytes(head[:end])!r} to GET")
        if length < 0:
            complete = len(extra) == 0
            return None
        capacity = sum(target.nbytes for target in targets)
        if length > capacity:
            raise CorruptChunk(f"redis {where}: {key} holds {length} bytes, at most {capacity} expected")
        left = length
        for target in targets:
            want = min(left, target.nbytes)
            have = min(want, len(extra))
            with call.memory:  # a cancelled caller may have released the parts: never write into them then
                if call.cancelled:
                    raise Abandoned("the call was cancelled")
                target[:have] = extra[:have]
            extra = extra[have:]
            while have < want:
                with call.memory:
                    if call.cancelled:
                        raise Abandoned("the call was cancelled")
                    have += _recv(sock, target[have:want], where)
            left -= want
            if not left:
                break
        tail = bytearray(2)
        got = min(2, len(extra))
        tail[:got] = extra[:got]
        while got < 2:
            got += _recv(sock, memoryview(tail)[got:], where)
        if tail != b"\r\n" or len(extra) > 2:
            raise redis.InvalidResponse(f"redis {where}: the value of {key} does not end as its length says")
        complete = True
        return length
    finally:
        if not complete:  # the rest of the reply may still come: this connection is done
            connection.disconnect()


def _recv(sock: socket.socket, into: memoryview, where: str) -> int:
    try:
        count = sock.recv_into(into)
    except TimeoutError:
        raise redis.TimeoutError(f"Timeout reading from {where}") from None
    except OSError as exc:
        raise redis.ConnectionError(f"Error while reading from {where}: {exc}") from exc
    if not count:
        raise redis.ConnectionError(f"Connection closed by {where}")
    return count


def _exists(client: Client, keys: list[str]) -> list[bool]:
    if len(keys) == 1:
        return [bool(client.exists(keys[0]))]
    # One EXISTS per key, pipelined: one round trip (per cluster node).
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.exists(key)
        return [bool(answer) for answer in pipe.execute()]


def _unlink(client: Client, keys: list[str]) -> int:
    if isinstance(client, redis.Redis):
        return int(client.unlink(*keys))
    # Keys of many slots: one UNLINK each, pipelined per node.
    with client.pipeline(transaction=False) as pipe:  # type: ignore[no-untyped-call]
        for key in keys:
            pipe.unlink(key)
        return sum(int(answer) for answer in pipe.execute())


def _ping(client: Client) -> None:
    client.ping()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, redis.AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text:
        return f"authentication failed ({text})"
    return f"{type(exc).__name__}: {text}"
