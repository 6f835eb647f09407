"""Prometheus metrics of one server process, served at ``GET /metrics``.

One registry per process (not the library's global default, so tests can run
several servers without collisions of collectors... they share METRICS, which is
fine: figures are per process in production).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

_COMMIT_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class HotCounters:
    """Counters bumped once or more per message, by the trio thread only: plain
    ints read at scrape time (a prometheus_client ``Counter`` takes a lock per
    ``inc``: 3 % of the trio thread at 10,000 msg/s)."""

    __slots__ = ("frames_in", "frames_out", "messages")

    def __init__(self) -> None:
        self.frames_in = 0
        self.frames_out = 0
        self.messages = 0


class _HotCollector(Collector):
    def __init__(self, hot: HotCounters) -> None:
        self._hot = hot

    def collect(self) -> Iterator[Metric]:
        hot = self._hot
        yield CounterMetricFamily("imserver_frames_in", "Frames received", value=hot.frames_in)
        yield CounterMetricFamily(
            "imserver_frames_out", "Frames queued to clients", value=hot.frames_out
        )
        yield CounterMetricFamily("imserver_messages", "Messages stored", value=hot.messages)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, _resident_memory_bytes, fds
        self.connections = Gauge("imserver_connections", "Open WebSocket connections", registry=r)
        self.sessions = Gauge("imserver_sessions", "Authenticated sessions", registry=r)
        self.connections_total = Counter(
            "imserver_accepted_connections", "Accepted TCP connections", registry=r
        )
        self.hot = HotCounters()
        r.register(_HotCollector(self.hot))
        self.errors = Counter(
            "imserver_errors_total", "Error frames sent, by code", ["code"], registry=r
        )
        self.closes = Counter(
            "imserver_closes_total",
            "Connections closed by the server, by close code",
            ["code"],
            registry=r,
        )
        self.actors = Gauge("imserver_actors", "Live conversation actors", registry=r)
        self.actor_crashes = Counter(
            "imserver_actor_crashes_total", "Conversation actor crashes (restarted)", registry=r
        )
        self.shard_depth = Gauge(
            "imserver_shard_queue_depth", "Commands waiting per shard", ["shard"], registry=r
        )
        self.store_pending = Gauge(
            "imserver_store_pending_ops", "Write operations waiting for a commit", registry=r
        )
        self.commit_seconds = Histogram(
            "imserver_commit_seconds",
            "Store transaction latency",
            buckets=_COMMIT_BUCKETS,
            registry=r,
        )
        self.commit_ops = Counter("imserver_commit_ops_total", "Operations committed", registry=r)
        self.commits = Counter("imserver_commits_total", "Store transactions", registry=r)
        self.accept_backoffs = Counter(
            "imserver_accept_backoffs_total",
            "accept() failures for lack of descriptors or kernel memory (each backs off)",
            registry=r,
        )
        self.slow_consumers = Counter(
            "imserver_slow_consumers_total", "Connections cut off for not reading", registry=r
        )

    def on_commit(self, seconds: float, ops: int, callers: int) -> None:
        self.commit_seconds.observe(seconds)
        self.commit_ops.inc(ops)
        self.commits.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS: Final = Metrics()
