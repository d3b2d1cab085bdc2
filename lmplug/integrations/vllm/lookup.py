"""The lookup channel: vLLM's scheduler asks the worker's cache what it can supply.

vLLM's scheduler runs in the EngineCore process, while the KV (and lmplug's L1) lives in
the worker process (one per tensor-parallel rank, each with its own socket). The worker
serves lookups on a Unix socket. A lookup moves no data: the cache answers from what its
tiers hold (``contains``) and leases the chunks host memory has; chunks that only a lower
tier holds are promoted in the background while the scheduler keeps scheduling. Until
they are in, the answer is *pending* (vLLM is told to ask again next step); past the load
deadline the answer is whatever has arrived. The lease then keeps the chunks in host
memory until the worker loads them straight into vLLM's blocks (or the scheduler says the
request no longer needs them).

Frames, little-endian::

    request:  b"LMPQ" u16 id_length u32 num_tokens u32 last_micros, the request id (UTF-8), int32 tokens
    reply:    b"LMPA" u32 hit_tokens (0xFFFFFFFF: pending, ask again)

    request:  b"LMPR" u16 id_length u32 0 u32 0, the request id  (release its lease)
    reply:    b"LMPA" u32 0

    request:  b"LMPS" u16 0 u32 0 u32 0                        (statistics)
    reply:    b"LMPJ" u32 length, a JSON object of that length

    request:  b"LMPT" u16 id_length u32 0 u32 0, a transfer id (UTF-8)  (a PD transfer's state)
    reply:    b"LMPA" u32 state (0: unknown, 1: receiving, 2: completed, 3: failed, 4: rejected)

    request:  b"LMPE" u16 name_length u32 length u32 0, an engine extension's name, its message
    reply:    b"LMPE" u32 length (0xFFFFFFFF: no answer), the extension's answer

``last_micros`` is how long the client's previous lookup took, as the scheduler saw it
(0: none), so that the worker's statistics show the scheduler's side of the channel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio
import numpy as np
from anyio.abc import ByteStream, TaskGroup, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from lmplug.core.cache import Cache
from lmplug.core.extension import EngineExtension
from lmplug.core.leases import Lease
from lmplug.core.reporting import ThrottledLog
from lmplug.core.tier import Capability

logger = logging.getLogger("lmplug.vllm")

REQUEST = struct.Struct("<4sHII")
REPLY = struct.Struct("<4sI")
MAX_TOKENS = 1 << 24
MAX_MESSAGE = 1 << 26
"""Largest engine-extension message or answer on the channel (64 MiB)."""
PENDING = 0xFFFFFFFF
LOOKUP_WAIT = 0.002
"""With a shared (network) tier in the stack, how long a lookup waits for its answer before saying
*pending* (the scheduler asks again next step). Stacks whose tiers answer ``contains`` from
memory answer at once: what host memory holds, or pending while lower tiers are read."""
LOAD_DEADLINE = 2.0
"""How long a request may wait for lower tiers; after that it is answered with what has arrived."""
MAX_REQUESTS = 4096
"""How many request ids may hold a lookup (and its lease) at once; a lookup beyond it is a miss,
so that a client that never releases cannot pin all of host memory or grow the table forever."""


TRANSFER_STATES: tuple[str | None, ...] = (None, "receiving", "completed", "failed", "rejected")
"""A PD transfer's states, by their number on the channel."""


def socket_path(engine_id: str, rank: int = 0, runtime_dir: Path | None = None) -> Path:
    """Where the worker of engine ``engine_id`` and tensor-parallel ``rank`` listens (both processes
    derive it), in ``runtime_dir`` (default ``LMPLUG_RUNTIME_DIR``, else ``/tmp``)."""
    safe = "".join(ch for ch in engine_id if ch.isalnum() or ch in "-_")[:40] or "default"
    suffix = f"-r{rank}" if rank else ""
    directory = runtime_dir if runtime_dir is not None else Path(os.environ.get("LMPLUG_RUNTIME_DIR", "/tmp"))
    return directory / f"lmplug-{safe}{suffix}.sock"


@dataclasses.dataclass(slots=True)
class _Entry:
    """One request's lookup: its tokens, the lease that answers it (once granted), and when to stop waiting."""

    tokens: np.ndarray
    deadline: float
    lease: Lease | None = None
    done: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    released: bool = False

    def answer(self, now: float) -> int | None:
        lease = self.lease
        if self.done.is_set() or now >= self.deadline:
            return lease.num_tokens if lease is not None else 0
        return None


