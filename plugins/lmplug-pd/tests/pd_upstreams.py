"""Upstream doubles for the proxy's tests: small HTTP servers standing in for vLLM's OpenAI server.

They are test doubles, not vLLM: each records what it received (path, headers, JSON body) and
answers as the test tells it to (JSON, SSE in chunks, an HTTP error, a hang, a death in the
middle of a stream). The end-to-end test with two real ``vllm serve`` processes replaces them.
Their answers name the instance and echo the prompt, so a test can tell which instance answered
which request and compare the bytes the client got with the bytes the instance sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
import h11
import httpx
from anyio.abc import ByteStream, SocketAttribute, TaskStatus

from lmplug.testing import free_port
from lmplug_controller import httpserver
from lmplug_controller.httpserver import HttpError, Response, ResponseAborted
from lmplug_pd.proxy import ProxyConfig

__all__ = [
    "Received",
    "Upstream",
    "client",
    "dead_url",
    "fast_config",
    "running_upstreams",
]


@dataclasses.dataclass(frozen=True)
class Received:
    """One request an upstream double received."""

    method: str
    path: str
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.raw)
        return value


class Upstream:
    """A vLLM stand-in. Set its attributes to change how it answers the next requests."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.url = ""
        self.received: list[Received] = []
        self.status = 200
        """An answer other than 200 is ``{"error": ...}`` with this status."""
        self.hang = False
        """Never answer (until the proxy gives up)."""
        self.events = 3
        """SSE events before ``data: [DONE]``, each sent as its own chunk."""
        self.die_after: int | None = None
        """Drop the connection after this many events (or, not streamed, after half the body)."""
        self.partial = False
        """With ``die_after``: send half of the next event before dropping the connection."""
        self.stall_after: int | None = None
        """Stop sending (without closing) after this many events."""
        self.release: anyio.Event | None = None
        """When set, a stream waits for this event after its first event."""
        self.disconnected = anyio.Event()
        """Set when sending a stream failed because the proxy closed the connection."""

    def answer(self, body: dict[str, Any]) -> bytes:
        """What this instance answers ``body`` when it is not streamed."""
        text = f"{self.name} answers {_prompt(body)}"
        return json.dumps(
            {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": text}]}
        ).encode()

    def event(self, body: dict[str, Any], position: int) -> bytes:
        """Event ``position`` of this instance's stream for ``body``."""
        chunk = {"id": "cmpl-1", "choices": [{"index": 0, "text": f"{self.name}:{_prompt(body)}:{position} "}]}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    def stream(self, body: dict[str, Any]) -> bytes:
        """Every byte of this instance's whole stream for ``body``."""
        return b"".join(self.event(body, position) for position in range(self.events)) + b"data: [DONE]\n\n"

    async def serve(self, stream: ByteStream) -> None:
        await httpserver.serve_connection(stream, self._answer, error=_error, max_body=64 << 20, idle_seconds=30.0)

    async def _answer(self, request: h11.Request, raw: bytes) -> Response:
        headers = {name.decode(): value.decode() for name, value in request.headers}
        path = urllib.parse.urlsplit(request.target.decode()).path
        self.received.append(Received(request.method.decode(), path, headers, raw))
        if self.hang:
            await anyio.sleep_forever()
        if self.status != 200:
            raise HttpError(self.status, f"{self.name} refuses with {self.status}")
        if request.method == b"GET":
            return Response(200, [("content-type", "application/json")], json.dumps({"data": [{"id": "m"}]}).encode())
        body = json.loads(raw)
        if body.get("stream"):
            return Response(200, [("content-type", "text/event-stream; charset=utf-8")], self._events(body))
        answer = self.answer(body)
        if self.die_after is not None:
            return Response(
                200, [("content-type", "application/json"), ("content-length", str(len(answer)))], _cut(answer)
            )
        return Response(200, [("content-type", "application/json")], answer)

    async def _events(self, body: dict[str, Any]) -> AsyncGenerator[bytes, None]:
        try:
            for position in range(self.events):
                if position == self.die_after:
                    if self.partial:
                        yield self.event(body, position)[:20]
                    await anyio.sleep(0.05)  # let the proxy pass on what it had
                    raise ResponseAborted("killed mid-stream")
                if position == self.stall_after:
                    await anyio.sleep_forever()
                yield self.event(body, position)
                if position == 0 and self.release is not None:
                    await self.release.wait()
                await anyio.sleep(0.01)
            yield b"data: [DONE]\n\n"
        except GeneratorExit:
            self.disconnected.set()
            raise


async def _cut(answer: bytes) -> AsyncGenerator[bytes, None]:
    yield answer[: len(answer) // 2]
    await anyio.sleep(0.05)
    raise ResponseAborted("killed mid-answer")


def _prompt(body: dict[str, Any]) -> str:
    if "prompt" in body:
        return str(body["prompt"])
    return str(body["messages"][-1]["content"])


def _error(status: int, message: str) -> Response:
    error = {"object": "error", "message": message, "type": "BadRequestError", "code": status}
    return Response(status, [("content-type", "application/json")], json.dumps(error).encode())


@contextlib.asynccontextmanager
async def running_upstreams(*names: str) -> AsyncIterator[list[Upstream]]:
    """Upstream doubles named ``names``, serving on free loopback ports until the block ends."""
    upstreams = [Upstream(name) for name in names]
    async with anyio.create_task_group() as group:
        for upstream in upstreams:
            await group.start(_listen, upstream)
        try:
            yield upstreams
        finally:
            group.cancel_scope.cancel()


async def _listen(upstream: Upstream, *, task_status: TaskStatus[None]) -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0) as listener:
        upstream.url = f"http://127.0.0.1:{listener.extra(SocketAttribute.local_port)}"
        task_status.started()
        await listener.serve(upstream.serve)


def dead_url() -> str:
    """The URL of an instance that is not there (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"


def fast_config(prefill: list[str], decode: list[str], **changes: Any) -> ProxyConfig:
    """A proxy on a free port that gives up on instances within a few seconds."""
    settings: dict[str, Any] = {"connect_timeout": 2.0, "prefill_timeout": 5.0, "decode_timeout": 5.0}
    return ProxyConfig(prefill=tuple(prefill), decode=tuple(decode), port=0, **{**settings, **changes})


def client(url: str) -> httpx.AsyncClient:
    """A client of the proxy (not the proxy's own client, but the same library)."""
    return httpx.AsyncClient(base_url=url, trust_env=False, timeout=30.0)
