"""The CRM plugin for real: segment broadcast and the agent's profile sidebar."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio

from imserver.client import Client
from protocol import (
    History,
    HistoryPage,
    MessageEvent,
    OpenConversation,
    PluginEvent,
    Subscribe,
    TextBody,
    Topic,
    UpdateConversation,
)
from tests.conftest import RunningServer
from tests.workers.conftest import worker_process
from workers.crm.models import Order
from workers.crm.repository import CrmRepository

BROADCAST = "双11 early access: 20% off for our best customers"


def _seed(db: Path) -> None:
    now = datetime.now(UTC)
    db.parent.mkdir(parents=True, exist_ok=True)
    with CrmRepository(db) as repo:
        for customer, tz in (
            ("c1", "Asia/Shanghai"),
            ("c2", "America/Los_Angeles"),
            ("c3", "Europe/Madrid"),
            ("c4", "Asia/Shanghai"),
        ):
            repo.upsert_customer(customer, timezone=tz)
        orders = []
        for customer in ("c1", "c2", "c3"):  # champions: recent, frequent, big spenders
            for i in range(6):
                orders.append(
                    Order(
                        shop="shop1",
                        order_id=f"{customer}-{i}",
                        customer=customer,
                        channel="tmall",
                        status="completed",
                        amount_cents=100_000,
                        created_at=now - timedelta(days=3 + i),
                        updated_at=now - timedelta(days=3 + i),
                    )
                )
        orders.append(
            Order(  # lost: one small order long ago
                shop="shop1",
                order_id="c4-0",
                customer="c4",
                channel="jd",
                status="completed",
                amount_cents=5_000,
                created_at=now - timedelta(days=300),
                updated_at=now - timedelta(days=300),
            )
        )
        repo.upsert_orders(orders)
        repo.set_opt_out("c3")


async def _wait_broadcast(client: Client) -> str:
    with trio.fail_after(30):
        async for frame in client.events:
            if (
                isinstance(frame, MessageEvent)
                and isinstance(frame.message.body, TextBody)
                and frame.message.body.text == BROADCAST
            ):
                return frame.message.conv
    raise AssertionError("no broadcast")


async def test_segment_broadcast_and_profile_sidebar(server: RunningServer, tmp_path: Path) -> None:
    db = tmp_path / "workers" / "crm" / "crm.db"
    _seed(db)
    config = tmp_path / "workers.yaml"
    config.write_text(
        "crm:\n  broadcasts:\n"
        f"    - {{id: b1, shop: shop1, segment: champions, text: '{BROADCAST}',"
        " window: [0, 24], rate_per_minute: 600}\n",
        encoding="utf-8",
    )
    async with (
        server.connect("c1") as c1,
        server.connect("c2") as c2,
        server.connect("c3") as c3,
        server.connect("c4") as c4,
    ):
        convs = {}
        for name, client in (("c1", c1), ("c2", c2), ("c3", c3), ("c4", c4)):
            convs[name] = (
                await client.request(OpenConversation(id=0, shop="shop1"))
            ).conversation.id
        async with (
            server.connect("sup", "supervisor", "shop1") as sup,
            worker_process(server, "crm", tmp_path, config),
        ):
            await sup.request(Subscribe(id=0, topics=[Topic.DASHBOARD]))
            assert await _wait_broadcast(c1) == convs["c1"]
            assert await _wait_broadcast(c2) == convs["c2"]
            with trio.fail_after(30):
                async for frame in sup.events:
                    if (
                        isinstance(frame, PluginEvent)
                        and frame.kind == "broadcast_progress"
                        and frame.data["remaining"] == 0
                    ):
                        progress = frame.data
                        break
            assert progress["sent"] == 2 and progress["skipped_opted_out"] == ["c3"]
            with CrmRepository(db) as repo:
                assert repo.sent_customers("b1") == {"c1", "c2"}  # c3 opted out, c4 is "lost"
            for name, client in (("c3", c3), ("c4", c4)):
                page: HistoryPage = await client.request(History(id=0, conv=convs[name]))
                assert all(getattr(m.body, "text", "") != BROADCAST for m in page.messages)
            # The agent who takes c1's chat gets the sidebar.
            async with server.connect("agent1", "agent", "shop1") as agent:
                await agent.request(UpdateConversation(id=0, conv=convs["c1"], agent="agent1"))
                with trio.fail_after(30):
                    async for frame in agent.events:
                        if isinstance(frame, PluginEvent) and frame.kind == "profile":
                            profile = frame.data
                            break
    assert profile["customer"] == "c1" and profile["conv"] == convs["c1"]
    assert profile["segment"] == "champions"
    assert profile["order_count"] == 6
    assert len(profile["recent_orders"]) == 5
