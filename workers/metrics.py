"""Prometheus metrics of the worker plugins, and how they reach the server's ``/metrics``.

Theory of operation
-------------------
Each worker process counts in its own registry (``REGISTRY``): the bot its
answers and handoffs, routing its queues, waits, assignments and SLA breaches,
the CRM its profiles and imports, all labelled by shop. ``imserver worker``
writes the registry as Prometheus text to ``DATA/metrics/<plugin>-<pid>.prom``
every ``WRITE_EVERY_S`` (a temporary file renamed over the old one, so a reader
never sees half a file) and removes it when it stops.

``imserver serve`` registers ``WorkerFilesCollector`` on its own registry: at
each scrape it reads the files of that directory, skips those not rewritten for
``STALE_AFTER_S`` (a worker killed with SIGKILL; deleted after
``REMOVE_AFTER_S``), and exports every sample with
a ``worker`` label (``bot-4242``), so several instances of a plugin add up in
PromQL (``sum by (shop) (rate(imserver_bot_answers_total[5m]))``). Workers on
the server's machine and data directory (``serve --workers``) are therefore on
the server's ``/metrics``; a worker elsewhere serves the same registry itself
with ``imserver worker --metrics-port PORT`` for Prometheus to scrape directly.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

WRITE_EVERY_S: Final = 1.0
"""How often a worker rewrites its metrics file."""
STALE_AFTER_S: Final = 30.0
"""A metrics file not rewritten for this long belongs to a dead worker: ignored."""
METRICS_DIR: Final = "metrics"
"""Under the data directory."""
REMOVE_AFTER_S: Final = 3600.0
"""A metrics file this old is deleted at the next scrape (left by a killed worker)."""
MAX_METRICS_FILE_BYTES: Final = 4 * 1024 * 1024
"""A larger file is skipped (a worker's registry is a few KiB)."""

REGISTRY: Final = CollectorRegistry(auto_describe=True)

BOT_MESSAGES: Final = Counter(
    "imserver_bot_messages", "Customer messages the bot handled", ["shop"], registry=REGISTRY
)
BOT_ANSWERS: Final = Counter(
    "imserver_bot_answers",
    "Customer messages the bot answered itself",
    ["shop"],
    registry=REGISTRY,
)
BOT_HANDOFFS: Final = Counter(
    "imserver_bot_handoffs",
    "Chats the bot handed to a human, by reason",
    ["shop", "reason"],
    registry=REGISTRY,
)
ROUTING_QUEUE: Final = Gauge(
    "imserver_routing_queue_length", "Chats waiting for an agent", ["shop"], registry=REGISTRY
)
ROUTING_LONGEST_WAIT: Final = Gauge(
    "imserver_routing_longest_wait_seconds",
    "Longest wait in the queue now",
    ["shop"],
    registry=REGISTRY,
)
ROUTING_AVERAGE_WAIT: Final = Gauge(
    "imserver_routing_average_wait_seconds",
    "Average wait of the chats queued now",
    ["shop"],
    registry=REGISTRY,
)
ROUTING_ONLINE: Final = Gauge(
    "imserver_routing_online_agents", "Agents online", ["shop"], registry=REGISTRY
)
ROUTING_ASSIGNMENTS: Final = Counter(
    "imserver_routing_assignments",
    "Chats assigned to agents, by reason",
    ["shop", "reason"],
    registry=REGISTRY,
)
ROUTING_SLA_BREACHES: Final = Counter(
    "imserver_routing_sla_breaches",
    "Agents who missed the first-reply SLA",
    ["shop"],
    registry=REGISTRY,
)
ROUTING_OVERFLOW: Final = Counter(
    "imserver_routing_overflow",
    "Chats queued past the shop's queue limit",
    ["shop"],
    registry=REGISTRY,
)
CRM_PROFILES: Final = Counter(
    "imserver_crm_profiles", "Profile sidebars sent to agents", ["shop"], registry=REGISTRY
)


class ShopDashboard(Protocol):
    """What ``observe_dashboard`` reads (routing's ``Dashboard``)."""

    @property
    def shop(self) -> str: ...
    @property
    def queued(self) -> int: ...
    @property
    def longest_wait_seconds(self) -> float: ...
    @property
    def average_wait_seconds(self) -> float: ...
    @property
    def online_agents(self) -> int: ...


def observe_dashboard(board: ShopDashboard) -> None:
    ROUTING_QUEUE.labels(shop=board.shop).set(board.queued)
    ROUTING_LONGEST_WAIT.labels(shop=board.shop).set(board.longest_wait_seconds)
    ROUTING_AVERAGE_WAIT.labels(shop=board.shop).set(board.average_wait_seconds)
    ROUTING_ONLINE.labels(shop=board.shop).set(board.online_agents)


def write_file(path: Path, registry: CollectorRegistry = REGISTRY) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(generate_latest(registry))
    os.replace(temporary, path)


class FileWriter:
    """Keeps ``DATA/metrics/<plugin>-<pid>.prom`` current from a thread (independent of
    the plugin's event loop) until ``close``, which removes it."""

    def __init__(self, data_dir: Path, plugin: str) -> None:
        directory = data_dir / METRICS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{plugin.replace('/', '_').replace(':', '_')}-{os.getpid()}.prom"
        self._stop = threading.Event()
        write_file(self.path)
        self._thread = threading.Thread(target=self._run, name="metrics-file", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(WRITE_EVERY_S):
            with contextlib.suppress(OSError):  # a full disk must not stop the plugin
                write_file(self.path)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self.path.unlink()


class WorkerFilesCollector(Collector):
    """The server side: every live worker's samples, labelled ``worker``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        now = time.time()
        try:
            files = sorted(self.directory.glob("*.prom"))
        except OSError:
            return
        for path in files:
            try:
                stat = path.stat()
                if now - stat.st_mtime > REMOVE_AFTER_S:
                    path.unlink()
                    continue
                if now - stat.st_mtime > STALE_AFTER_S or stat.st_size > MAX_METRICS_FILE_BYTES:
                    continue
                text = path.read_text(encoding="utf-8")
                families = list(text_string_to_metric_families(text))
            except (OSError, ValueError):
                continue  # vanished or half-written by an older writer: next scrape
            worker = path.stem
            for family in families:
                target = merged.get(family.name)
                if target is None:
                    target = merged[family.name] = Metric(
                        family.name, family.documentation, family.type
                    )
                for sample in family.samples:
                    target.add_sample(
                        sample.name, {**sample.labels, "worker": worker}, sample.value
                    )
        yield from merged.values()
