"""The server's Prometheus metrics: a collector that reads its counters at scrape time, and
a minimal HTTP endpoint on loopback (``GET /metrics``, ``GET /health``)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from lmplug_server.server import LmServer

__all__ = ["ServerCollector", "serve_metrics"]

_MAX_HTTP_REQUEST = 8192


class ServerCollector(Collector):
    """Reads the server's counters at scrape time."""

    def __init__(self, server: LmServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server, store = self.server, self.server.store
        requests = CounterMetricFamily("lmplug_server_requests", "Requests answered, by opcode.", labels=["op"])
        for op, count in sorted(server.requests.items()):
            requests.add_metric([op], count)
        yield requests
        keys = CounterMetricFamily("lmplug_server_keys", "Keys named in requests, by opcode.", labels=["op"])
        for op, count in sorted(server.keys.items()):
            keys.add_metric([op], count)
        yield keys
        errors = CounterMetricFamily("lmplug_server_errors", "Error replies and broken connections.", labels=["code"])
        for code, count in sorted(server.errors.items()):
            errors.add_metric([code], count)
        yield errors
        moved = CounterMetricFamily("lmplug_server_bytes", "Value bytes moved.", labels=["direction"])
        moved.add_metric(["in"], server.bytes_in)
        moved.add_metric(["out"], server.bytes_out)
        yield moved
        if store is None:
            return
        counters = store.counters
        yield CounterMetricFamily("lmplug_server_hits", "GET keys found.", value=counters.hits)
        yield CounterMetricFamily("lmplug_server_disk_hits", "GET keys found on disk.", value=counters.disk_hits)
        yield CounterMetricFamily("lmplug_server_misses", "GET keys not found.", value=counters.misses)
        yield CounterMetricFamily("lmplug_server_evictions", "Values evicted from memory.", value=counters.evictions)
        yield CounterMetricFamily("lmplug_server_spills", "Evicted values written to disk.", value=counters.spilled)
        yield CounterMetricFamily("lmplug_server_refused", "PUT values refused for space.", value=counters.refused)
        yield CounterMetricFamily("lmplug_server_disk_errors", "Disk store I/O errors.", value=counters.disk_errors)
        yield CounterMetricFamily("lmplug_server_connections", "Connections accepted.", value=server.connections)
        yield GaugeMetricFamily("lmplug_server_open_connections", "Connections open.", value=server.open_connections)
        yield GaugeMetricFamily(
            "lmplug_server_unauthenticated_connections",
            "Connections open that have not authenticated yet.",
            value=server.unauthenticated,
        )
        yield GaugeMetricFamily("lmplug_server_memory_used_bytes", "Bytes of values in memory.", value=store.used)
        yield GaugeMetricFamily("lmplug_server_memory_capacity_bytes", "Memory capacity.", value=store.capacity)
        yield GaugeMetricFamily("lmplug_server_memory_items", "Values in memory.", value=len(store))
        if store.disk is not None:
            yield GaugeMetricFamily("lmplug_server_disk_used_bytes", "Bytes of spill files.", value=store.disk.used)
            yield GaugeMetricFamily("lmplug_server_disk_items", "Values on disk.", value=len(store.disk))


async def serve_metrics(
    port: int,
    registry: CollectorRegistry,
    healthy: Callable[[], bool],
    *,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """A minimal HTTP endpoint on loopback: ``GET /metrics`` (Prometheus text) and ``GET /health``."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
    async with listener:
        sockname = listener.extra(SocketAttribute.local_address)
        task_status.started((str(sockname[0]), int(sockname[1])))
        await listener.serve(functools.partial(_answer, registry, healthy))


async def _answer(registry: CollectorRegistry, healthy: Callable[[], bool], stream: SocketStream) -> None:
    async with stream:
        request = b""
        with anyio.move_on_after(5.0):
            while b"\r\n\r\n" not in request and len(request) < _MAX_HTTP_REQUEST:
                try:
                    request += await stream.receive(_MAX_HTTP_REQUEST)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
        line = request.split(b"\r\n", 1)[0].split()
        path = line[1].split(b"?", 1)[0] if len(line) >= 2 and line[0] == b"GET" else b""
        kind = "text/plain; charset=utf-8"
        if path == b"/metrics":
            status, kind, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)
        elif path == b"/health":
            status, body = ("200 OK", b"ok\n") if healthy() else ("503 Service Unavailable", b"stopping\n")
        else:
            status, body = "404 Not Found", b"not found\n"
        head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
        with contextlib.suppress(anyio.BrokenResourceError, OSError):
            await stream.send(head.encode() + b"Connection: close\r\n\r\n" + body)
