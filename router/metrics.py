"""Prometheus metrics: events in, routed, executed, failed, dead-lettered, and latencies."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """One registry per application instance, so tests can run several side by side."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_in = Counter("headwater_events_in_total", "Events published by sources", ["source"], registry=r)
        self.events_routed = Counter("headwater_events_routed_total", "Event deliveries matched to a subscription", ["source"], registry=r)
        self.events_unmatched = Counter("headwater_events_unmatched_total", "Events that matched no subscription", ["source"], registry=r)
        self.executions = Counter("headwater_executions_total", "Finished executions by status and reason", ["status", "reason"], registry=r)
        self.executions_failed = Counter("headwater_executions_failed_total", "Executions that ended failed or error", ["reason"], registry=r)
        self.dead_letters = Counter("headwater_dead_letters_total", "Dead-letter records written", ["source"], registry=r)
        self.parked = Counter("headwater_events_parked_total", "Events parked on a limited subscription's own topic to wait for its limits", registry=r)
        self.duplicates = Counter("headwater_duplicate_deliveries_total", "Redelivered events whose execution was already recorded", registry=r)
        self.executions_running = Gauge("headwater_executions_running", "Executions in progress in this process", registry=r)
        self.execution_seconds = Histogram("headwater_execution_duration_seconds", "Engine time per execution", buckets=_LATENCY_BUCKETS, registry=r)
        self.route_seconds = Histogram("headwater_route_latency_seconds", "Event time to execution recorded", buckets=_LATENCY_BUCKETS, registry=r)

        # Labelled children by (metric, label values): prometheus_client's labels() validates and
        # locks on every call, which the routing path would pay several times per event.
        self._children: dict[tuple, object] = {}

    def child(self, metric, *values: str):
        """metric.labels(*values), looked up once."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)
