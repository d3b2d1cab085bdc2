"""Non-blocking socket I/O without copies, on asyncio and trio alike.

The helpers work on non-blocking stdlib sockets and wait for readiness through
``anyio.wait_readable``/``wait_writable``, and move values without copies: ``sendmsg`` of
the caller's memoryviews, ``recv_into`` straight into the caller's buffers. (anyio's
``SocketStream`` cannot: on asyncio it goes through a transport that copies both ways and
has no ``recv_into``.)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

import anyio

from lmplug_server.protocol import ErrorCode, ProtocolError

__all__ = ["connect", "drain_until_closed", "recv_exactly", "recv_exactly_into", "send_buffers", "skip_bytes"]

_IOV_MAX = 512
_LOW_WATER = 512 << 10


async def send_buffers(sock: socket.socket, buffers: Sequence[bytes | bytearray | memoryview]) -> int:
    """Send every byte of ``buffers`` with ``sendmsg`` (no joining); the byte count."""
    views = [memoryview(buffer).cast("B") for buffer in buffers if len(buffer)]
    total = sum(len(view) for view in views)
    first = 0
    while first < len(views):
        try:
            sent = sock.sendmsg(views[first : first + _IOV_MAX])
        except BlockingIOError:
            await anyio.wait_writable(sock)
            continue
        while sent:
            size = len(views[first])
            if sent >= size:
                sent -= size
                first += 1
            else:
                views[first] = views[first][sent:]
                sent = 0
    return total


async def _wait_for_bytes(sock: socket.socket, remaining: int) -> None:
    """Wait until the socket is readable; for a large remainder, until much of it has arrived.

    Each readiness wait is a trip through the event loop; asking the kernel (``SO_RCVLOWAT``)
    to report readable only once ``_LOW_WATER`` bytes are queued makes one trip move about a
    MiB instead of one loopback segment batch.
    """
    if remaining < 2 * _LOW_WATER:
        await anyio.wait_readable(sock)
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, _LOW_WATER)
    try:
        await anyio.wait_readable(sock)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


async def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket; :class:`ProtocolError` (TRUNCATED) if the peer closes first."""
    offset, size = 0, len(view)
    while offset < size:
        try:
            received = sock.recv_into(view[offset:])
        except BlockingIOError:
            await _wait_for_bytes(sock, size - offset)
            continue
        if not received:
            raise ProtocolError(ErrorCode.TRUNCATED, f"connection closed {offset} bytes into {size}")
        offset += received


async def recv_exactly_into(sock: socket.socket, views: Sequence[memoryview]) -> None:
    """Fill every view of ``views`` in order (``recvmsg_into``: one call can fill several)."""
    pending = [view for view in views if len(view)]
    total = sum(len(view) for view in pending)
    first = got_total = 0
    while first < len(pending):
        try:
            got = sock.recvmsg_into(pending[first : first + _IOV_MAX])[0]
        except BlockingIOError:
            await _wait_for_bytes(sock, total - got_total)
            continue
        if not got:
            raise ProtocolError(ErrorCode.TRUNCATED, f"connection closed {got_total} bytes into {total}")
        got_total += got
        while got:
            size = len(pending[first])
            if got >= size:
                got -= size
                first += 1
            else:
                pending[first] = pending[first][got:]
                got = 0


async def drain_until_closed(sock: socket.socket, scratch: memoryview, limit: int) -> None:
    """Read and drop input until the peer closes or ``limit`` bytes went by."""
    while limit > 0:
        try:
            received = sock.recv_into(scratch)
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        if not received:
            return
        limit -= received


async def skip_bytes(sock: socket.socket, count: int, scratch: memoryview) -> None:
    """Read and drop ``count`` bytes through ``scratch``."""
    while count:
        piece = scratch[: min(count, len(scratch))]
        await recv_exactly(sock, piece)
        count -= len(piece)


async def connect(host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket (``TCP_NODELAY``) connected to ``host:port``, trying each address;
    the last address's ``OSError`` when none answers."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    failure: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)  # noqa: FBT003
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock.connect(address)
            except BlockingIOError:
                await anyio.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error)) from None
            return sock
        except OSError as exc:
            sock.close()
            failure = exc
        except BaseException:
            sock.close()
            raise
    raise failure
