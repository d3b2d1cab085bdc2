"""Pushing a prompt's chunks from a prefill instance to a decode instance: :class:`PushSender`
and :class:`PushReceiver` (protocol: ``PROTOCOL.md`` beside this package).

One connection carries one transfer: HELLO, OPEN (the keys and their total bytes), ACCEPT (how
many leading chunks the receiver already holds) or REJECT, one CHUNK frame per chunk record,
END, DONE (how many it now holds). Payloads move without copies, as in lmplug-p2p: the sender
``sendmsg``-s views of its chunks' memory, the receiver ``recv_into``-s straight into chunks
of its cache's allocator.

Content addressing makes any verified leading run of a prompt's chunks a correct, shorter hit,
so a push degrades instead of failing. The receiver verifies every record (key, layout, xxh3
of the payload) and admits it into its cache's local tiers at once; the first record that fails
ends the transfer (it and every later one are dropped), and whatever stops a transfer (the
sender dying, silence, a protocol error, a full pool, shutdown) leaves the verified prefix
cached. Each transfer's verified chunks are *held* (a reference kept, so they are not evicted)
for ``hold`` seconds after it ends. The sender never raises for the destination's failures: it
returns how many leading chunks the destination confirmed, ``0`` when it cannot know.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from lmplug import CorruptChunk
from lmplug.tierkit import HEADER, ChunkAllocator, ChunkHeader, ChunkKey, KVChunk, KVLayout, LocalTiers, parts_checksum
from lmplug_p2p import protocol as lmpx
from lmplug_p2p.protocol import FRAME, ErrorCode, Limits, ProtocolError
from lmplug_p2p.transfer import (
    accept_connections,
    chunk_payload,
    failure_cause,
    format_endpoint,
    open_listener,
    parse_endpoint,
)
from lmplug_pd.protocol import PushFrame, PushHeader, RejectReason, encode, parse_header, xfer_id_of
from lmplug_server.protocol import ErrorCode as SocketCode
from lmplug_server.protocol import ProtocolError as SocketClosed
from lmplug_server.sockio import connect, drain_until_closed, recv_exactly, recv_exactly_into, send_buffers, skip_bytes

__all__ = ["PushReceiver", "PushSender", "ReceiverSettings", "Rejected"]

logger = logging.getLogger("lmplug.pd")

_THREAD_CHECKSUM = 4 << 20
"""Payloads at least this large are hashed in a worker thread, beside the socket I/O."""
_SCRATCH = 64 << 10
_DRAIN_LIMIT = 4 << 20
_REQUEST = 1
"""The request id of every frame of a push (one transfer per connection)."""


_MAX_OUTCOMES = 65536
"""Transfer states remembered at most (the oldest go first)."""


class Rejected(Exception):
    """The receiver refused the transfer (REJECT): ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"rejected: {reason}")
        self.reason = reason


async def _read_meta(sock: socket.socket, header: PushHeader) -> dict[str, Any]:
    if not header.meta_length:
        return {}
    body = bytearray(header.meta_length)
    await recv_exactly(sock, memoryview(body))
    return lmpx.parse_meta(body)


def _cause(error: BaseException) -> str:
    """The statistics name of a failure."""
    if isinstance(error, Rejected):
        return f"rejected_{error.reason}"
    return failure_cause(error)


# ---------------------------------------------------------------------------- sender


