"""Worker metrics (workers/metrics.py): a real bot worker counts its answers and
handoffs per shop into its metrics file, and the server-side collector exports them
labelled by worker; files of dead workers (not rewritten) are left out."""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry, generate_latest

from protocol import ConversationEvent, OpenConversation
from tests.conftest import RunningServer
from tests.workers.conftest import worker_process
from tests.workers.routing.test_router import PRE, SHOP, make, online
from workers import metrics
from workers.metrics import (
    REMOVE_AFTER_S,
    STALE_AFTER_S,
    WRITE_EVERY_S,
    WorkerFilesCollector,
)


def _scrape(directory: Path) -> str:
    registry = CollectorRegistry()
    registry.register(WorkerFilesCollector(directory))
    return generate_latest(registry).decode()


async def test_bot_answers_and_handoffs_reach_the_server_metrics(
    server: RunningServer, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    async with worker_process(server, "bot", tmp_path) as worker, server.connect("buyer1") as buyer:
        conv = (await buyer.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await buyer.send_text(conv, "发什么快递？")
        await buyer.send_text(conv, "转人工")
        with trio.fail_after(30):  # the handoff is counted before the bot queues the chat
            async for frame in buyer.events:
                if isinstance(frame, ConversationEvent) and frame.change == "queued":
                    break
        worker_label = f'worker="bot-{worker.pid}"'
        handoff = (
            f'imserver_bot_handoffs_total{{reason="requested",shop="shop1",{worker_label}}} 1.0'
        )
        with trio.fail_after(30):
            # The worker rewrites its file every WRITE_EVERY_S on its own clock: there is
            # no event to wait for, so look again until the next write has landed.
            while handoff not in (text := _scrape(metrics_dir)):  # noqa: ASYNC110
                await trio.sleep(WRITE_EVERY_S / 10)
    assert f'imserver_bot_messages_total{{shop="shop1",{worker_label}}} 2.0' in text
    assert f'imserver_bot_answers_total{{shop="shop1",{worker_label}}} 1.0' in text


def test_files_merge_by_worker_and_stale_ones_are_skipped(tmp_path: Path) -> None:
    for name, value in (("bot-1", 3), ("bot-2", 4), ("bot-3", 99)):
        (tmp_path / f"{name}.prom").write_text(
            "# HELP imserver_bot_answers_total Answers\n# TYPE imserver_bot_answers_total counter\n"
            f'imserver_bot_answers_total{{shop="s1"}} {value}.0\n',
            encoding="utf-8",
        )
    (tmp_path / "broken-4.prom").write_text("imserver_x{ this is not", encoding="utf-8")
    old = time.time() - STALE_AFTER_S - 1
    os.utime(tmp_path / "bot-3.prom", (old, old))  # its worker died a while ago
    (tmp_path / "bot-5.prom").write_text("", encoding="utf-8")
    ancient = time.time() - REMOVE_AFTER_S - 1
    os.utime(tmp_path / "bot-5.prom", (ancient, ancient))
    text = _scrape(tmp_path)
    assert 'imserver_bot_answers_total{shop="s1",worker="bot-1"} 3.0' in text
    assert 'imserver_bot_answers_total{shop="s1",worker="bot-2"} 4.0' in text
    assert "bot-3" not in text and "broken" not in text
    assert (tmp_path / "bot-3.prom").exists() and not (tmp_path / "bot-5.prom").exists()
    assert text.count("# TYPE imserver_bot_answers_total counter") == 1


def test_routing_queue_gauges_follow_the_dashboard() -> None:
    router = make()
    online(router, "a", {"pre-sale"}, 1)
    router.request("p1", SHOP, PRE, 0.0)  # a takes it
    router.request("p2", SHOP, PRE, 10.0)  # waits
    metrics.observe_dashboard(router.dashboard(SHOP, 70.0))
    text = generate_latest(metrics.REGISTRY).decode()
    assert f'imserver_routing_queue_length{{shop="{SHOP}"}} 1.0' in text
    assert f'imserver_routing_longest_wait_seconds{{shop="{SHOP}"}} 60.0' in text
    assert f'imserver_routing_online_agents{{shop="{SHOP}"}} 1.0' in text
