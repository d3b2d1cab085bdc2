"""A ZeroMQ socket driven from anyio, on asyncio and trio alike (no ``zmq.asyncio``).

One *pump* task owns the socket's file descriptor: it is the only task that ever waits on
it (trio refuses two waiters on one fd). ``sock.FD`` is edge-triggered and only says that
``ZMQ_EVENTS`` may have changed, so the pump reads ``ZMQ_EVENTS`` before every wait, and a
send from another task, which can consume the edge of a message that arrived meanwhile,
cuts the pump's wait short so that it looks again.

Sends never wait on the fd themselves: :meth:`Channel.send_nowait` fails when the socket's
queue is full, :meth:`Channel.send` waits for the pump to see room.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NoReturn

import anyio
import zmq

__all__ = ["Channel"]

_FAIRNESS = 64
"""Messages the pump delivers back to back before it yields to other tasks."""


class Channel:
    """One socket, one pump task, any number of sending tasks (all in one event loop)."""

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self.sock = sock
        self._fd = int(sock.getsockopt(zmq.FD))
        self._waiting: anyio.CancelScope | None = None
        self._room: anyio.Event | None = None

    async def pump(self, deliver: Callable[[list[bytes]], None]) -> NoReturn:
        """Receive forever, handing each multipart message to ``deliver`` (which must not block)."""
        sock = self.sock
        delivered = 0
        while True:
            events = int(sock.getsockopt(zmq.EVENTS))
            if events & zmq.POLLOUT and self._room is not None:
                self._room.set()
                self._room = None
            if events & zmq.POLLIN:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                deliver(frames)
                delivered += 1
                if delivered % _FAIRNESS == 0:
                    await anyio.lowlevel.checkpoint()
                continue
            with anyio.CancelScope() as scope:
                self._waiting = scope
                try:
                    await anyio.wait_readable(self._fd)
                finally:
                    self._waiting = None

    def send_nowait(self, frames: Sequence[bytes]) -> bool:
        """Queue one message; ``False`` (nothing sent) when the socket's queue is full."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            sent = False
        else:
            sent = True
        self._rouse()
        return sent

    async def send(self, frames: Sequence[bytes]) -> None:
        """Queue one message, waiting for room (the pump must be running)."""
        while True:
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                if self._room is None:
                    self._room = anyio.Event()
                room = self._room
                self._rouse()
                await room.wait()
            else:
                self._rouse()
                return

    def _rouse(self) -> None:
        """Make a waiting pump look at ``ZMQ_EVENTS`` again: the call that just returned may have
        taken the fd's edge for a message that arrived, or for room that opened."""
        if self._waiting is None:
            return
        wanted = zmq.POLLIN | (zmq.POLLOUT if self._room is not None else 0)
        if int(self.sock.getsockopt(zmq.EVENTS)) & wanted:
            self._waiting.cancel()
