"""Moving KV chunks between lmplug instances: a peer server, a pooled client, a transport seam.

:class:`TransferServer` serves the chunks of one instance's host memory to its peers over
TCP (protocol ``LMPX``, ``PROTOCOL.md`` beside this package); :class:`PeerClient` fetches
them into chunks of the caller's allocator. Both sides move payloads without copies:
the server ``sendmsg``-s memoryviews of the chunks' own tensors, the client ``recv_into``-s
straight into freshly allocated chunk memory (:mod:`lmplug_server.sockio`).

A fetch is for a cache, so it degrades instead of failing: content addressing makes any
verified leading run of chunks a correct, shorter hit. Every received chunk is checked
(key, layout, token count, xxh3 of its bytes); the first one that fails ends the run, and it
and everything after it are dropped. Whatever goes wrong (a refused or reset connection, a
timeout, a peer vanishing mid-transfer, bad bytes, a protocol error) the caller gets the
chunks verified so far, or ``[]``, and the failure is counted and logged (throttled); only
cancellation propagates. A connection that failed, or whose call was interrupted in the
middle of a frame, is closed, never reused.

:class:`Transport` is the seam for other fabrics (NIXL): a transport makes a client and a
server from :class:`TransportSettings`; ``tcp`` (:class:`TcpTransport`) is the one built in,
and :data:`transports` maps names to them.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Protocol, Self

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from lmplug import CorruptChunk
from lmplug.tierkit import (
    HEADER,
    ChunkAllocator,
    ChunkHeader,
    ChunkKey,
    KVBytes,
    KVChunk,
    KVLayout,
    ThrottledLog,
    parts_checksum,
)
from lmplug_p2p import protocol
from lmplug_p2p.protocol import FRAME, ErrorCode, FrameHeader, FrameType, Limits, ProtocolError
from lmplug_server.protocol import ProtocolError as SocketClosed
from lmplug_server.sockio import connect, drain_until_closed, recv_exactly, recv_exactly_into, send_buffers

__all__ = [
    "ClientStatistics",
    "Contains",
    "PeerClient",
    "PeerFetcher",
    "PeerServer",
    "Serve",
    "ServerStatistics",
    "TcpTransport",
    "TransferServer",
    "Transport",
    "TransportSettings",
    "chunk_payload",
    "accept_connections",
    "format_endpoint",
    "open_listener",
    "open_transport",
    "parse_endpoint",
    "transports",
]

logger = logging.getLogger("lmplug.p2p")

Serve = Callable[[Sequence[ChunkKey]], Awaitable[list[KVChunk]]]
"""Chunks for a leading run of the keys asked for, each holding one reference for the server
(released once its bytes are written; the caller keeps them pinned meanwhile)."""
Contains = Callable[[Sequence[ChunkKey]], Awaitable[int]]
"""How many leading keys of those asked for can be served."""

_DRAIN_LIMIT = 4 << 20
_THREAD_CHECKSUM = 4 << 20
"""Payloads at least this large are hashed in a worker thread, beside the socket I/O."""
_SCRATCH = 64 << 10


# ---------------------------------------------------------------------------- endpoints


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``"host:port"`` (``"[v6]:port"``) as ``(host, port)``; :class:`ValueError` if it is not one."""
    host, colon, port = endpoint.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{endpoint!r} is not a host:port endpoint")
    return host, int(port)


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def open_listener(host: str, port: int) -> socket.socket:
    """A non-blocking TCP listener on ``host:port`` (IPv6 when ``host`` has a colon; port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=128)
    listener.setblocking(False)  # noqa: FBT003
    return listener


async def accept_connections(
    listener: socket.socket, group: TaskGroup, handle: Callable[[socket.socket], Coroutine[Any, Any, None]], who: str
) -> None:
    """Accept connections on ``listener`` until cancelled, each a non-blocking socket with
    ``TCP_NODELAY`` handled by ``handle`` in ``group``. An accept that fails (out of file
    descriptors and the like) is logged, naming ``who`` listens, and retried after 0.1 s."""
    while True:
        await anyio.wait_readable(listener)
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            continue
        except OSError as exc:  # back off, keep serving
            logger.warning("%s: accept failed: %s", who, exc)
            await anyio.sleep(0.1)
            continue
        sock.setblocking(False)  # noqa: FBT003
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        group.start_soon(handle, sock)


def chunk_payload(chunk: KVChunk, layout: KVLayout) -> list[memoryview] | None:
    """The chunk's payload as memoryviews of its own memory (what a chunk record carries, sent
    and received in place), or ``None`` when it is not ``layout``'s KV in host memory."""
    tensor = chunk.tensor
    tokens = int(tensor.shape[2]) if tensor.dim() == 4 else 0
    if not tokens or tensor.dtype != layout.dtype or tuple(tensor.shape) != layout.shape(tokens):
        return None
    kv_bytes = KVBytes.of(tensor)
    return None if kv_bytes is None else kv_bytes.payload(0, tokens)


