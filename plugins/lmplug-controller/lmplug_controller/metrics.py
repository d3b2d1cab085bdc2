"""The controller's Prometheus metrics: a collector that reads its counters at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from lmplug_controller.server import Controller

__all__ = ["ControllerCollector", "registry_for"]


class ControllerCollector(Collector):
    """Reads a controller's index and counters at scrape time."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        controller = self.controller
        counters, index = controller.counters, controller.index
        workers = index.workers()
        yield GaugeMetricFamily("lmplug_controller_workers", "Workers registered.", value=len(workers))
        yield GaugeMetricFamily(
            "lmplug_controller_instances", "Instances registered.", value=len({w.instance_id for w in workers})
        )
        yield GaugeMetricFamily(
            "lmplug_controller_resyncing_workers",
            "Workers whose snapshot is awaited.",
            value=sum(w.dirty for w in workers),
        )
        yield GaugeMetricFamily("lmplug_controller_keys_indexed", "Distinct chunk keys indexed.", value=len(index))
        yield GaugeMetricFamily(
            "lmplug_controller_entries", "(key, worker, tier) entries indexed.", value=index.entries()
        )
        yield CounterMetricFamily(
            "lmplug_controller_registrations", "Registrations accepted.", value=counters.registrations
        )
        refused = CounterMetricFamily(
            "lmplug_controller_refused", "Registrations refused, by reason.", labels=["reason"]
        )
        for reason, count in sorted(counters.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        yield CounterMetricFamily("lmplug_controller_lookups", "Lookups answered.", value=counters.lookups)
        yield CounterMetricFamily(
            "lmplug_controller_lookup_hits", "Lookups with at least one holder.", value=counters.lookup_hits
        )
        yield CounterMetricFamily(
            "lmplug_controller_lookup_chunks", "Chunks asked about in lookups.", value=counters.lookup_chunks
        )
        yield CounterMetricFamily(
            "lmplug_controller_hit_chunks", "Chunks the best holder of each lookup held.", value=counters.hit_chunks
        )
        events = CounterMetricFamily("lmplug_controller_events", "Chunk events absorbed, by kind.", labels=["kind"])
        events.add_metric(["admitted"], counters.admitted)
        events.add_metric(["evicted"], counters.evicted)
        yield events
        yield CounterMetricFamily(
            "lmplug_controller_event_batches", "EVENTS messages absorbed.", value=counters.event_batches
        )
        yield CounterMetricFamily("lmplug_controller_gaps", "Event sequence gaps seen.", value=counters.gaps)
        yield CounterMetricFamily("lmplug_controller_snapshots", "Snapshots received.", value=counters.snapshots)
        yield CounterMetricFamily(
            "lmplug_controller_snapshot_keys", "Keys received in snapshots.", value=counters.snapshot_keys
        )
        yield CounterMetricFamily(
            "lmplug_controller_drops", "Workers dropped for missing heartbeats.", value=counters.drops
        )
        yield CounterMetricFamily(
            "lmplug_controller_bad_messages", "Malformed worker messages.", value=counters.bad_messages
        )
        commands = CounterMetricFamily(
            "lmplug_controller_commands", "Commands forwarded to workers, by op and outcome.", labels=["op", "outcome"]
        )
        for (op, outcome), count in sorted(counters.commands.items()):
            commands.add_metric([op, outcome], count)
        yield commands


def registry_for(controller: Controller) -> CollectorRegistry:
    """A registry of its own for ``controller`` (tests run several in one process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector(controller))
    return registry