class PushSender:
    """Pushes chunks to decode instances' receivers; one connection per push."""

    def __init__(
        self,
        fingerprint: bytes,
        layout: KVLayout,
        *,
        token: str | None = None,
        connect_timeout: float = 2.0,
        chunk_delay: float = 0.0,
        limits: Limits = Limits(),  # noqa: B008 - frozen
    ) -> None:
        self.fingerprint = fingerprint
        self.layout = layout
        self.connect_timeout = connect_timeout
        self.chunk_delay = chunk_delay
        self.limits = limits
        self._token = token
        self._hashing = anyio.CapacityLimiter(2)
        self.sent = self.bytes_sent = self.chunks_sent = 0
        self.failed: Counter[str] = Counter()
        """Pushes that confirmed less than asked, by cause (``rejected_<reason>`` for a REJECT)."""

    async def push(
        self,
        destination: str,
        transfer_id: str,
        keys: Sequence[ChunkKey],
        chunks: Sequence[KVChunk],
        *,
        timeout: float,  # noqa: ASYNC109 - a deadline ends in a shorter push, which a caller's scope cannot give
    ) -> int:
        """Send ``chunks`` (of the leading ``keys``; the caller keeps their references) to the
        receiver at ``destination`` within ``timeout`` s: how many leading chunks it holds now,
        verified. A failure is logged and counted, and answers what the receiver confirmed (``0``
        when it confirmed nothing, or the connection broke before it could)."""
        count = min(len(keys), len(chunks))
        if not count:
            return 0
        self.sent += 1
        confirmed = 0
        try:
            with anyio.fail_after(timeout):
                confirmed = await self._push(destination, transfer_id, keys[:count], chunks[:count])
        except Exception as exc:
            cause = _cause(exc)
            self.failed[cause] += 1
            logger.warning("lmplug-pd: push %s to %s failed (%s: %s)", transfer_id, destination, cause, exc)
            return 0
        if confirmed < count:
            self.failed["partial"] += 1
            logger.warning(
                "lmplug-pd: push %s to %s: the receiver holds %d of %d chunks",
                transfer_id, destination, confirmed, count,
            )  # fmt: skip
        return confirmed

    async def _push(
        self, destination: str, transfer_id: str, keys: Sequence[ChunkKey], chunks: Sequence[KVChunk]
    ) -> int:
        layout = self.layout
        payloads = []
        for chunk in chunks:
            views = chunk_payload(chunk, layout)
            if views is None:
                break  # not this cache's KV in host memory: push the run before it
            payloads.append(views)
        host, port = parse_endpoint(destination)
        with anyio.fail_after(self.connect_timeout):
            sock = await connect(host, port)
        try:
            with anyio.fail_after(self.connect_timeout):
                limits = await self._hello(sock)
            count = min(len(payloads), limits.max_keys)
            if not count:
                return 0
            total = sum(view.nbytes for views in payloads[:count] for view in views)
            meta = {"xfer_id": transfer_id, "total_bytes": total}
            await send_buffers(sock, [encode(PushFrame.OPEN, _REQUEST, meta, lmpx.KEY_BYTES * count), *keys[:count]])
            header, reply = await self._reply(sock)
            if header.type is PushFrame.REJECT:
                reason = reply.get("reason")
                raise Rejected(reason if isinstance(reason, str) else "unknown")
            if header.type is not PushFrame.ACCEPT:
                raise ProtocolError(ErrorCode.MALFORMED, f"{header.type.name} answered OPEN")
            have = lmpx.meta_int(reply, "have", 0, count)
            await self._send_chunks(sock, keys, chunks, payloads, have, count)
            await send_buffers(sock, [encode(PushFrame.END, _REQUEST, {"sent": count - have})])
            header, reply = await self._reply(sock)
            if header.type is not PushFrame.DONE:
                raise ProtocolError(ErrorCode.MALFORMED, f"{header.type.name} answered END")
            return lmpx.meta_int(reply, "admitted", 0, count)
        finally:
            sock.close()

    async def _hello(self, sock: socket.socket) -> Limits:
        meta: dict[str, Any] = {"proto": 1, "role": "prefill", "fingerprint": self.fingerprint.hex()}
        if self._token is not None:
            meta["token"] = self._token
        await send_buffers(sock, [encode(PushFrame.HELLO, _REQUEST, meta)])
        header, reply = await self._reply(sock)
        if header.type is not PushFrame.HELLO_OK:
            raise ProtocolError(ErrorCode.MALFORMED, f"{header.type.name} answered HELLO")
        return lmpx.parse_limits(reply)

    async def _send_chunks(
        self,
        sock: socket.socket,
        keys: Sequence[ChunkKey],
        chunks: Sequence[KVChunk],
        payloads: Sequence[list[memoryview]],
        first: int,
        end: int,
    ) -> None:
        layout = self.layout
        failure: Exception | None = None
        async with anyio.create_task_group() as group:
            send_checksum, checksums = anyio.create_memory_object_stream[int](1)
            group.start_soon(self._checksums_ahead, payloads[first:end], send_checksum)
            try:
                with checksums:
                    for index in range(first, end):
                        if self.chunk_delay:
                            await anyio.sleep(self.chunk_delay)
                        tokens = chunks[index].num_tokens
                        checksum = await checksums.receive()
                        record = ChunkHeader.for_chunk(keys[index], layout, tokens, checksum).pack()
                        nbytes = layout.nbytes(tokens)
                        frame = encode(PushFrame.CHUNK, _REQUEST, {"index": index}, HEADER.size + nbytes)
                        await send_buffers(sock, [frame, record, *payloads[index]])
                        self.chunks_sent += 1
                        self.bytes_sent += nbytes
            except Exception as exc:  # raised below, outside the group, as itself
                failure = exc
                group.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _checksums_ahead(self, run: Sequence[list[memoryview]], sink: MemoryObjectSendStream[int]) -> None:
        """The payloads' checksums, one ahead of the writes: a large one is hashed in a worker
        thread (xxh3 releases the GIL) while the previous chunk is being written."""
        with sink:
            for views in run:
                if sum(view.nbytes for view in views) < _THREAD_CHECKSUM:
                    checksum = parts_checksum(views)
                else:
                    checksum = await anyio.to_thread.run_sync(parts_checksum, views, limiter=self._hashing)
                await sink.send(checksum)

    async def _reply(self, sock: socket.socket) -> tuple[PushHeader, dict[str, Any]]:
        """The receiver's next frame; an ERROR frame is raised as :class:`lmpx.ErrorReply`."""
        head = bytearray(FRAME.size)
        await recv_exactly(sock, memoryview(head))
        header = parse_header(head, self.limits, from_sender=False)
        meta = await _read_meta(sock, header)
        if header.type is PushFrame.ERROR:
            raise lmpx.parse_error(meta)
        return header, meta

    def statistics(self) -> dict[str, Any]:
        return {
            "transfers": self.sent,
            "chunks": self.chunks_sent,
            "bytes": self.bytes_sent,
            "failed": dict(self.failed),
        }