async def _read_meta(sock: socket.socket, header: FrameHeader) -> dict[str, object]:
    if not header.meta_length:
        return {}
    body = bytearray(header.meta_length)
    await recv_exactly(sock, memoryview(body))
    return protocol.parse_meta(body)


# ---------------------------------------------------------------------------- server


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    endpoint: str | None
    connections: int
    """Accepted since start."""
    open_connections: int
    requests: dict[str, int]
    """Requests answered, by frame type (HELLO, GET, EXISTS)."""
    chunks_served: int
    bytes_served: int
    """Payload bytes written (chunk headers not counted)."""
    errors: dict[str, int]
    """Connections that ended in an error, by cause: an :class:`ErrorCode` name, or ``connection``."""


class TransferServer:
    """Serves chunks to peers over TCP: ``async with TransferServer(...) as server`` (or
    ``await group.start(server.run)``), then give peers ``server.endpoint``.

    Each connection is one task in a task group the server owns; leaving the context (or
    cancelling :meth:`run`) closes every connection, and chunks not yet written go back to
    their owners. A connection must begin with HELLO, carrying ``fingerprint`` (and ``token``
    when one is set); a frame that breaks the protocol or ``limits`` gets an ERROR frame and
    the connection is closed.
    """

    def __init__(
        self,
        serve: Serve,
        contains: Contains,
        *,
        fingerprint: bytes,
        layout: KVLayout,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        limits: Limits = Limits(),  # noqa: B008 - frozen
        token: str | None = None,
        request_timeout: float = 30.0,
        hello_timeout: float = 10.0,
    ) -> None:
        self._serve = serve
        self._contains = contains
        self.fingerprint = fingerprint
        self.layout = layout
        self.host = host
        self.port = port
        self.advertise_host = advertise_host
        """The host in :attr:`endpoint` when ``host`` is a wildcard address peers cannot dial."""
        self.limits = limits
        self._token = None if token is None else token.encode()
        self.request_timeout = request_timeout
        self.hello_timeout = hello_timeout
        self._endpoint: str | None = None
        self._hashing = anyio.CapacityLimiter(2)
        self._stack: contextlib.AsyncExitStack | None = None
        self._connections = self._open = self._chunks = self._bytes = 0
        self._requests: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()

    @property
    def endpoint(self) -> str:
        """``host:port`` that peers connect to (once listening)."""
        if self._endpoint is None:
            raise RuntimeError("the transfer server is not listening")
        return self._endpoint

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            self._endpoint,
            self._connections,
            self._open,
            dict(self._requests),
            self._chunks,
            self._bytes,
            dict(self._errors),
        )

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(group.cancel_scope.cancel)  # leaving stops the server (callbacks run first)
            await group.start(self.run)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is None:
            return None
        return await stack.__aexit__(kind, error, traceback)

    async def run(self, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``task_status`` gets the endpoint."""
        listener = open_listener(self.host, self.port)
        try:
            host, port = listener.getsockname()[:2]
            self._endpoint = format_endpoint(self.advertise_host or host, port)
            async with anyio.create_task_group() as group:
                task_status.started(self._endpoint)
                await accept_connections(listener, group, self._connection, "lmplug-p2p")
        finally:
            listener.close()

    # ------------------------------------------------------------------ one connection

    async def _connection(self, sock: socket.socket) -> None:
        self._connections += 1
        self._open += 1
        request_id = 0
        head = bytearray(FRAME.size)
        try:
            with anyio.fail_after(self.hello_timeout):
                await self._hello(sock, head)
            while True:
                await anyio.wait_readable(sock)
                try:
                    first = sock.recv_into(head)
                except BlockingIOError:
                    continue
                if not first:
                    break  # closed between requests: a clean goodbye
                with anyio.fail_after(self.request_timeout):
                    await recv_exactly(sock, memoryview(head)[first:])
                    header = protocol.parse_header(head, self.limits, request=True)
                    request_id = header.request_id
                    await self._request(sock, header)
        except ProtocolError as exc:
            await self._refuse(sock, exc, request_id)
        except TimeoutError:
            await self._refuse(sock, ProtocolError(ErrorCode.TIMEOUT, "request took too long"), request_id)
        except (SocketClosed, OSError) as exc:
            self._errors["connection"] += 1
            logger.debug("lmplug-p2p: a peer connection failed: %s", exc)
        finally:
            self._open -= 1
            sock.close()

    async def _refuse(self, sock: socket.socket, error: ProtocolError, request_id: int) -> None:
        """Tell the peer why (best effort); the caller then closes the connection."""
        self._errors[error.code.name.lower()] += 1
        logger.info("lmplug-p2p: closing a peer connection: %s", error)
        with anyio.move_on_after(1.0), contextlib.suppress(OSError, SocketClosed):
            await send_buffers(sock, [protocol.encode_error(error.code, error.detail, request_id)])
            # Closing with unread input would reset the connection and could destroy the
            # ERROR before the peer reads it: say goodbye, then drain until the peer closes.
            sock.shutdown(socket.SHUT_WR)
            await drain_until_closed(sock, memoryview(bytearray(_SCRATCH)), _DRAIN_LIMIT)

    async def _hello(self, sock: socket.socket, head: bytearray) -> None:
        await recv_exactly(sock, memoryview(head))
        header = protocol.parse_header(head, self.limits, request=True)
        if header.type is not FrameType.HELLO:
            raise ProtocolError(ErrorCode.HELLO_REQUIRED, f"{header.type.name} before HELLO")
        protocol.check_hello(
            await _read_meta(sock, header),
            token=self._token,
            fingerprint=self.fingerprint,
            mismatch=lambda ours, theirs: (
                f"fingerprint mismatch: this peer serves KV of fingerprint {ours}, the requester's cache is "
                f"{theirs} (model name, KV layout, dtype, world size, rank, chunk size or hash differ)"
            ),
        )
        reply = protocol.encode_frame(FrameType.HELLO_OK, header.request_id, protocol.encode_limits(self.limits))
        await send_buffers(sock, [reply])
        self._requests["HELLO"] += 1

    async def _request(self, sock: socket.socket, header: FrameHeader) -> None:
        if header.type is FrameType.GET:
            await self._get(sock, header)
        elif header.type is FrameType.EXISTS:
            await self._exists(sock, header)
        else:
            raise ProtocolError(ErrorCode.MALFORMED, f"{header.type.name} after HELLO")
        self._requests[header.type.name] += 1

    async def _read_keys(self, sock: socket.socket, header: FrameHeader) -> list[ChunkKey]:
        data = bytearray(header.data_length)  # at most max_keys keys: parse_header checked
        await recv_exactly(sock, memoryview(data))
        return protocol.split_keys(data)

    async def _exists(self, sock: socket.socket, header: FrameHeader) -> None:
        await _read_meta(sock, header)
        keys = await self._read_keys(sock, header)
        try:
            found = await self._contains(keys) if keys else 0
        except Exception as exc:
            logger.exception("lmplug-p2p: the contains callback failed")
            raise ProtocolError(ErrorCode.INTERNAL, "looking the keys up failed") from exc
        found = max(0, min(int(found), len(keys)))
        await send_buffers(sock, [protocol.encode_frame(FrameType.EXISTS_REPLY, header.request_id, {"n": found})])

    async def _get(self, sock: socket.socket, header: FrameHeader) -> None:
        meta = await _read_meta(sock, header)
        max_bytes = min(protocol.meta_int(meta, "max_bytes", 0, 1 << 62), self.limits.max_bytes)
        keys = await self._read_keys(sock, header)
        try:
            chunks = list(await self._serve(keys)) if keys else []
        except Exception as exc:
            logger.exception("lmplug-p2p: the serve callback failed")
            raise ProtocolError(ErrorCode.INTERNAL, "reading the chunks failed") from exc
        layout = self.layout
        released = 0
        try:
            run: list[list[memoryview]] = []
            total = 0
            for chunk in chunks[: len(keys)]:
                views = chunk_payload(chunk, layout)
                if views is None:
                    logger.error("lmplug-p2p: serve returned a chunk that is not %s in host memory", layout.describe())
                    break
                size = HEADER.size + layout.nbytes(chunk.num_tokens)
                if total + size > max_bytes:
                    break
                run.append(views)
                total += size
            frame = protocol.encode_frame(FrameType.GET_REPLY, header.request_id, {"n": len(run)}, total)
            failure: Exception | None = None
            async with anyio.create_task_group() as group:
                send_checksum, checksums = anyio.create_memory_object_stream[int](1)
                group.start_soon(self._checksums_ahead, run, send_checksum)
                pending: list[bytes | memoryview] = [frame]
                try:
                    with checksums:
                        for index, views in enumerate(run):
                            chunk = chunks[index]
                            tokens = chunk.num_tokens
                            checksum = await checksums.receive()
                            record = ChunkHeader.for_chunk(keys[index], layout, tokens, checksum).pack()
                            await send_buffers(sock, [*pending, record, *views])
                            pending = []
                            chunk.release()
                            released += 1
                            self._chunks += 1
                            self._bytes += layout.nbytes(tokens)
                        if pending:
                            await send_buffers(sock, pending)
                except Exception as exc:  # raised below, outside the group, as itself
                    failure = exc
                    group.cancel_scope.cancel()
            if failure is not None:
                raise failure
        finally:
            for chunk in chunks[released:]:  # the hashing task is done: nothing reads them any more
                chunk.release()

    async def _checksums_ahead(self, run: Sequence[list[memoryview]], sink: MemoryObjectSendStream[int]) -> None:
        """The checksums of ``run``'s payloads, one ahead of the sender: a large payload is hashed
        in a worker thread (xxh3 releases the GIL) while the previous one is being written."""
        with sink:
            for views in run:
                if sum(view.nbytes for view in views) < _THREAD_CHECKSUM:
                    checksum = parts_checksum(views)
                else:
                    checksum = await anyio.to_thread.run_sync(parts_checksum, views, limiter=self._hashing)
                await sink.send(checksum)


# ---------------------------------------------------------------------------- client


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    fetches: int
    exists_calls: int
    chunks: int
    """Verified chunks received."""
    bytes: int
    """Their payload bytes."""
    connections_opened: int
    connections_dropped: int
    """Closed instead of reused: failed, interrupted, found dead in the pool, or the client closed."""
    failures: dict[str, int] = field(default_factory=dict)
    """Calls that ended early, by cause: ``refused``, ``timeout``, ``connection`` (reset, or the peer
    vanished mid-transfer), ``corrupt`` (a chunk failed verification), ``no_memory`` (the allocator
    had none), ``protocol``, ``endpoint``, ``closed``, ``internal``, or the code of the peer's ERROR
    frame (``fingerprint_mismatch``, ``auth_failed``, ...)."""


class _NoMemory(Exception):
    """The allocator returned no chunk."""


class _Closed(Exception):
    """The client was closed."""


class _Connection:
    """One open connection past HELLO, and the limits its server announced."""

    __slots__ = ("_next_id", "limits", "sock")

    def __init__(self, sock: socket.socket, limits: Limits) -> None:
        self.sock = sock
        self.limits = limits
        self._next_id = 1

    def request_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFF_FFFF
        return self._next_id

    def alive(self) -> bool:
        """False once the peer closed (or wrote something unasked, which breaks the protocol)."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True  # nothing to read: the connection is idle, as it should be
        except OSError:
            return False
        return False

    def close(self) -> None:
        self.sock.close()


@dataclass(slots=True)
class _Pool:
    limiter: anyio.CapacityLimiter
    idle: list[_Connection] = field(default_factory=list)


class PeerClient:
    """Fetches chunks from peers' :class:`TransferServer` s; see the module docstring.

    ``connections`` bounds the connections open to one endpoint at once (calls beyond wait);
    connections open lazily and are reused while they stay in a known state.
    """

    def __init__(
        self,
        fingerprint: bytes,
        *,
        token: str | None = None,
        connections: int = 4,
        limits: Limits = Limits(),  # noqa: B008 - frozen
    ) -> None:
        if connections < 1:
            raise ValueError(f"connections must be at least 1, not {connections}")
        self.fingerprint = fingerprint
        self.connections = connections
        self.limits = limits
        self._token = token
        self._pools: dict[str, _Pool] = {}
        self._closed = False
        self._log = ThrottledLog(logger)
        self._fetches = self._exists = self._chunks = self._bytes = self._opened = self._dropped = 0
        self._failures: Counter[str] = Counter()

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            self._fetches,
            self._exists,
            self._chunks,
            self._bytes,
            self._opened,
            self._dropped,
            dict(self._failures),
        )

    async def aclose(self) -> None:
        """Close every idle connection; calls after this return nothing (connections in use close when done)."""
        self._closed = True
        for pool in self._pools.values():
            idle, pool.idle = pool.idle, []
            for connection in idle:
                connection.close()
                self._dropped += 1

    # ------------------------------------------------------------------ the calls

    async def fetch(
        self,
        endpoint: str,
        keys: Sequence[ChunkKey],
        token_counts: Sequence[int] | None,
        allocator: ChunkAllocator,
        layout: KVLayout,
        *,
        timeout: float,  # noqa: ASYNC109 - a deadline ends in a shorter result, which a caller's scope cannot give
    ) -> list[KVChunk]:
        """The verified leading run of ``keys``' chunks that ``endpoint`` serves within ``timeout`` s.

        Chunk ``i`` must hold ``token_counts[i]`` tokens of ``layout`` (``None``: as many as the
        peer's record says, at least one; the key names the tokens either way). Each is received
        straight into a chunk from ``allocator`` and returned holding its one reference, which the
        caller owns. A mismatched argument length is a :class:`ValueError` (a bug, not a failure).

        Failures shorten the run (to ``[]`` at worst) and are logged, never raised; only
        cancellation propagates (and then every chunk received is released).
        """
        if token_counts is not None and len(keys) != len(token_counts):
            raise ValueError(f"{len(keys)} keys but {len(token_counts)} token counts")
        chunks: list[KVChunk] = []
        if not keys:
            return chunks
        self._fetches += 1
        try:
            with anyio.fail_after(timeout):
                async with self._borrow(endpoint) as connection:
                    await self._get(connection, keys, token_counts, allocator, layout, chunks)
        except Exception as exc:
            self._failed("fetch", endpoint, exc, f"{len(chunks)} of {len(keys)} chunks kept")
        except BaseException:
            for chunk in chunks:
                chunk.release()
            raise
        return chunks

    async def exists(self, endpoint: str, keys: Sequence[ChunkKey], *, timeout: float) -> int:  # noqa: ASYNC109
        """How many leading ``keys`` ``endpoint`` holds; on a failure, what it had said so far (or 0)."""
        found = 0
        if not keys:
            return found
        self._exists += 1
        try:
            with anyio.fail_after(timeout):
                async with self._borrow(endpoint) as connection:
                    step = connection.limits.max_keys
                    for start in range(0, len(keys), step):
                        batch = keys[start : start + step]
                        request_id = connection.request_id()
                        await send_buffers(connection.sock, [protocol.encode_keys(FrameType.EXISTS, request_id, batch)])
                        _, meta = await self._reply(connection, FrameType.EXISTS_REPLY, request_id, 0)
                        held = protocol.meta_int(meta, "n", 0, len(batch))
                        found += held
                        if held < len(batch):
                            break
        except Exception as exc:
            self._failed("exists", endpoint, exc, f"{found} of {len(keys)} keys found")
        return found

    # ------------------------------------------------------------------ GET

    async def _get(
        self,
        connection: _Connection,
        keys: Sequence[ChunkKey],
        token_counts: Sequence[int] | None,
        allocator: ChunkAllocator,
        layout: KVLayout,
        chunks: list[KVChunk],
    ) -> None:
        """Append verified chunks to ``chunks``; raise at the first failure."""
        sock, limits = connection.sock, connection.limits
        budget = min(limits.max_bytes, self.limits.max_bytes)
        sizes = None if token_counts is None else [HEADER.size + layout.nbytes(tokens) for tokens in token_counts]
        head = bytearray(HEADER.size)
        start = 0
        while start < len(keys):
            # One request per batch the server's limits admit; a later batch only after a whole one.
            if sizes is None:
                end, total = min(start + limits.max_keys, len(keys)), budget
            else:
                end, total = start + 1, sizes[start]
                while end < len(keys) and end - start < limits.max_keys and total + sizes[end] <= budget:
                    total += sizes[end]
                    end += 1
            request_id = connection.request_id()
            request = protocol.encode_keys(FrameType.GET, request_id, keys[start:end], {"max_bytes": total})
            await send_buffers(sock, [request])
            header, meta = await self._reply(connection, FrameType.GET_REPLY, request_id, total)
            served = protocol.meta_int(meta, "n", 0, end - start)
            remaining = header.data_length
            if remaining < served * HEADER.size:
                raise ProtocolError(ErrorCode.MALFORMED, f"{remaining} bytes cannot hold {served} chunk records")
            for index in range(start, start + served):
                await recv_exactly(sock, memoryview(head))
                record = ChunkHeader.unpack(memoryview(head))
                record.expect(keys[index], layout, None if token_counts is None else token_counts[index])
                if record.tokens < 1:
                    raise CorruptChunk(f"chunk {index} ({keys[index]}) holds no tokens")
                remaining -= HEADER.size + record.nbytes
                if remaining < 0:
                    raise ProtocolError(ErrorCode.MALFORMED, "chunk records run past the reply's data_length")
                chunk = allocator.allocate(record.tokens)
                if chunk is None:
                    raise _NoMemory(f"the allocator has no room for a chunk of {record.tokens} tokens")
                try:
                    views = chunk_payload(chunk, layout)
                    if views is None:
                        raise TypeError(f"the allocator's chunks are not {layout.describe()} in host memory")
                    await recv_exactly_into(sock, views)
                    if parts_checksum(views) != record.checksum:
                        raise CorruptChunk(f"chunk {index} ({keys[index]}) failed its checksum")
                except BaseException:
                    chunk.release()
                    raise
                chunks.append(chunk)
                self._chunks += 1
                self._bytes += record.nbytes
            if remaining:
                raise ProtocolError(ErrorCode.MALFORMED, f"{remaining} bytes left after {served} chunk records")
            if served < end - start:
                return
            start = end

    async def _reply(
        self, connection: _Connection, expected: FrameType, request_id: int, max_data: int
    ) -> tuple[FrameHeader, dict[str, object]]:
        """The reply to ``request_id`` up to its data; an ERROR frame is raised as :class:`protocol.ErrorReply`."""
        sock = connection.sock
        head = bytearray(FRAME.size)
        await recv_exactly(sock, memoryview(head))
        header = protocol.parse_header(head, self.limits, request=False)
        meta = await _read_meta(sock, header)
        if header.type is FrameType.ERROR:
            raise protocol.parse_error(meta)
        if header.type is not expected or header.request_id != request_id:
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"{header.type.name} to request {header.request_id}; {expected.name} to {request_id} expected",
            )
        if header.data_length > max_data:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"reply of {header.data_length} bytes, at most {max_data} asked")
        return header, meta

    # ------------------------------------------------------------------ connections

    @contextlib.asynccontextmanager
    async def _borrow(self, endpoint: str) -> AsyncIterator[_Connection]:
        """A connection for one call; closed instead of returned if anything interrupts it."""
        if self._closed:
            raise _Closed("the peer client is closed")
        pool = self._pools.get(endpoint)
        if pool is None:
            pool = self._pools[endpoint] = _Pool(anyio.CapacityLimiter(self.connections))
        async with pool.limiter:
            connection = None
            while pool.idle and connection is None:
                candidate = pool.idle.pop()
                if candidate.alive():
                    connection = candidate
                else:
                    candidate.close()
                    self._dropped += 1
            if connection is None:
                connection = await self._open(endpoint)
            finished = False
            try:
                yield connection
                finished = True
            finally:
                if finished and not self._closed:
                    pool.idle.append(connection)
                else:
                    connection.close()
                    self._dropped += 1

    async def _open(self, endpoint: str) -> _Connection:
        host, port = parse_endpoint(endpoint)
        sock = await connect(host, port)
        try:
            meta: dict[str, object] = {"fingerprint": self.fingerprint.hex()}
            if self._token is not None:
                meta["token"] = self._token
            await send_buffers(sock, [protocol.encode_frame(FrameType.HELLO, 1, meta)])
            connection = _Connection(sock, self.limits)
            _, reply = await self._reply(connection, FrameType.HELLO_OK, 1, 0)
            connection.limits = protocol.parse_limits(reply)
        except BaseException:
            sock.close()
            raise
        self._opened += 1
        return connection

    def _failed(self, operation: str, endpoint: str, error: Exception, kept: str) -> None:
        cause = failure_cause(error)
        self._failures[cause] += 1
        self._log.report(cause, "lmplug-p2p: %s from %s failed (%s: %s); %s", operation, endpoint, cause, error, kept)


