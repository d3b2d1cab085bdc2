"""The lookup channel: vLLM's scheduler asks the worker's cache what it can supply.

vLLM's scheduler runs in the EngineCore process, while the KV (and lmplug's L1) lives in
the worker process. The worker serves lookups on a Unix socket; a lookup also takes a
lease, so the chunks it promises stay in host memory until the worker loads them (or
the scheduler says the request no longer needs them).

Frames, little-endian::

    request:  b"LMPQ" u16 id_length u32 num_tokens, the request id (UTF-8), int32 tokens
    reply:    b"LMPA" u32 hit_tokens

    request:  b"LMPR" u16 id_length u32 0, the request id  (release its lease)
    reply:    b"LMPA" u32 0

    request:  b"LMPS" u16 0 u32 0                        (statistics)
    reply:    b"LMPJ" u32 length, a JSON object of that length
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
from collections.abc import Callable
from pathlib import Path

import anyio
import numpy as np
from anyio.abc import ByteStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from lmplug.core.cache import Cache
from lmplug.core.leases import Lease

logger = logging.getLogger("lmplug.vllm")

REQUEST = struct.Struct("<4sHI")
REPLY = struct.Struct("<4sI")
MAX_TOKENS = 1 << 24


def socket_path(engine_id: str) -> Path:
    """Where the worker of engine ``engine_id`` listens (both processes derive the same path)."""
    safe = "".join(ch for ch in engine_id if ch.isalnum() or ch in "-_")[:40] or "default"
    return Path(os.environ.get("LMPLUG_RUNTIME_DIR", "/tmp")) / f"lmplug-{safe}.sock"


class LookupServer:
    """Answers lookups on the cache's event loop and keeps the leases they take, by request id."""

    def __init__(self, cache: Cache, path: Path, extra: Callable[[], dict[str, object]] | None = None) -> None:
        self.cache = cache
        self.path = path
        self.extra = extra
        """Adds entries to :meth:`statistics` (the worker's transfer counters)."""
        self.leases: dict[str, Lease] = {}

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = await anyio.create_unix_listener(self.path)
        task_status.started()
        try:
            async with listener:
                await listener.serve(self._handle)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.release_all()

    async def _handle(self, stream: ByteStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        async with stream:
            try:
                while True:
                    magic, id_length, count = REQUEST.unpack(await reader.receive_exactly(REQUEST.size))
                    if magic == b"LMPS":
                        body = json.dumps(self.statistics()).encode()
                        await stream.send(REPLY.pack(b"LMPJ", len(body)) + body)
                        continue
                    if magic == b"LMPR" and count == 0:
                        self.release((await reader.receive_exactly(id_length)).decode())
                        await stream.send(REPLY.pack(b"LMPA", 0))
                        continue
                    if magic != b"LMPQ" or count > MAX_TOKENS:
                        logger.warning("lmplug lookup channel: malformed request; closing the connection")
                        return
                    request_id = (await reader.receive_exactly(id_length)).decode()
                    raw = await reader.receive_exactly(4 * count) if count else b""
                    tokens = np.frombuffer(raw, dtype="<i4")
                    hit = await self.lookup(request_id, tokens)
                    await stream.send(REPLY.pack(b"LMPA", hit))
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, UnicodeDecodeError):
                return

    async def lookup(self, request_id: str, tokens: np.ndarray) -> int:
        self.release(request_id)
        lease = await self.cache.lease(tokens)
        if lease.num_tokens:
            self.leases[request_id] = lease
        else:
            lease.release()
        return lease.num_tokens

    def statistics(self) -> dict[str, object]:
        """The cache's statistics plus the leases held for the scheduler (for operators and leak checks)."""
        stats = self.cache.statistics()
        return {
            "requests_with_leases": len(self.leases),
            "leases": stats.leases,
            "allocator": dataclasses.asdict(stats.allocator),
            "tiers": [dataclasses.asdict(tier) for tier in stats.tiers],
            **(self.extra() if self.extra is not None else {}),
        }

    def release(self, request_id: str) -> None:
        lease = self.leases.pop(request_id, None)
        if lease is not None:
            lease.release()

    def release_all(self) -> None:
        for request_id in list(self.leases):
            self.release(request_id)


class LookupClient:
    """The scheduler's end: a blocking client that treats any failure as a miss."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._socket: socket.socket | None = None
        self._warned_at = -1e9

    def lookup(self, request_id: str, tokens: list[int]) -> int:
        """Leading tokens the worker's cache holds (and has leased for ``request_id``); 0 on any failure."""
        encoded = request_id.encode()
        frame = REQUEST.pack(b"LMPQ", len(encoded), len(tokens)) + encoded + np.asarray(tokens, dtype="<i4").tobytes()
        return self._ask(frame)

    def release(self, request_id: str) -> None:
        """Drop the lease a lookup took for ``request_id`` (the request finished or was aborted)."""
        encoded = request_id.encode()
        self._ask(REQUEST.pack(b"LMPR", len(encoded), 0) + encoded)

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
            now = time.monotonic()
            if now - self._warned_at > 60:
                self._warned_at = now
                logger.warning("lmplug lookup channel failed (%s); treating it as a miss", exc)
            return 0

    def statistics(self) -> dict[str, object]:
        """The worker's cache statistics (raises ``OSError`` when the worker cannot be reached)."""
        sock = self._connect()
        try:
            sock.sendall(REQUEST.pack(b"LMPS", 0, 0))
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
