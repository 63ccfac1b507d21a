"""Prometheus metrics, in a registry owned by one app (no module-level state).

A turn only adds to plain counters here (`Buckets.observe` is a bisect and two additions);
prometheus-client builds the exposition from them when `/metrics` is scraped. Its own
Counter and Histogram take a lock and go through their buckets in Python on every call:
seven such calls per turn cost more than the rest of the metrics code put together.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: A store call: tens of µs on SQLite, a round trip or two on PostgreSQL.
_STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  1, 5)


class Buckets:
    """A histogram's counts: bucket i counts values in (bounds[i-1], bounds[i]]."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation)
        self.add_to(family, [])
        return family

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        cumulative = list(accumulate(self.counts))
        les = [*map(floatToGoString, self.bounds), "+Inf"]
        family.add_metric(labels, list(zip(les, cumulative)), sum_value=self.total)


class Metrics:
    def __init__(self, session_loads: Counter[str] | None = None) -> None:
        #: Turns by outcome.
        self.turns: Counter[str] = Counter()
        #: The store's own count of session loads by source (`Store.loads`).
        self.session_loads: Counter[str] = Counter() if session_loads is None else session_loads
        #: Time a turn waited for its lane, held it, and spent in the model.
        self.queue_wait = Buckets(_WAIT_BUCKETS)
        self.turn_seconds = Buckets(_LATENCY_BUCKETS)
        self.upstream_seconds = Buckets(_LATENCY_BUCKETS)
        #: A turn's two store calls: reading (and, with several replicas, claiming) its
        #: session, and its fenced write; their wait is most of what PostgreSQL adds.
        self.store_load = Buckets(_STORE_BUCKETS)
        self.store_commit = Buckets(_STORE_BUCKETS)
        #: Set just before each scrape, from the lanes.
        self.queue_depth = 0
        self.active_lanes = 0
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def describe(self) -> list[Metric]:
        return []  # the names come with `collect`; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        turns = CounterMetricFamily("laneway_turns", "Turns by outcome", labels=["outcome"])
        for outcome, count in sorted(self.turns.items()):
            turns.add_metric([outcome], count)
        yield turns
        yield self.queue_wait.family("laneway_queue_wait_seconds",
                                     "Time a turn waited for its lane")
        yield self.turn_seconds.family("laneway_turn_seconds", "Time a turn held its lane")
        yield self.upstream_seconds.family("laneway_upstream_seconds", "Model calls' latency")
        store = HistogramMetricFamily("laneway_store_seconds", "A turn's store calls' latency",
                                      labels=["op"])
        self.store_load.add_to(store, ["load"])
        self.store_commit.add_to(store, ["commit"])
        yield store
        loads = CounterMetricFamily("laneway_session_loads",
                                    "Turns' session loads: from this replica's cache or the store",
                                    labels=["source"])
        for source in ("cache", "store"):
            loads.add_metric([source], self.session_loads[source])
        yield loads
        yield GaugeMetricFamily("laneway_queue_depth", "Requests waiting for a lane",
                                value=self.queue_depth)
        yield GaugeMetricFamily("laneway_active_lanes", "Lanes with a running or waiting turn",
                                value=self.active_lanes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