def failure_cause(error: BaseException) -> str:
    """The failure-statistics name of ``error`` (a transfer's over ``LMPX``): ``timeout``,
    ``refused``, ``connection``, ``protocol``, ``corrupt``, ``endpoint``, an ERROR reply's code..."""
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, protocol.ErrorReply):
        return error.code.name.lower()
    if isinstance(error, ProtocolError):
        return "connection" if error.code is ErrorCode.TRUNCATED else "protocol"
    if isinstance(error, CorruptChunk):
        return "corrupt"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, (SocketClosed, OSError)):
        return "connection"
    if isinstance(error, _NoMemory):
        return "no_memory"
    if isinstance(error, _Closed):
        return "closed"
    if isinstance(error, ValueError):
        return "endpoint"
    return "internal"


# ---------------------------------------------------------------------------- the transport seam


@dataclass(frozen=True, slots=True)
class TransportSettings:
    """What both sides of any transport need."""

    fingerprint: bytes
    """The local cache's key fingerprint: only peers with the same one exchange chunks."""
    layout: KVLayout
    token: str | None = None
    """A shared secret peers present in HELLO (``None``: none asked, none sent)."""
    limits: Limits = Limits()  # noqa: RUF009 - frozen
    connections: int = 4
    """Most connections a client opens to one endpoint."""