# ---------------------------------------------------------------------------- receiver


@dataclass(frozen=True, slots=True)
class ReceiverSettings:
    fingerprint: bytes
    layout: KVLayout
    host: str = "127.0.0.1"
    port: int = 0
    advertise: str | None = None
    max_inflight: int = 256 << 20
    admit_timeout: float = 5.0
    hold: float = 120.0
    idle_timeout: float = 5.0
    token: str | None = None
    max_keys: int = 4096


class _Budget:
    """Bytes of transfers being received at once: reserved at OPEN, returned when a transfer ends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed: anyio.Event | None = None

    async def reserve(self, nbytes: int, timeout: float) -> bool:  # noqa: ASYNC109 - a refusal, not an error
        """Reserve ``nbytes`` once they fit, waiting at most ``timeout`` s; whether it did."""
        with anyio.move_on_after(timeout):
            while self.used + nbytes > self.limit:
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
            self.used += nbytes
            return True
        return False

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()


@dataclass(slots=True)
class _Transfer:
    """One transfer's verified chunks, held (one reference each) until its hold ends."""

    xfer_id: str
    keys: list[ChunkKey] = field(default_factory=list)
    chunks: list[KVChunk] = field(default_factory=list)
    cause: str = ""
    """Why admissions stopped early (``corrupt``, ``no_memory``), or nothing."""


