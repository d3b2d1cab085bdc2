"""Prometheus metrics of one cache, in a registry the cache owns (never the global one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmplug.core.tier import TierStatistics


class _TierCollector(Collector):
    def __init__(self, snapshot: Callable[[], Sequence[TierStatistics]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        families = {
            "chunks": GaugeMetricFamily("lmplug_tier_chunks", "Chunks held by the tier.", labels=["tier", "type"]),
            "used_bytes": GaugeMetricFamily(
                "lmplug_tier_used_bytes", "Bytes held by the tier.", labels=["tier", "type"]
            ),
            "capacity_bytes": GaugeMetricFamily(
                "lmplug_tier_capacity_bytes", "Configured capacity of the tier.", labels=["tier", "type"]
            ),
            "pinned": GaugeMetricFamily(
                "lmplug_tier_pinned_chunks", "Chunks pinned in the tier.", labels=["tier", "type"]
            ),
            "hits": GaugeMetricFamily("lmplug_tier_hits", "Chunks the tier served.", labels=["tier", "type"]),
            "evictions": GaugeMetricFamily(
                "lmplug_tier_evictions", "Chunks the tier evicted.", labels=["tier", "type"]
            ),
        }
        for stats in self._snapshot():
            labels = [stats.name, stats.type]
            for field_name, family in families.items():
                value = getattr(stats, field_name)
                if value is not None:
                    family.add_metric(labels, float(value))
        yield from families.values()


class CacheMetrics:
    """Counters for lookups, hits, stored and retrieved tokens and bytes, and tier errors."""

    def __init__(self, tier_snapshot: Callable[[], Sequence[TierStatistics]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.lookups = Counter("lmplug_lookups", "Lookups answered.", registry=r)
        self.lookup_tokens = Counter("lmplug_lookup_tokens", "Tokens asked about in lookups.", registry=r)
        self.hit_tokens = Counter("lmplug_lookup_hit_tokens", "Leading tokens lookups found cached.", registry=r)
        self.stored_tokens = Counter("lmplug_stored_tokens", "Tokens whose KV was newly stored.", registry=r)
        self.stored_bytes = Counter("lmplug_stored_bytes", "Bytes of KV newly stored.", registry=r)
        self.retrieved_tokens = Counter("lmplug_retrieved_tokens", "Tokens whose KV was retrieved.", registry=r)
        self.retrieved_bytes = Counter("lmplug_retrieved_bytes", "Bytes of KV retrieved.", registry=r)
        self.retrieves = Counter("lmplug_retrieves", "Retrieve calls.", registry=r)
        self.stores = Counter("lmplug_stores", "Store calls.", registry=r)
        self.tier_errors = Counter(
            "lmplug_tier_errors", "Tier operations that failed and degraded.", ["tier", "operation"], registry=r
        )
        self.expired_leases = Counter("lmplug_expired_leases", "Leases released by their time-out.", registry=r)
        r.register(_TierCollector(tier_snapshot))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
