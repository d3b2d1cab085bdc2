"""The PD proxy: an OpenAI-compatible front for prefill and decode vLLM instances.

Each ``POST /v1/completions`` or ``/v1/chat/completions`` goes first to a prefill instance (one
output token, not streamed, with the prefill's PD parameters), then to a decode instance (the
client's body with the decode's PD parameters), whose answer is relayed to the client as it
arrives. Instances are taken round-robin. A prefill that fails or times out only costs the
decode instance a full prefill (the request goes there without PD parameters); a decode that
fails is a 502 naming it. h11 on anyio serves clients, httpx calls upstreams: asyncio or trio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

import anyio
import h11
import httpx
from anyio.abc import ByteStream, SocketAttribute, TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lmplug_controller import httpserver
from lmplug_controller.httpserver import HttpError, Response, ResponseAborted
from lmplug_pd.metrics import ProxyMetrics
from lmplug_pd.params import ParamsError, decode_body, prefill_body

__all__ = ["DEFAULT_PORT", "GENERATE_ROUTES", "Proxy", "ProxyConfig", "base_url", "open_proxy"]

logger = logging.getLogger("lmplug.pd.proxy")

DEFAULT_PORT = 8100
"""The port the proxy listens on unless told otherwise."""
GENERATE_ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}
"""The paths that go through prefill and decode, with their ``route`` label in the metrics."""
IDLE_SECONDS = 60.0
"""A kept-alive client connection with no new request for this long is closed."""
_CLOSE_SECONDS = 1.0
"""The longest closing an upstream answer may take (shielded from cancellation)."""

_FORWARDED = frozenset({b"authorization", b"accept"})
"""Client request headers passed on to both legs (an API key the instances check)."""
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding"}
    | {"upgrade"}
)
_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "method_not_allowed",
    413: "request_too_large",
    502: "upstream_error",
    503: "unavailable",
}


def base_url(text: str) -> str:
    """``http://host:port`` (or https) of an instance, without a trailing slash;
    :class:`ValueError` for anything else (a path, a query, another scheme)."""
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"an instance is an http://HOST:PORT URL, not {text!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"give the instance's base URL (http://HOST:PORT, no path), not {text!r}")
    return f"{parts.scheme}://{parts.netloc}"


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    """What the proxy serves and how long it waits; :class:`ValueError` for values out of range.

    Times are seconds. ``push_deadline`` and ``decode_wait`` are sent to the instances (as
    ``deadline_ms`` and ``wait_ms``): how long the prefill may push the KV, and how long the decode
    waits for it before computing the prompt itself. ``receivers`` maps a decode instance's URL to
    its PD receiver (``HOST:PORT`` of the ``pd`` tier in its lmplug stack), where the prefill
    pushes; a decode instance without one is told not to wait (``wait_ms: 0``): it computes the
    prompt itself.
    """

    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    receivers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    connect_timeout: float = 5.0
    prefill_timeout: float = 60.0
    decode_timeout: float = 600.0
    push_deadline: float = 10.0
    decode_wait: float = 10.0
    max_body: int = 32 << 20
    drain_timeout: float = 10.0

    def __post_init__(self) -> None:
        for role, urls in (("prefill", self.prefill), ("decode", self.decode)):
            if not urls:
                raise ValueError(f"at least one {role} instance is needed")
            for url in urls:
                if base_url(url) != url:
                    raise ValueError(f"{role} instance {url!r}: write it as {base_url(url)!r}")
        for url, receiver in self.receivers.items():
            if url not in self.decode:
                raise ValueError(f"receiver {receiver!r} is for {url!r}, which is not a decode instance")
            host, _, port = receiver.rpartition(":")
            if not host or "/" in host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise ValueError(f"decode instance {url}: its PD receiver must be HOST:PORT, not {receiver!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, not {self.port}")
        for name in ("connect_timeout", "prefill_timeout", "decode_timeout", "push_deadline", "decode_wait"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {getattr(self, name)}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be 0 or more seconds, not {self.drain_timeout}")
        if self.max_body < 1:
            raise ValueError(f"max_body must be a positive number of bytes, not {self.max_body}")


class Proxy:
    """One proxy: :meth:`serve` runs it until :meth:`shutdown`; :meth:`answer` is its routing."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.metrics = ProxyMetrics(config.prefill, config.decode)
        self.metrics.in_flight.set_function(lambda: self._active)
        self.url: str | None = None
        """``http://host:port`` once serving."""
        self._prefills = itertools.cycle(config.prefill)
        self._decodes = itertools.cycle(config.decode)
        self._model_sources = itertools.cycle(config.decode)  # apart, so /v1/models leaves the pairs alone
        self._client: httpx.AsyncClient | None = None
        self._active = 0
        self._idle: anyio.Event | None = None
        self._stopping: anyio.Event | None = None
        self._stop_requested = False

    # ------------------------------------------------------------------ running

    async def serve(self, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until :meth:`shutdown` or cancellation; report the URL through ``task_status``.

        On shutdown the listener closes at once, new requests on open connections get 503, and
        requests in flight have ``drain_timeout`` seconds to finish before they are cancelled.
        """
        config = self.config
        self._stopping = anyio.Event()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, trust_env=False, follow_redirects=False) as client:
            self._client = client
            listener = await anyio.create_tcp_listener(local_host=config.host, local_port=config.port)
            async with anyio.create_task_group() as connections:
                async with listener, anyio.create_task_group() as accepting:
                    address = listener.extra(SocketAttribute.local_address)
                    assert isinstance(address, tuple)
                    host = f"[{address[0]}]" if ":" in str(address[0]) else address[0]
                    self.url = f"http://{host}:{address[1]}"
                    accepting.start_soon(listener.serve, self._serve_connection, connections)
                    logger.info("lmplug-pd-proxy: serving on %s", self.url)
                    task_status.started(self.url)
                    if not self._stop_requested:
                        await self._stopping.wait()
                    accepting.cancel_scope.cancel()
                with anyio.move_on_after(config.drain_timeout):
                    while self._active:
                        self._idle = anyio.Event()
                        await self._idle.wait()
                connections.cancel_scope.cancel()
            self._client = None

    def shutdown(self) -> None:
        """Stop :meth:`serve`: stop accepting, let what is in flight finish (idempotent)."""
        self._stop_requested = True
        if self._stopping is not None:
            self._stopping.set()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        return self._stop_requested

    def health(self) -> dict[str, Any]:
        """What ``GET /health`` answers."""
        return {
            "ok": not self._stop_requested,
            "prefill": list(self.config.prefill),
            "decode": list(self.config.decode),
            "in_flight": self._active,
        }

    async def _serve_connection(self, stream: ByteStream) -> None:
        await httpserver.serve_connection(
            stream, self.answer, error=_error, max_body=self.config.max_body, idle_seconds=IDLE_SECONDS
        )

    # ------------------------------------------------------------------ routing

    async def answer(self, request: h11.Request, body: bytes) -> Response:
        """The answer to one client request; :class:`HttpError` for the proxy's own errors."""
        method = request.method.decode("ascii", "replace")
        path = urllib.parse.urlsplit(request.target.decode("ascii", "replace")).path
        route = GENERATE_ROUTES.get(path)
        if route is None:
            return await self._other(method, path, request)
        if method != "POST":
            raise HttpError(405, f"{path} takes POST, not {method}")
        try:
            response = await self._generate(path, request, body)
        except HttpError as exc:
            self.metrics.requests.labels(route, str(exc.status)).inc()
            raise
        self.metrics.requests.labels(route, str(response.status)).inc()
        return response

    async def _other(self, method: str, path: str, request: h11.Request) -> Response:
        if path not in ("/health", "/healthz", "/metrics", "/v1/models"):
            raise HttpError(
                404,
                f"no such endpoint: {method} {path} (the proxy serves POST /v1/completions, "
                "POST /v1/chat/completions, GET /v1/models, GET /health and GET /metrics)",
            )
        if method not in ("GET", "HEAD"):
            raise HttpError(405, f"{path} takes GET, not {method}")
        if path == "/metrics":
            return Response(200, [("content-type", CONTENT_TYPE_LATEST)], generate_latest(self.metrics.registry))
        if path == "/v1/models":  # what clients ask first; any decode instance serves the same models
            self._enter()
            try:
                source = next(self._model_sources)
                return await self._decode_leg(source, "GET", path, None, _forwarded(request), self._leave)
            except BaseException:
                self._leave()
                raise
        return _json(200, self.health())

    async def _generate(self, path: str, request: h11.Request, raw: bytes) -> Response:
        payload = _json_object(raw)
        prefill, decode = next(self._prefills), next(self._decodes)
        xfer_id = uuid.uuid4().hex
        try:
            receiver = self.config.receivers.get(decode)
            to_prefill = prefill_body(
                payload, xfer_id=xfer_id, decode=receiver or decode, deadline_ms=_ms(self.config.push_deadline)
            )
            wait_ms = _ms(self.config.decode_wait) if receiver else 0  # no receiver: no KV will come
            to_decode = decode_body(payload, xfer_id=xfer_id, prefill=prefill, wait_ms=wait_ms)
        except ParamsError as exc:
            raise HttpError(400, str(exc)) from None
        headers = [*_forwarded(request), ("content-type", "application/json")]
        self._enter()
        try:
            pushed = await self._prefill_leg(
                prefill, path, _encode(to_prefill), [*headers, ("x-request-id", f"{xfer_id}-p")]
            )
            started = time.monotonic()

            def finished() -> None:
                self.metrics.decode_seconds.labels(decode).observe(time.monotonic() - started)
                self._leave()

            content = _encode(to_decode) if pushed else raw
            return await self._decode_leg(
                decode, "POST", path, content, [*headers, ("x-request-id", xfer_id)], finished
            )
        except BaseException:
            self._leave()
            raise

    # ------------------------------------------------------------------ the legs

    async def _prefill_leg(self, instance: str, path: str, content: bytes, headers: list[tuple[str, str]]) -> bool:
        """Whether the prefill instance answered 200 within ``prefill_timeout`` (its answer is
        dropped); a failure is counted as a fallback and logged."""
        assert self._client is not None
        limit = self.config.prefill_timeout
        started = time.monotonic()
        try:
            with anyio.fail_after(limit):
                response = await self._client.post(
                    instance + path, content=content, headers=headers, timeout=self._timeout(limit)
                )
        except (TimeoutError, httpx.TimeoutException):
            kind, detail = "timeout", f"no answer within {limit:g} s"
        except httpx.HTTPError as exc:
            kind, detail = _kind(exc), f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code == 200:
                self.metrics.prefill_seconds.labels(instance).observe(time.monotonic() - started)
                return True
            kind, detail = "status", f"HTTP {response.status_code}: {response.text[:300]}"
        self.metrics.prefill_seconds.labels(instance).observe(time.monotonic() - started)
        self.metrics.upstream_errors.labels(instance, "prefill", kind).inc()
        self.metrics.fallbacks.labels(instance, kind).inc()
        logger.warning(
            "prefill instance %s failed (%s); the decode instance computes the prompt itself", instance, detail
        )
        return False

    async def _decode_leg(
        self,
        instance: str,
        method: str,
        path: str,
        content: bytes | None,
        headers: list[tuple[str, str]],
        finished: Callable[[], None],
    ) -> Response:
        """The decode instance's answer as a response that relays its body as it arrives;
        :class:`HttpError` 502 naming the instance when it cannot be had. ``finished`` is called
        once the relay ends (not when this raises)."""
        assert self._client is not None
        headers = [*headers, ("accept-encoding", "identity")]  # relayed raw: no encoding the client did not ask for
        request = self._client.build_request(
            method, instance + path, content=content, headers=headers, timeout=self._timeout(self.config.decode_timeout)
        )
        started = time.monotonic()
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            if path in GENERATE_ROUTES:
                self.metrics.decode_seconds.labels(instance).observe(time.monotonic() - started)
            kind = _kind(exc)
            self.metrics.upstream_errors.labels(instance, "decode", kind).inc()
            message = f"decode instance {instance} {_failure(self.config, kind, exc)}"
            logger.warning("%s", message)
            raise HttpError(502, message) from None
        if response.status_code >= 500:
            self.metrics.upstream_errors.labels(instance, "decode", "status").inc()
        relay = _Relay(response, instance, self, finished)
        return Response(response.status_code, _relayed_headers(response), relay)

    def _timeout(self, seconds: float) -> httpx.Timeout:
        connect = self.config.connect_timeout
        return httpx.Timeout(seconds, connect=connect, pool=connect)

    def _enter(self) -> None:
        if self._stop_requested:
            raise HttpError(503, "the proxy is shutting down")
        self._active += 1

    def _leave(self) -> None:
        self._active -= 1
        if self._active == 0 and self._idle is not None:
            self._idle.set()


class _Relay:
    """The decode instance's body, passed on chunk by chunk as it arrives. An SSE stream is passed
    on in whole events, so that if the instance fails mid-stream, the error event the client gets
    last is not glued to half an event."""

    def __init__(self, response: httpx.Response, instance: str, proxy: Proxy, finished: Callable[[], None]) -> None:
        self.response = response
        self.instance = instance
        self.proxy = proxy
        self.finished: Callable[[], None] | None = finished
        self.sse = response.headers.get("content-type", "").startswith("text/event-stream")
        self._chunks = self._relay()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks

    async def aclose(self) -> None:
        finished, self.finished = self.finished, None
        if finished is None:
            return
        try:
            with anyio.move_on_after(_CLOSE_SECONDS, shield=True):
                await self._chunks.aclose()
                await self.response.aclose()  # when the relay never began
        finally:
            finished()

    async def _relay(self) -> AsyncGenerator[bytes, None]:
        raw = self.response.aiter_raw()
        pending = b""
        try:
            async for chunk in raw:
                if not self.sse:
                    yield chunk
                    continue
                pending += chunk
                end = _events_end(pending)
                if end:
                    yield pending[:end]
                    pending = pending[end:]
            if pending:
                yield pending
        except httpx.HTTPError as exc:
            kind = _kind(exc) if isinstance(exc, httpx.TimeoutException) else "broken"
            self.proxy.metrics.upstream_errors.labels(self.instance, "decode", kind).inc()
            failure = _failure(self.proxy.config, kind, exc)
            message = f"decode instance {self.instance} {failure} in the middle of its answer"
            logger.warning("%s", message)
            if not self.sse:
                raise ResponseAborted(message) from exc
            error = {"error": {"message": message, "type": "upstream_error", "code": 502}}
            yield b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"
        finally:
            with anyio.move_on_after(_CLOSE_SECONDS, shield=True):
                await self.response.aclose()
                # Left early (the client went away), httpx's chain of generators under aiter_raw
                # would be finalized by the garbage collector (trio warns about each): read on
                # after the close, to the error that ends them all.
                with contextlib.suppress(httpx.HTTPError):
                    async for _ in raw:
                        pass


# ---------------------------------------------------------------------- helpers


def _events_end(data: bytes) -> int:
    """Where the last whole SSE event in ``data`` ends (0: none does)."""
    ends = [at + len(boundary) for boundary in (b"\n\n", b"\r\n\r\n") if (at := data.rfind(boundary)) >= 0]
    return max(ends, default=0)


def _kind(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    return "error"


def _failure(config: ProxyConfig, kind: str, exc: httpx.HTTPError) -> str:
    """What went wrong with a decode instance, to follow its name."""
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return f"could not be connected to within {config.connect_timeout:g} s"
    if kind == "timeout":
        return f"was silent for {config.decode_timeout:g} s"
    if kind == "connect":
        return f"is unreachable ({exc or type(exc).__name__})"
    return f"failed: {type(exc).__name__}: {exc or 'no detail'}"


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _json(status: int, value: Any) -> Response:
    return Response(status, [("content-type", "application/json")], _encode(value))


def _error(status: int, message: str) -> Response:
    """The proxy's own errors, shaped as OpenAI's: ``{"error": {"message", "type", "code"}}``."""
    return _json(status, {"error": {"message": message, "type": _ERROR_TYPES.get(status, "error"), "code": status}})


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise HttpError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise HttpError(400, "the body must be a JSON object")
    return value


def _forwarded(request: h11.Request) -> list[tuple[str, str]]:
    return [(name.decode(), value.decode("latin-1")) for name, value in request.headers if name in _FORWARDED]


def _relayed_headers(response: httpx.Response) -> list[tuple[str, str]]:
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in response.headers.raw
        if name.decode("latin-1").lower() not in _HOP_BY_HOP
    ]


@contextlib.asynccontextmanager
async def open_proxy(config: ProxyConfig) -> AsyncIterator[Proxy]:
    """``async with open_proxy(config) as proxy:`` serves in this event loop until the block
    ends, then drains as on shutdown; ``proxy.url`` is where."""
    proxy = Proxy(config)
    async with anyio.create_task_group() as group:
        await group.start(proxy.serve)
        try:
            yield proxy
        finally:
            proxy.shutdown()