class PeerFetcher(Protocol):
    """The client side of a transport (:class:`PeerClient` for ``tcp``)."""

    async def fetch(
        self,
        endpoint: str,
        keys: Sequence[ChunkKey],
        token_counts: Sequence[int] | None,
        allocator: ChunkAllocator,
        layout: KVLayout,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> list[KVChunk]: ...

    async def exists(self, endpoint: str, keys: Sequence[ChunkKey], *, timeout: float) -> int: ...  # noqa: ASYNC109

    def statistics(self) -> ClientStatistics: ...

    async def aclose(self) -> None: ...


class PeerServer(Protocol):
    """The server side of a transport (:class:`TransferServer` for ``tcp``): an async context
    manager that serves while entered and says where."""

    @property
    def endpoint(self) -> str: ...

    def statistics(self) -> ServerStatistics: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool | None: ...


class Transport(Protocol):
    """How chunks travel between peers: a client that fetches into allocator chunks and a
    server that serves from host memory. A NIXL transport would register beside ``tcp``."""

    name: ClassVar[str]

    def client(self) -> PeerFetcher: ...

    def server(self, serve: Serve, contains: Contains, *, host: str, port: int) -> PeerServer: ...


class TcpTransport:
    """The ``LMPX``-over-TCP transport (zero-copy sockets; any host, no special hardware)."""

    name: ClassVar[str] = "tcp"

    def __init__(self, settings: TransportSettings) -> None:
        self.settings = settings

    def client(self) -> PeerClient:
        settings = self.settings
        return PeerClient(
            settings.fingerprint, token=settings.token, connections=settings.connections, limits=settings.limits
        )

    def server(self, serve: Serve, contains: Contains, *, host: str = "127.0.0.1", port: int = 0) -> TransferServer:
        settings = self.settings
        return TransferServer(
            serve,
            contains,
            fingerprint=settings.fingerprint,
            layout=settings.layout,
            host=host,
            port=port,
            limits=settings.limits,
            token=settings.token,
        )


transports: dict[str, Callable[[TransportSettings], Transport]] = {"tcp": TcpTransport}
"""The transports by name."""


def open_transport(name: str, settings: TransportSettings) -> Transport:
    """The transport called ``name``; :class:`ValueError` names the known ones otherwise."""
    try:
        factory = transports[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; known: {', '.join(sorted(transports))}") from None
    return factory(settings)
