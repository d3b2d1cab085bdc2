"""Redis connectors: ``redis://``, ``rediss://`` (TLS) and ``redis+cluster://`` through redis-py.

One chunk is one string value: the tier's parts (header, payload) go out as one ``SET`` (with
``PX`` for a ttl), so a reader sees the old value, the new one or nothing, never half of one.

Why the sync client in worker threads, not ``redis.asyncio`` through :class:`AsyncioBridge`:
measured on this 2-core machine with 8 MiB values against a local redis-server (median of 12),
the sync client with the zero-copy packer below stores in ~9 ms and reads in ~11-13 ms on both
loops; ``redis.asyncio`` stores in ~9 ms (its transport joins the pieces: one copy), reads in
~13 ms under asyncio but ~19 ms under trio (every call hops to the bridge's loop thread). The sync
path is as fast or faster on both loops, its cluster client is the mature one, and cancelling a
call can be made safe (below). With hiredis installed redis-py packs commands with
``hiredis.pack_command``, which copies every value twice (``bytes(memoryview)``, then the packed
buffer) and measured 24-30 ms per 8 MiB ``SET``; :class:`_Packer` instead emits values as
separate pieces that ``sendall`` sends straight from chunk memory, parts back to back with no join.
Reads skip redis-py's parser: ``GET`` goes out on a pooled connection and the connector reads the
reply itself, its first line into a small buffer and the value ``recv_into`` the caller's parts
(redis-py would build one ``bytes`` of the value, a fresh page-faulted block for big values, to be
copied again: measured ~2x slower for 32 MiB values). A cluster read goes to the node the slot
table names; a redirect or a failing node hands it to the cluster client (bytes, one copy).

Cancellation (the tier's timeouts): a call runs in a worker thread that the caller abandons when
it is cancelled, so the caller returns at once. Before it returns, the call is marked cancelled
and its sockets are shut down, so the thread stops promptly, never reconnects or retries for it,
and never reads chunk memory the tier has since released. The thread writes into the caller's
parts (a copy or a ``recv_into``) only under the call's ``memory`` lock and only while the call is
not cancelled; the cancel takes that lock after the shutdown (which ends a blocked receive), so no
byte lands in the parts after the caller has gone. A connection left mid-reply is closed.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import anyio
import redis
from pydantic import Field, NonNegativeInt, PositiveInt, SecretStr
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import DataError, RedisClusterException, RedisError
from redis.retry import Retry

from lmplug import ConfigError, CorruptChunk, Duration, RemoteConnector, RemoteScheme, StrictModel, TierUnavailable

T = TypeVar("T")
Client = redis.Redis | RedisCluster

DEFAULT_PORT = 6379
_PIECE = 16 * 1024
"""Arguments longer than this are sent as pieces of their own instead of copied into the command."""
_LINE = 16 * 1024
"""The first read of a GET reply: its line, and the start of the value that came with it."""


class RedisTLSOptions(StrictModel):
    """TLS of a ``rediss://`` URL."""

    ca_file: str | None = Field(default=None, description="CA bundle that signs the server's certificate.")
    cert_file: str | None = Field(default=None, description="Client certificate (mutual TLS).")
    key_file: str | None = Field(default=None, description="Private key of the client certificate.")
    verify: bool = Field(default=True, description="Verify the server's certificate and host name.")


class RedisOptions(StrictModel):
    """Options of the redis connectors (the tier's ``connector:`` section)."""

    username: str | None = Field(default=None, description="ACL user; default: the URL's user, else none.")
    password: SecretStr | None = Field(default=None, description="Password; default: the URL's password, else none.")
    db: NonNegativeInt | None = Field(default=None, description="Database number; default: the URL's path, else 0.")
    tls: RedisTLSOptions = Field(default_factory=RedisTLSOptions, description="TLS settings (rediss:// only).")
    max_connections: PositiveInt = Field(default=16, description="Connections (and calls in flight) per server.")
    socket_timeout: Duration = Field(default=5.0, gt=0, description="Limit of one socket read or write.")
    connect_timeout: Duration = Field(default=2.0, gt=0, description="Limit of opening one connection.")
    retries: NonNegativeInt = Field(default=1, description="Immediate retries of a call after a connection error.")


