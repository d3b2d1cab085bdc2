"""The proxy's Prometheus metrics, in a registry of its own (tests run several proxies in one process)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ProxyMetrics"]

_LEG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ProxyMetrics:
    """Counters and histograms of one proxy; ``registry`` is what ``GET /metrics`` renders."""

    def __init__(self, prefill: Sequence[str], decode: Sequence[str]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lmplug_pd_proxy_requests",
            "Requests answered, by route and the HTTP status the client got.",
            ["route", "status"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "lmplug_pd_proxy_fallbacks",
            "Requests sent to decode without PD parameters (a full prefill there) because their prefill "
            "failed, by prefill instance and reason (connect, timeout, error, status).",
            ["prefill", "reason"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "lmplug_pd_proxy_upstream_errors",
            "Failed upstream calls, by instance, role (prefill, decode) and kind "
            "(connect, timeout, error, status, broken).",
            ["instance", "role", "kind"],
            registry=self.registry,
        )
        self.prefill_seconds = Histogram(
            "lmplug_pd_proxy_prefill_seconds",
            "Prefill legs, from sending the request to its whole answer (or its failure), by instance.",
            ["instance"],
            buckets=_LEG_BUCKETS,
            registry=self.registry,
        )
        self.decode_seconds = Histogram(
            "lmplug_pd_proxy_decode_seconds",
            "Decode legs, from sending the request to the last byte relayed to the client, by instance.",
            ["instance"],
            buckets=_LEG_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "lmplug_pd_proxy_in_flight", "Requests being answered (prefill or decode leg).", registry=self.registry
        )
        for instance in prefill:
            self.prefill_seconds.labels(instance)
        for instance in decode:
            self.decode_seconds.labels(instance)
