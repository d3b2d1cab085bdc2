"""One HTTP/1.1 connection served with h11 on an anyio byte stream: keep-alive, a body limit, an
idle timeout, and answers that are either whole bodies or streamed chunk by chunk.

The controller's API (:mod:`lmplug_controller.http`) and lmplug-pd's proxy serve with it; each
passes its own ``answer`` (the routing) and ``error`` (how its error bodies look).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

import anyio
import h11
from anyio.abc import ByteStream

__all__ = ["Answer", "ErrorAnswer", "HttpError", "Response", "ResponseAborted", "StreamedBody", "serve_connection"]

_RECEIVE = 65536
_LINGER_SECONDS = 1.0


class HttpError(Exception):
    """An error answer: its status and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ResponseAborted(Exception):
    """Raised by a streamed body to stop where it is: the connection is closed without ending
    the response, so the client sees it cut short rather than complete."""


class StreamedBody(Protocol):
    """A body sent as it is produced: an async generator of bytes, or any object that iterates
    asynchronously over bytes and has ``aclose()`` (always awaited once the response ends,
    however it ends, even if the iteration never began)."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Response:
    """What to answer. A ``bytes`` body is sent with its ``content-length`` (added unless
    ``headers`` have one); a generator body is sent chunk by chunk as it yields (chunked unless
    ``headers`` give the length)."""

    status: int
    headers: Sequence[tuple[str, str]]
    body: bytes | StreamedBody = b""


Answer = Callable[[h11.Request, bytes], Awaitable[Response]]
"""The request and its whole body → the response; :class:`HttpError` for an error answer."""
ErrorAnswer = Callable[[int, str], Response]
"""A status and a message → the response that says so."""


async def serve_connection(
    stream: ByteStream, answer: Answer, *, error: ErrorAnswer, max_body: int, idle_seconds: float
) -> None:
    """Answer the requests of one connection until it closes, idles for ``idle_seconds`` between
    requests, sends a body longer than ``max_body`` (413) or breaks HTTP (400)."""
    connection = h11.Connection(h11.SERVER)
    async with stream:
        try:
            while True:
                request: tuple[h11.Request, bytes] | None = None
                with anyio.move_on_after(idle_seconds):
                    request = await _read_request(connection, stream, max_body)
                if request is None:
                    return
                try:
                    response = await answer(*request)
                except HttpError as exc:
                    response = error(exc.status, exc.message)
                await _send(connection, stream, response, head=request[0].method == b"HEAD")
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except HttpError as exc:  # while reading: the request is unusable
            if connection.our_state is h11.SEND_RESPONSE:
                await _send(connection, stream, error(exc.status, exc.message), head=False)
                await _linger(stream)
        except h11.RemoteProtocolError as exc:
            if connection.our_state is h11.SEND_RESPONSE:
                await _send(connection, stream, error(400, f"bad HTTP request: {exc}"), head=False)
        except (ResponseAborted, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
            return


async def _read_request(
    connection: h11.Connection, stream: ByteStream, max_body: int
) -> tuple[h11.Request, bytes] | None:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(_RECEIVE)
            except anyio.EndOfStream:
                data = b""
            connection.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
            length = dict(event.headers).get(b"content-length")
            if length is not None and int(length) > max_body:  # h11 has checked it is a number
                raise HttpError(413, f"the body is longer than {max_body} bytes")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                raise HttpError(413, f"the body is longer than {max_body} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None  # h11 gives the Request before its EndOfMessage
            return request, bytes(body)
        else:  # ConnectionClosed, or PAUSED
            return None


async def _send(connection: h11.Connection, stream: ByteStream, response: Response, *, head: bool) -> None:
    headers = list(response.headers)
    body = response.body
    if isinstance(body, bytes):
        if not any(name.lower() == "content-length" for name, _ in headers):
            headers.append(("content-length", str(len(body))))
        data = connection.send(h11.Response(status_code=response.status, headers=headers))
        data += connection.send(h11.Data(data=body)) if body and not head else b""
        data += connection.send(h11.EndOfMessage())
        await stream.send(data)
        return
    async with contextlib.aclosing(body) as chunks:
        await stream.send(connection.send(h11.Response(status_code=response.status, headers=headers)))
        async for chunk in chunks:
            if chunk and not head:
                await stream.send(connection.send(h11.Data(data=chunk)))
    await stream.send(connection.send(h11.EndOfMessage()))


async def _linger(stream: ByteStream) -> None:
    """After an early answer (413), read what the client still sends for a moment before closing:
    closing with unread data resets the connection, and the client might not see the answer."""
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        await stream.send_eof()
        with anyio.move_on_after(_LINGER_SECONDS):
            while await stream.receive(_RECEIVE):
                pass