class LookupServer:
    """Answers lookups on the cache's event loop and keeps the leases they take, by request id."""

    def __init__(
        self,
        cache: Cache,
        path: Path,
        extra: Callable[[], dict[str, object]] | None = None,
        *,
        extensions: Mapping[str, EngineExtension] | None = None,
        wait: float = LOOKUP_WAIT,
        deadline: float = LOAD_DEADLINE,
        max_requests: int = MAX_REQUESTS,
    ) -> None:
        self.cache = cache
        self.path = path
        self.extra = extra
        """Adds entries to :meth:`statistics` (the worker's transfer counters)."""
        self.extensions = dict(extensions or {})
        """The worker's engine extensions by name, which ``LMPE`` messages reach."""
        self.wait = wait
        self.deadline = deadline
        self.max_requests = max_requests
        self._refused = 0
        self._entries: dict[str, _Entry] = {}
        self._task_group: TaskGroup | None = None
        self._latencies: deque[int] = deque(maxlen=4096)  # the scheduler's round trips, in µs
        self._serve_times: deque[int] = deque(maxlen=4096)  # this side's share of them, in µs
        self._lookups = 0
        self._pending = 0
        self._warnings = ThrottledLog(logger)
        remote = {Capability.SHARED, Capability.PEER}
        self.disabled: str | None = None
        """Why lmplug is off in this engine (every lookup then answers 0), else None."""
        self._local = not any(remote & slot.tier.capabilities for slot in cache.pipeline.slots)
        """No tier's ``contains`` crosses the network (no shared or peer tier): lookups lease inline."""

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = await anyio.create_unix_listener(self.path)
        try:
            async with listener, anyio.create_task_group() as group:
                self._task_group = group
                task_status.started()
                await listener.serve(self._handle, task_group=group)
        finally:
            self._task_group = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.release_all()

    async def _handle(self, stream: ByteStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        async with stream:
            try:
                while True:
                    magic, id_length, count, micros = REQUEST.unpack(await reader.receive_exactly(REQUEST.size))
                    if magic == b"LMPS":
                        body = json.dumps(self.statistics()).encode()
                        await stream.send(REPLY.pack(b"LMPJ", len(body)) + body)
                        continue
                    if magic == b"LMPR" and count == 0:
                        self.release((await reader.receive_exactly(id_length)).decode())
                        await stream.send(REPLY.pack(b"LMPA", 0))
                        continue
                    if magic == b"LMPT" and count == 0:
                        state = await self.transfer_state((await reader.receive_exactly(id_length)).decode())
                        await stream.send(REPLY.pack(b"LMPA", TRANSFER_STATES.index(state)))
                        continue
                    if magic == b"LMPE" and count <= MAX_MESSAGE and micros == 0:
                        name = (await reader.receive_exactly(id_length)).decode()
                        answer = await self.extension(name, bytes(await reader.receive_exactly(count)))
                        if answer is None or len(answer) > MAX_MESSAGE:
                            await stream.send(REPLY.pack(b"LMPE", PENDING))
                        else:
                            await stream.send(REPLY.pack(b"LMPE", len(answer)) + answer)
                        continue
                    if magic != b"LMPQ" or count > MAX_TOKENS:
                        logger.warning("lmplug lookup channel: malformed request; closing the connection")
                        return
                    if micros:
                        self._latencies.append(micros)
                    request_id = (await reader.receive_exactly(id_length)).decode()
                    raw = await reader.receive_exactly(4 * count) if count else b""
                    started = time.perf_counter()
                    hit = await self.lookup(request_id, np.frombuffer(raw, dtype="<i4"))
                    self._serve_times.append(int((time.perf_counter() - started) * 1e6))
                    await stream.send(REPLY.pack(b"LMPA", PENDING if hit is None else hit))
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, UnicodeDecodeError):
                return

    async def extension(self, name: str, message: bytes) -> bytes | None:
        """Engine extension ``name``'s answer to its scheduler side's ``message``; None when lmplug is
        off here, no such extension runs here, or it failed (logged)."""
        extension = self.extensions.get(name)
        if self.disabled is not None or extension is None:
            return None
        try:
            return await extension.answer(message)
        except Exception as exc:
            self._warnings.report(("extension", name), "lmplug engine extension %r failed to answer: %s", name, exc)
            return None

    async def transfer_state(self, transfer_id: str) -> str | None:
        """A PD transfer's state at this cache's receiver (see ``Cache.transfer_state``); None on
        failure. With lmplug off in this engine, ``failed``: nothing it receives would load."""
        if self.disabled is not None:
            return "failed"
        try:
            return await self.cache.transfer_state(transfer_id)
        except Exception as exc:
            self._warnings.report("transfer_state", "lmplug lookup channel: transfer state failed: %s", exc)
            return None

    async def lookup(self, request_id: str, tokens: np.ndarray) -> int | None:
        """Leading tokens leased for ``request_id``, or ``None`` while lower tiers are still being read.

        Asking again for the same tokens answers from the same lease (vLLM may ask more than
        once); other tokens under the same id start over.
        """
        if self.disabled is not None:
            return 0
        now = anyio.current_time()
        entry = self._entries.get(request_id)
        if entry is not None and np.array_equal(entry.tokens, tokens):
            return self._answer(request_id, entry, now)
        self.release(request_id)
        self._lookups += 1
        if len(self._entries) >= self.max_requests and not self._make_room():
            self._refused += 1
            self._warnings.report(
                "full",
                "lmplug lookup channel: %d requests hold lookups (the limit); answering a miss until some are released",
                len(self._entries),
            )
            return 0
        entry = self._entries[request_id] = _Entry(tokens.copy(), now + self.deadline)
        group = self._task_group
        if group is None:
            await self._fill(entry)
        elif self._local:
            # Every tier answers `contains` from memory: lease inline, and answer at once (pending
            # while lower tiers are read) without a task switch or a wait.
            if await self._grant(entry):
                group.start_soon(self._until_ready, entry)
        else:
            group.start_soon(self._fill, entry)
            with anyio.move_on_after(self.wait):
                await entry.done.wait()
        return self._answer(request_id, entry, anyio.current_time())

    def _make_room(self) -> bool:
        """Forget answered lookups whose lease is gone (expired): whether there is room now."""
        for request_id, entry in list(self._entries.items()):
            if entry.done.is_set() and (entry.lease is None or not entry.lease.active):
                self.release(request_id)
        return len(self._entries) < self.max_requests

    def _answer(self, request_id: str, entry: _Entry, now: float) -> int | None:
        answer = entry.answer(now)
        if answer is None:
            self._pending += 1
        elif answer == 0:
            self.release(request_id)
        return answer

    async def _fill(self, entry: _Entry) -> None:
        if await self._grant(entry):
            await self._until_ready(entry)

    async def _grant(self, entry: _Entry) -> bool:
        """Lease ``entry``'s tokens; whether lower tiers are still to arrive (else ``entry`` is done)."""
        try:
            lease = await self.cache.start_lease(entry.tokens)
        except Exception as exc:  # a cache failure (or bad tokens) is a miss, never a stuck request
            self._failed(exc)
            entry.done.set()
            return False
        if entry.released:  # released meanwhile (the request finished or was aborted)
            lease.release()
        else:
            entry.lease = lease
        if lease.ready.is_set():
            entry.done.set()
            return False
        return True

    async def _until_ready(self, entry: _Entry) -> None:
        assert entry.lease is not None
        try:
            await entry.lease.ready.wait()
        finally:
            entry.done.set()

    def _failed(self, exc: Exception) -> None:
        name = type(exc).__name__
        self._warnings.report(name, "lmplug lookup failed (%s: %s); treating it as a miss", name, exc)

    def lease(self, request_id: str) -> Lease | None:
        """The lease a lookup took for ``request_id`` (what the worker loads from), if any."""
        entry = self._entries.get(request_id)
        return entry.lease if entry is not None else None

    def statistics(self) -> dict[str, object]:
        """The cache's statistics, the leases held for the scheduler and the scheduler's lookup latency."""
        stats = self.cache.statistics()
        latencies = sorted(self._latencies)
        serve_times = sorted(self._serve_times)

        def quantile(q: float, values: list[int]) -> float | None:
            return values[min(len(values) - 1, int(q * len(values)))] / 1000 if values else None

        return {
            "disabled": self.disabled,
            "requests_with_leases": sum(1 for entry in self._entries.values() if entry.lease is not None),
            "leases": stats.leases,
            "allocator": dataclasses.asdict(stats.allocator),
            "tiers": [dataclasses.asdict(tier) for tier in stats.tiers],
            "lookups": {
                "count": self._lookups,
                "refused_full": self._refused,
                "pending_answers": self._pending,
                "samples": len(latencies),
                "p50_ms": quantile(0.5, latencies),
                "p99_ms": quantile(0.99, latencies),
                "max_ms": latencies[-1] / 1000 if latencies else None,
                "served_p50_ms": quantile(0.5, serve_times),
                "served_p99_ms": quantile(0.99, serve_times),
            },
            **(self.extra() if self.extra is not None else {}),
        }

    def release(self, request_id: str) -> None:
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            entry.released = True
            if entry.lease is not None:
                entry.lease.release()

    def release_all(self) -> None:
        for request_id in list(self._entries):
            self.release(request_id)