# ---------------------------------------------------------------------------- zero-copy command packing


class _Concat(tuple[memoryview, ...]):
    """One value sent as its parts back to back (the server sees one string)."""

    __slots__ = ()


def _encode(arg: object) -> bytes | bytearray | memoryview:
    # What redis-py's Encoder accepts, without decoding or copying buffers.
    if isinstance(arg, bytes | bytearray | memoryview):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bool):
        raise DataError(f"invalid input of type bool ({arg!r}); convert to a bytes, string, int or float first")
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    raise DataError(f"invalid input of type {type(arg).__name__}; convert to a bytes, string, int or float first")


class _Packer:
    """RESP command packer that sends large values and :class:`_Concat` parts as their own pieces."""

    def pack(self, *args: Any) -> list[bytes | bytearray | memoryview]:
        if isinstance(args[0], str):  # "CLUSTER SLOTS" and the like are several words
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        pieces: list[bytes | bytearray | memoryview] = []
        buffer = bytearray(b"*%d\r\n" % len(args))
        for arg in args:
            if isinstance(arg, _Concat):
                buffer += b"$%d\r\n" % sum(part.nbytes for part in arg)
                pieces.append(bytes(buffer))
                pieces.extend(arg)
                buffer = bytearray(b"\r\n")
                continue
            value = _encode(arg)
            size = value.nbytes if isinstance(value, memoryview) else len(value)
            buffer += b"$%d\r\n" % size
            if size > _PIECE or isinstance(value, memoryview):
                pieces.append(bytes(buffer))
                pieces.append(value)
                buffer = bytearray(b"\r\n")
            else:
                buffer += value
                buffer += b"\r\n"
        pieces.append(bytes(buffer))
        return pieces


_PACKER = _Packer()


# ---------------------------------------------------------------------------- cancellable calls


class _Call:
    """One connector call in a worker thread; the caller cancels it by shutting down its sockets.

    ``memory`` is held by the worker thread while it writes into the caller's parts (a copy, or a
    ``recv_into`` straight from the socket) and only while ``cancelled`` is false; :meth:`cancel`
    sets the flag, shuts the sockets down (which ends a blocked ``recv_into`` at once) and then
    takes ``memory``, so no byte reaches the parts after it returns.
    """

    __slots__ = ("cancelled", "connections", "lock", "memory")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.memory = threading.Lock()
        self.cancelled = False
        self.connections: set[redis.Connection] = set()

    def enter(self, connection: redis.Connection) -> None:
        with self.lock:
            if self.cancelled:
                raise _Abandoned("the call was cancelled")
            self.connections.add(connection)

    def cancel(self) -> None:
        self.cancelled = True
        with self.lock:
            connections, self.connections = self.connections, set()
        for connection in connections:
            sock = connection._sock  # the owning thread is blocked on it; shutdown wakes it
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        with self.memory:  # waits for a write into the caller's parts that has begun (ended by the shutdown)
            pass


class _Abandoned(Exception):
    """Raised in a worker thread whose caller has gone: no retry, no reconnect."""


_current = threading.local()


