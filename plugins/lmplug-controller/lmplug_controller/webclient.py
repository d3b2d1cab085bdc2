"""A minimal HTTP/1.1 JSON client on anyio and h11: what the worker client needs to learn the
controller's ZeroMQ endpoint, with nothing beyond the controller's own dependencies."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import anyio
import h11

__all__ = ["HttpStatusError", "request_json", "split_url"]

_MAX_ANSWER = 64 << 20


class HttpStatusError(OSError):
    """The server answered with a status other than 200."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def split_url(url: str) -> tuple[str, int]:
    """``(host, port)`` of an ``http://host:port`` URL; :class:`ValueError` for anything else."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"the controller URL must look like http://HOST:PORT, not {url!r}")
    return parts.hostname, parts.port or 80


async def request_json(
    url: str, method: str, path: str, body: Any = None, *, token: str | None = None, within: float = 5.0
) -> Any:
    """Send one request to the server of ``url`` and decode its JSON answer.

    :class:`OSError` (:class:`HttpStatusError` for a non-200 status) or :class:`TimeoutError`
    (after ``within`` seconds) when it cannot be had.
    """
    host, port = split_url(url)
    headers = [("host", f"{host}:{port}"), ("connection", "close"), ("accept", "application/json")]
    payload = b"" if body is None else json.dumps(body).encode()
    if body is not None:
        headers += [("content-type", "application/json"), ("content-length", str(len(payload)))]
    if token is not None:
        headers.append(("authorization", f"Bearer {token}"))
    connection = h11.Connection(h11.CLIENT)
    with anyio.fail_after(within):
        async with await anyio.connect_tcp(host, port) as stream:
            data = connection.send(h11.Request(method=method, target=path, headers=headers))
            if payload:
                data += connection.send(h11.Data(data=payload))
            data += connection.send(h11.EndOfMessage())
            await stream.send(data)
            status = 0
            answer = bytearray()
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    try:
                        connection.receive_data(await stream.receive(65536))
                    except anyio.EndOfStream:
                        connection.receive_data(b"")
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    answer += event.data
                    if len(answer) > _MAX_ANSWER:
                        raise OSError(f"the answer of {url}{path} is longer than {_MAX_ANSWER} bytes")
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    try:
        decoded = json.loads(answer) if answer else None
    except ValueError:
        decoded = None
    if status != 200:
        message = decoded.get("error") if isinstance(decoded, dict) else bytes(answer[:200]).decode(errors="replace")
        raise HttpStatusError(status, str(message))
    if decoded is None:
        raise OSError(f"the answer of {url}{path} is not JSON")
    return decoded
