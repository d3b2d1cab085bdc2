"""Calls in worker threads that the caller can cancel at once.

A call runs in a worker thread that the caller abandons when it is cancelled (the tier's
timeouts), so the caller returns at once. Before it returns, the call is marked cancelled
and its sockets are shut down, so the thread stops promptly, never reconnects or retries
for it, and never reads chunk memory the tier has since released. The thread writes into
the caller's parts only under the call's ``memory`` lock and only while the call is not
cancelled; the cancel takes that lock after the shutdown (which ends a blocked receive), so
no byte lands in the parts after the caller has gone. A connection left mid-reply is closed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

import redis

from lmplug_remote.redis.resp import PACKER

__all__ = ["Abandoned", "Call", "Connection", "SSLConnection", "current"]


class Call:
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
                raise Abandoned("the call was cancelled")
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


class Abandoned(Exception):
    """Raised in a worker thread whose caller has gone: no retry, no reconnect."""


current = threading.local()


class Connection(redis.Connection):
    """The zero-copy packer, and a socket that a cancelled call can shut down."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(command_packer=PACKER, **kwargs)  # type: ignore[no-untyped-call]

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        call: Call | None = getattr(current, "call", None)
        if call is not None:
            call.enter(self)  # refuses to (re)connect or send for a call that was cancelled
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


class SSLConnection(Connection, redis.SSLConnection):
    pass