class LookupClient:
    """The scheduler's end: a blocking client that treats any failure as a miss."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._socket: socket.socket | None = None
        self._warnings = ThrottledLog(logger)
        self._last_micros = 0

    def lookup(self, request_id: str, tokens: list[int]) -> int | None:
        """Leading tokens the worker's cache holds (and has leased for ``request_id``), ``None`` when
        the answer is pending (ask again later); 0 on any failure."""
        started = time.perf_counter()
        encoded = request_id.encode()
        header = REQUEST.pack(b"LMPQ", len(encoded), len(tokens), min(self._last_micros, 0xFFFFFFFF))
        hit = self._ask(header + encoded + np.asarray(tokens, dtype="<i4").tobytes())
        self._last_micros = max(1, int((time.perf_counter() - started) * 1e6))
        return None if hit == PENDING else hit

    def release(self, request_id: str) -> None:
        """Drop the lease a lookup took for ``request_id`` (the request finished or was aborted)."""
        encoded = request_id.encode()
        self._ask(REQUEST.pack(b"LMPR", len(encoded), 0, 0) + encoded)

    def transfer_state(self, transfer_id: str) -> str | None:
        """A PD transfer's state at the worker's receiver: ``receiving``, ``completed``, ``failed``,
        ``rejected``, or None (unknown, or the channel failed)."""
        encoded = transfer_id.encode()
        code = self._ask(REQUEST.pack(b"LMPT", len(encoded), 0, 0) + encoded)
        return TRANSFER_STATES[code] if 0 <= code < len(TRANSFER_STATES) else None

    def extension(self, name: str, message: bytes) -> bytes | None:
        """Engine extension ``name``'s answer from the worker, or None (no answer, or the channel failed)."""
        encoded = name.encode()
        try:
            sock = self._connect()
            sock.sendall(REQUEST.pack(b"LMPE", len(encoded), len(message), 0) + encoded + message)
            magic, length = REPLY.unpack(self._receive(sock, REPLY.size))
            if magic != b"LMPE" or (length > MAX_MESSAGE and length != PENDING):
                raise ConnectionError("malformed reply on the lmplug lookup channel")
            return None if length == PENDING else bytes(self._receive(sock, length))
        except OSError as exc:
            self.close()
            self._warnings.report(type(exc).__name__, "lmplug lookup channel failed (%s); treating it as a miss", exc)
            return None

    def _ask(self, frame: bytes) -> int:
        try:
            sock = self._connect()
            sock.sendall(frame)
            magic, hit = REPLY.unpack(self._receive(sock, REPLY.size))
            if magic != b"LMPA":
                raise ConnectionError("malformed reply on the lmplug lookup channel")
            return int(hit)
        except OSError as exc:
            self.close()
            self._warnings.report(type(exc).__name__, "lmplug lookup channel failed (%s); treating it as a miss", exc)
            return 0

    def statistics(self) -> dict[str, object]:
        """The worker's cache statistics (raises ``OSError`` when the worker cannot be reached)."""
        sock = self._connect()
        try:
            sock.sendall(REQUEST.pack(b"LMPS", 0, 0, 0))
            magic, length = REPLY.unpack(self._receive(sock, REPLY.size))
            if magic != b"LMPJ":
                raise ConnectionError("malformed reply on the lmplug lookup channel")
            result: dict[str, object] = json.loads(self._receive(sock, length))
            return result
        except OSError:
            self.close()
            raise

    @staticmethod
    def _receive(sock: socket.socket, size: int) -> bytearray:
        data = bytearray(size)
        view = memoryview(data)
        while view:
            received = sock.recv_into(view)
            if not received:
                raise ConnectionError("the lmplug worker closed the lookup channel")
            view = view[received:]
        return data

    def _connect(self) -> socket.socket:
        if self._socket is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
            except OSError:
                sock.close()
                raise
            self._socket = sock
        return self._socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