class PushReceiver:
    """The decode side: serves pushes while :meth:`run` runs (start it in a task group; cancel it
    to stop: transfers end, their holds are released). ``allocator`` and ``local`` are called
    per transfer, so a tier may create the receiver before its cache binds them.

    Besides admitting chunks into the local tiers, the receiver answers for what its transfers
    hold (:meth:`contains`, :meth:`retrieve`), so a cache without local tiers still serves them.
    """

    def __init__(
        self,
        settings: ReceiverSettings,
        allocator: Callable[[], ChunkAllocator],
        local: Callable[[], LocalTiers],
    ) -> None:
        self.settings = settings
        self._allocator = allocator
        self._local = local
        self._token = None if settings.token is None else settings.token.encode()
        self.limits = Limits(max_keys=settings.max_keys, max_bytes=settings.max_inflight)
        self._budget = _Budget(settings.max_inflight)
        self._endpoint: str | None = None
        self._group: TaskGroup | None = None
        self._seen: dict[str, float] = {}
        self._outcomes: dict[str, tuple[str, float]] = {}
        """transfer id -> (its state, when it got it), for :meth:`transfer_state`."""
        self._held: dict[str, _Transfer] = {}
        self._by_key: dict[ChunkKey, list[KVChunk]] = {}
        self._hashing = anyio.CapacityLimiter(2)
        self._stopping = False
        self.received = self.completed = self.chunks_admitted = self.chunks_present = self.bytes_received = 0
        self.rejected: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()

    @property
    def endpoint(self) -> str:
        """``host:port`` senders dial (``advertise``, or the bound address) once listening."""
        if self._endpoint is None:
            raise RuntimeError("the PD receiver is not listening")
        return self._endpoint

    @property
    def inflight_bytes(self) -> int:
        return self._budget.used

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen and receive until cancelled; ``task_status`` gets the endpoint."""
        settings = self.settings
        listener = open_listener(settings.host, settings.port)
        try:
            host, port = listener.getsockname()[:2]
            self._endpoint = settings.advertise or format_endpoint(host, port)
            async with anyio.create_task_group() as group:
                self._group = group
                task_status.started(self._endpoint)
                await accept_connections(listener, group, self._connection, "lmplug-pd")
        finally:
            self._stopping = True
            self._group = None
            listener.close()
            self.release_all()

    # ------------------------------------------------------------------ what transfers hold

    def contains(self, keys: Sequence[ChunkKey]) -> int:
        """Leading ``keys`` some transfer holds."""
        count = 0
        for key in keys:
            if key not in self._by_key:
                break
            count += 1
        return count

    def retrieve(self, keys: Sequence[ChunkKey]) -> list[KVChunk]:
        """The held chunks of the leading ``keys``, one new reference each."""
        run: list[KVChunk] = []
        for key in keys:
            held = self._by_key.get(key)
            if not held:
                break
            run.append(held[0].acquire())
        return run

    def evict(self, keys: Sequence[ChunkKey]) -> int:
        """Stop holding ``keys`` (their references go back); how many were held."""
        dropped = 0
        for key in set(keys):
            if self._by_key.pop(key, None) is None:
                continue
            dropped += 1
            for transfer in self._held.values():
                kept = [(k, c) for k, c in zip(transfer.keys, transfer.chunks, strict=True) if k != key]
                for k, chunk in zip(transfer.keys, transfer.chunks, strict=True):
                    if k == key:
                        chunk.release()
                transfer.keys = [k for k, _ in kept]
                transfer.chunks = [c for _, c in kept]
        return dropped

    def held_chunks(self) -> int:
        return sum(len(transfer.chunks) for transfer in self._held.values())

    def _hold(self, transfer: _Transfer, key: ChunkKey, chunk: KVChunk) -> None:
        transfer.keys.append(key)
        transfer.chunks.append(chunk)
        self._by_key.setdefault(key, []).append(chunk)

    def _release(self, xfer_id: str) -> None:
        transfer = self._held.pop(xfer_id, None)
        if transfer is None:
            return
        for key, chunk in zip(transfer.keys, transfer.chunks, strict=True):
            held = self._by_key.get(key)
            if held is not None:
                with contextlib.suppress(ValueError):
                    held.remove(chunk)
                if not held:
                    del self._by_key[key]
            chunk.release()

    def release_all(self) -> None:
        for xfer_id in list(self._held):
            self._release(xfer_id)

    async def _expire(self, xfer_id: str) -> None:
        await anyio.sleep(self.settings.hold)
        self._release(xfer_id)

    # ------------------------------------------------------------------ one connection

    async def _connection(self, sock: socket.socket) -> None:
        head = bytearray(FRAME.size)
        try:
            with anyio.fail_after(self.settings.idle_timeout):
                await self._hello(sock, head)
            while True:
                frame = await self._next_frame(sock, head)
                if frame is None:
                    break  # closed between transfers: a clean goodbye
                header, meta = frame
                if header.type is not PushFrame.OPEN:
                    raise ProtocolError(ErrorCode.MALFORMED, f"{header.type.name} outside a transfer")
                await self._transfer(sock, header, meta, head)
        except ProtocolError as exc:
            await self._refuse(sock, exc)
        except TimeoutError:
            await self._refuse(sock, ProtocolError(ErrorCode.TIMEOUT, "the sender went silent"))
        except (SocketClosed, OSError) as exc:
            logger.debug("lmplug-pd: a sender connection failed: %s", exc)
        finally:
            sock.close()

    async def _next_frame(self, sock: socket.socket, head: bytearray) -> tuple[PushHeader, dict[str, Any]] | None:
        """The next frame's header and meta within ``idle_timeout``; ``None`` when the sender
        closed the connection before it (a goodbye between transfers, a failure within one)."""
        with anyio.fail_after(self.settings.idle_timeout):
            while True:
                await anyio.wait_readable(sock)
                try:
                    first = sock.recv_into(head)
                except BlockingIOError:
                    continue
                break
            if not first:
                return None
            await recv_exactly(sock, memoryview(head)[first:])
            header = parse_header(head, self.limits, from_sender=True)
            return header, await _read_meta(sock, header)

    async def _refuse(self, sock: socket.socket, error: ProtocolError) -> None:
        """Tell the sender why (best effort); the caller then closes the connection."""
        logger.info("lmplug-pd: closing a sender connection: %s", error)
        with anyio.move_on_after(1.0, shield=True), contextlib.suppress(OSError, SocketClosed):
            await send_buffers(sock, [lmpx.encode_error(error.code, error.detail, _REQUEST)])
            # Unread input would reset the connection and could destroy the ERROR: say goodbye, drain.
            sock.shutdown(socket.SHUT_WR)
            await drain_until_closed(sock, memoryview(bytearray(_SCRATCH)), _DRAIN_LIMIT)

    async def _hello(self, sock: socket.socket, head: bytearray) -> None:
        await recv_exactly(sock, memoryview(head))
        header = parse_header(head, self.limits, from_sender=True)
        if header.type is not PushFrame.HELLO:
            raise ProtocolError(ErrorCode.HELLO_REQUIRED, f"{header.type.name} before HELLO")
        lmpx.check_hello(
            await _read_meta(sock, header),
            token=self._token,
            fingerprint=self.settings.fingerprint,
            mismatch=lambda ours, theirs: (
                f"fingerprint mismatch: this decode instance caches KV of fingerprint {ours}, the prefill "
                f"instance's is {theirs} (model name, KV layout, dtype, world size, rank, chunk size or hash differ)"
            ),
        )
        await send_buffers(sock, [encode(PushFrame.HELLO_OK, header.request_id, lmpx.encode_limits(self.limits))])

    # ------------------------------------------------------------------ one transfer

    def transfer_state(self, xfer_id: str) -> str | None:
        """``receiving``, ``completed`` (every chunk offered arrived), ``failed`` (it ended early:
        the verified prefix is held), ``rejected`` (refused at OPEN), or None (not opened here, or
        ended longer ago than ``hold``, at least a minute)."""
        found = self._outcomes.get(xfer_id)
        return found[0] if found is not None else None

    def _note(self, xfer_id: str, state: str) -> None:
        now = time.monotonic()
        horizon = now - max(self.settings.hold, 60.0)
        for known, (_, when) in list(self._outcomes.items()):
            if when >= horizon and len(self._outcomes) < _MAX_OUTCOMES:
                break  # insertion order is time order
            del self._outcomes[known]
        self._outcomes.pop(xfer_id, None)
        self._outcomes[xfer_id] = (state, now)

    async def _reject(self, sock: socket.socket, xfer_id: str, reason: RejectReason) -> None:
        if reason is not RejectReason.DUPLICATE:  # a duplicate says nothing of the first one
            self._note(xfer_id, "rejected")
        self.rejected[reason.value] += 1
        logger.warning("lmplug-pd: transfer %s refused: %s", xfer_id, reason.value)
        meta: dict[str, Any] = {"xfer_id": xfer_id, "reason": reason.value}
        if reason is RejectReason.BUSY:
            meta["retry_after_ms"] = 100
        await send_buffers(sock, [encode(PushFrame.REJECT, _REQUEST, meta)])

    def _seen_before(self, xfer_id: str) -> bool:
        """Whether ``xfer_id`` was accepted within ``hold`` seconds (a refused one may come again)."""
        horizon = time.monotonic() - max(self.settings.hold, 1.0)
        for seen, when in list(self._seen.items()):
            if when >= horizon:
                break  # insertion order is time order
            del self._seen[seen]
        return xfer_id in self._seen

    async def _transfer(self, sock: socket.socket, header: PushHeader, meta: dict[str, Any], head: bytearray) -> None:
        data = bytearray(header.data_length)  # at most max_keys keys: parse_header checked
        with anyio.fail_after(self.settings.idle_timeout):
            await recv_exactly(sock, memoryview(data))
        keys = lmpx.split_keys(data)
        xfer_id = xfer_id_of(meta)
        total = lmpx.meta_int(meta, "total_bytes", 0, 1 << 62)
        if self._stopping:
            return await self._reject(sock, xfer_id, RejectReason.SHUTTING_DOWN)
        if self._seen_before(xfer_id):
            return await self._reject(sock, xfer_id, RejectReason.DUPLICATE)
        if total > self._budget.limit:
            return await self._reject(sock, xfer_id, RejectReason.TOO_LARGE)
        if not await self._budget.reserve(total, self.settings.admit_timeout):
            return await self._reject(sock, xfer_id, RejectReason.BUSY)
        if self._seen_before(xfer_id):  # the same id, accepted while this one waited for room
            self._budget.release(total)
            return await self._reject(sock, xfer_id, RejectReason.DUPLICATE)
        self._seen[xfer_id] = time.monotonic()
        self._note(xfer_id, "receiving")
        self.received += 1
        transfer = self._held[xfer_id] = _Transfer(xfer_id)
        cause = "connection"
        try:
            local = self._local()
            present = await local.retrieve(keys)  # held for this transfer, not resent
            for key, chunk in zip(keys, present, strict=False):
                self._hold(transfer, key, chunk)
            have = len(transfer.chunks)
            self.chunks_present += have
            await send_buffers(sock, [encode(PushFrame.ACCEPT, _REQUEST, {"xfer_id": xfer_id, "have": have})])
            end = await self._receive(sock, head, transfer, keys, have, total, local)
            admitted = len(transfer.chunks)
            await send_buffers(sock, [encode(end, _REQUEST, {"xfer_id": xfer_id, "admitted": admitted})])
            cause = transfer.cause or ("" if admitted == len(keys) else "partial")
        except BaseException as exc:
            cause = _cause(exc) if isinstance(exc, Exception) else "cancelled"
            raise
        finally:
            self._budget.release(total)
            self._note(xfer_id, "failed" if cause else "completed")
            if cause:
                self.failed[cause] += 1
                logger.warning(
                    "lmplug-pd: transfer %s ended early (%s): %d of %d chunks held",
                    xfer_id, cause, len(transfer.chunks), len(keys),
                )  # fmt: skip
            else:
                self.completed += 1
            group = self._group
            if group is None or self._stopping or cause == "cancelled":  # shutting down
                self._release(xfer_id)
            else:
                group.start_soon(self._expire, xfer_id)

    async def _receive(
        self,
        sock: socket.socket,
        head: bytearray,
        transfer: _Transfer,
        keys: Sequence[ChunkKey],
        first: int,
        total: int,
        local: LocalTiers,
    ) -> PushFrame:
        """Receive CHUNK frames until END or ABORT (what DONE answers them with). The first
        record that fails verification, or finds no memory, stops admissions: later records
        are read and dropped."""
        layout, allocator = self.settings.layout, self._allocator()
        record_head = bytearray(HEADER.size)
        scratch = memoryview(bytearray(_SCRATCH))
        index, remaining, admitting = first, total, True
        while True:
            frame = await self._next_frame(sock, head)
            if frame is None:
                raise SocketClosed(SocketCode.TRUNCATED, "the sender closed the connection mid-transfer")
            header, meta = frame
            if header.type in (PushFrame.END, PushFrame.ABORT):
                if header.type is PushFrame.ABORT:
                    logger.info(
                        "lmplug-pd: transfer %s aborted by the sender: %s", transfer.xfer_id, meta.get("reason")
                    )
                return PushFrame.DONE
            if header.type is not PushFrame.CHUNK:
                raise ProtocolError(ErrorCode.MALFORMED, f"{header.type.name} in the middle of a transfer")
            if lmpx.meta_int(meta, "index", 0, len(keys) - 1) != index:
                raise ProtocolError(ErrorCode.MALFORMED, f"chunk {meta['index']} sent; chunk {index} expected")
            nbytes = header.data_length - HEADER.size
            remaining -= nbytes
            if remaining < 0:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"chunk records past the {total} bytes OPEN announced")
            index += 1
            if not admitting:
                with anyio.fail_after(self.settings.idle_timeout):
                    await skip_bytes(sock, header.data_length, scratch)
                continue
            with anyio.fail_after(self.settings.idle_timeout):
                await recv_exactly(sock, memoryview(record_head))
            chunk, payload_read = None, False
            try:
                record = ChunkHeader.unpack(memoryview(record_head))
                record.expect(keys[index - 1], layout, None)
                if record.tokens < 1 or record.nbytes != nbytes:
                    raise CorruptChunk(f"chunk {index - 1}: a record of {record.tokens} tokens in {nbytes} bytes")
                chunk = allocator.allocate(record.tokens)
                views = None if chunk is None else chunk_payload(chunk, layout)
                if chunk is None or views is None:
                    raise MemoryError(f"no memory for chunk {index - 1} of {record.tokens} tokens")
                with anyio.fail_after(self.settings.idle_timeout):
                    await recv_exactly_into(sock, views)
                payload_read = True
                if nbytes < _THREAD_CHECKSUM:
                    checksum = parts_checksum(views)
                else:
                    checksum = await anyio.to_thread.run_sync(parts_checksum, views, limiter=self._hashing)
                if checksum != record.checksum:
                    raise CorruptChunk(f"chunk {index - 1} ({keys[index - 1]}) failed its checksum")
            except (CorruptChunk, MemoryError) as exc:
                if chunk is not None:
                    chunk.release()
                admitting = False
                transfer.cause = "corrupt" if isinstance(exc, CorruptChunk) else "no_memory"
                logger.warning("lmplug-pd: transfer %s: %s; it and later chunks dropped", transfer.xfer_id, exc)
                if not payload_read:
                    with anyio.fail_after(self.settings.idle_timeout):
                        await skip_bytes(sock, nbytes, scratch)
                continue
            except BaseException:
                if chunk is not None:
                    chunk.release()
                raise
            self._hold(transfer, keys[index - 1], chunk)
            self.chunks_admitted += 1
            self.bytes_received += nbytes
            await local.store([keys[index - 1]], [chunk])

    def statistics(self) -> dict[str, Any]:
        return {
            "endpoint": self._endpoint,
            "transfers": self.received,
            "completed": self.completed,
            "rejected": dict(self.rejected),
            "failed": dict(self.failed),
            "chunks_admitted": self.chunks_admitted,
            "chunks_present": self.chunks_present,
            "bytes": self.bytes_received,
            "inflight_bytes": self._budget.used,
            "holds": len(self._held),
            "held_chunks": self.held_chunks(),
        }
