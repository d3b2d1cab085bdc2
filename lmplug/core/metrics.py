"""Prometheus metrics of one cache, in a registry the cache owns (never the global one).

The data path bumps plain integer counters (:class:`Counts`); a collector turns them and
each tier's statistics into Prometheus families only when the registry is scraped, so a
lookup pays nanoseconds for its metrics, not a lock per counter.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmplug.core.tier import TierStatistics


@dataclass(slots=True)
class Counts:
    """Monotonic counters of the cache's data path (``lmplug_<name>_total``)."""

    lookups: int = field(default=0, metadata={"help": "Lookups answered."})
    lookup_tokens: int = field(default=0, metadata={"help": "Tokens asked about in lookups."})
    lookup_hit_tokens: int = field(default=0, metadata={"help": "Leading tokens lookups found cached."})
    stores: int = field(default=0, metadata={"help": "Store calls."})
    stored_tokens: int = field(default=0, metadata={"help": "Tokens whose KV was newly stored."})
    stored_bytes: int = field(default=0, metadata={"help": "Bytes of KV newly stored."})
    retrieves: int = field(default=0, metadata={"help": "Retrieve calls."})
    retrieved_tokens: int = field(default=0, metadata={"help": "Tokens whose KV was retrieved."})
    retrieved_bytes: int = field(default=0, metadata={"help": "Bytes of KV retrieved."})
    expired_leases: int = field(default=0, metadata={"help": "Leases released by their time-out."})


_TIER_GAUGES = {
    "chunks": "Chunks held by the tier.",
    "used_bytes": "Bytes held by the tier.",
    "capacity_bytes": "Configured capacity of the tier.",
    "pinned": "Chunks pinned in the tier.",
    "pending_writes": "Chunks queued for a write-behind write.",
}
_TIER_COUNTERS = {
    "hits": "Chunks the tier served.",
    "misses": "Retrieves the tier could not serve.",
    "stored": "Chunks the tier admitted.",
    "evictions": "Chunks the tier evicted.",
    "errors": "Operations the tier itself reported as failed.",
    "skipped_writes": "Chunks not written because the write-behind queue was full.",
}


class CacheMetrics(Collector):
    """The cache's counters, tier errors and tier statistics, exposed as Prometheus metrics."""

    def __init__(self, tier_snapshot: Callable[[], Sequence[TierStatistics]]) -> None:
        self.counts = Counts()
        self.tier_errors: Counter[tuple[str, str]] = Counter()
        """Failed tier operations that degraded to a miss or a skip, by (tier, operation)."""
        self._tier_snapshot = tier_snapshot
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        for item in fields(Counts):
            family = CounterMetricFamily(f"lmplug_{item.name}", item.metadata["help"])
            family.add_metric([], getattr(self.counts, item.name))
            yield family
        errors = CounterMetricFamily(
            "lmplug_tier_errors", "Tier operations that failed and degraded.", labels=["tier", "operation"]
        )
        for (tier_name, operation), count in sorted(self.tier_errors.items()):
            errors.add_metric([tier_name, operation], count)
        yield errors
        stats = self._tier_snapshot()
        for name, help_text in _TIER_GAUGES.items():
            gauge = GaugeMetricFamily(f"lmplug_tier_{name}", help_text, labels=["tier", "type"])
            for tier in stats:
                value = getattr(tier, name)
                if value is not None:
                    gauge.add_metric([tier.name, tier.type], float(value))
            yield gauge
        for name, help_text in _TIER_COUNTERS.items():
            counter = CounterMetricFamily(f"lmplug_tier_{name}", help_text, labels=["tier", "type"])
            for tier in stats:
                counter.add_metric([tier.name, tier.type], float(getattr(tier, name)))
            yield counter

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