class _Connection(redis.Connection):
    """The zero-copy packer, and a socket that a cancelled call can shut down."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(command_packer=_PACKER, **kwargs)  # type: ignore[no-untyped-call]

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        call: _Call | None = getattr(_current, "call", None)
        if call is not None:
            call.enter(self)  # refuses to (re)connect or send for a call that was cancelled
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


class _SSLConnection(_Connection, redis.SSLConnection):
    pass


# ---------------------------------------------------------------------------- the connector


class _Target:
    """What a URL names: servers, credentials, database, TLS, cluster."""

    def __init__(self, url: str, options: RedisOptions) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme.lower()
        self.cluster = self.scheme == "redis+cluster"
        self.tls = self.scheme == "rediss"
        if parts.query or parts.fragment:
            raise ConfigError(f"{url!r}: query and fragment are not used; put options in the connector section")
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        url_user, _, url_password = userinfo.partition(":")
        self.hosts = [_host_port(url, item) for item in hostlist.split(",")] if hostlist else []
        if not self.hosts:
            raise ConfigError(f"{url!r}: no host (e.g. {self.scheme}://127.0.0.1:6379)")
        if len(self.hosts) > 1 and not self.cluster:
            raise ConfigError(f"{url!r}: several hosts need redis+cluster://")
        self.username = options.username or unquote(url_user) or None
        secret = options.password.get_secret_value() if options.password is not None else None
        self.password = secret or unquote(url_password) or None
        path = parts.path.strip("/")
        url_db: int | None = None
        if path:
            if not path.isdigit():
                raise ConfigError(f"{url!r}: the path must be a database number, not {path!r}")
            url_db = int(path)
        if url_db is not None and options.db is not None and url_db != options.db:
            raise ConfigError(f"{url!r}: database {url_db} in the URL, but db: {options.db} in the options")
        self.db = options.db if options.db is not None else (url_db or 0)
        if self.cluster and self.db:
            raise ConfigError(f"{url!r}: Redis Cluster has only database 0")
        if not self.tls and options.tls != RedisTLSOptions():
            raise ConfigError(f"{url!r}: tls options need a rediss:// URL")
        self.where = ",".join(_netloc(host, port) for host, port in self.hosts)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_port(url: str, item: str) -> tuple[str, int]:
    if item.startswith("["):  # [ipv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise ConfigError(f"{url!r}: empty host in {item!r}")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{url!r}: bad port in {item!r}")
    return host, int(port_text)


class RedisConnector(RemoteConnector):
    """A Redis server or Redis Cluster, through redis-py's sync client in worker threads."""

    def __init__(self, url: str, options: RedisOptions) -> None:
        self.url = url
        self.options = options
        self.target = _Target(url, options)
        self._limiter = anyio.CapacityLimiter(options.max_connections)
        self._client: Client | None = None
        self._client_lock = threading.Lock()
        self._live: set[_Call] = set()
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
            "connection_class": _SSLConnection if target.tls else _Connection,
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
                url=f"redis://{_netloc(host, port)}",
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
                    raise _Abandoned("the connector is closed")
                if self._client is None:
                    self._client = self._make_client()  # a cluster asks for its slots here
                client = self._client
        return client

    # ------------------------------------------------------------------ calls

    async def _run(self, operation: str, function: Callable[..., T], *args: Any) -> T:
        """``function(client, *args)`` in a worker thread; redis errors become TierUnavailable."""
        if self._closed:
            raise TierUnavailable(f"redis {self.target.where}: the connector is closed")
        call = _Call()
        with self._idle:
            self._live.add(call)

        def work() -> T:
            _current.call = call
            try:
                return function(self._get_client(), *args)
            finally:
                _current.call = None
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
        except (RedisError, RedisClusterException, OSError, _Abandoned) as exc:
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
        values = [(key, parts[0] if len(parts) == 1 else _Concat(parts)) for key, parts in entries]
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


def _set_many(client: Client, values: list[tuple[str, memoryview | _Concat]], px: int | None) -> None:
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
    call: _Call = _current.call
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


def _get_copy_into(client: Client, call: _Call, key: str, targets: list[memoryview], where: str) -> int | None:
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
            raise _Abandoned("the call was cancelled")
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
    connection: redis.Connection, call: _Call, key: str, targets: list[memoryview], where: str
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
                    raise _Abandoned("the call was cancelled")
                target[:have] = extra[:have]
            extra = extra[have:]
            while have < want:
                with call.memory:
                    if call.cancelled:
                        raise _Abandoned("the call was cancelled")
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


def _make_connector(url: str, options: RedisOptions) -> RemoteConnector:
    return RedisConnector(url, options)


SCHEME = RemoteScheme(
    ("redis", "rediss", "redis+cluster"),
    RedisOptions,
    _make_connector,
    "Redis (rediss:// with TLS) and Redis Cluster (redis+cluster://host:port,host:port) via redis-py",
)
