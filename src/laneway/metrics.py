"""Prometheus metrics, in a registry owned by one app (no module-level state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.turns = Counter(
            "laneway_turns", "Turns by outcome", ["outcome"], registry=self.registry
        )
        self.queue_wait = Histogram(
            "laneway_queue_wait_seconds",
            "Time a turn waited for its lane",
            buckets=_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.turn_seconds = Histogram(
            "laneway_turn_seconds",
            "Time a turn held its lane",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "laneway_upstream_seconds",
            "Model calls' latency",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "laneway_queue_depth", "Requests waiting for a lane", registry=self.registry
        )
        self.active_lanes = Gauge(
            "laneway_active_lanes", "Lanes with a running or waiting turn", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
