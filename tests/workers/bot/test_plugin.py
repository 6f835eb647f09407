"""The bot plugin for real: server, bot worker process, CRM data on disk."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio

from imserver.client import Client
from protocol import (
    ConversationEvent,
    ConvState,
    MessageEvent,
    OpenConversation,
    QuickRepliesBody,
    TextBody,
)
from tests.conftest import RunningServer
from tests.workers.conftest import worker_process
from workers.crm.models import Order, OrderItem
from workers.crm.repository import CrmRepository


def seed_crm(data: Path) -> None:
    path = data / "workers" / "crm" / "crm.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    with CrmRepository(path) as repo:
        repo.upsert_customer("alice", display_name="Alice")
        repo.upsert_orders(
            [
                Order(
                    shop="shop1",
                    order_id="123",
                    customer="alice",
                    channel="taobao",
                    status="in_transit",
                    amount_cents=19900,
                    items=(OrderItem(title="Down jacket"),),
                    carrier="SF Express",
                    tracking_no="SF1234567890",
                    eta=(now + timedelta(days=2)).date(),
                    created_at=now - timedelta(days=1),
                    updated_at=now,
                )
            ]
        )


async def _bot_texts(client: Client, conv: str, until: str) -> list[str]:
    """Bot messages until one contains ``until``."""
    texts: list[str] = []
    with trio.fail_after(30):
        async for frame in client.events:
            if isinstance(frame, MessageEvent) and frame.message.sender.startswith("worker:"):
                body = frame.message.body
                if isinstance(body, TextBody | QuickRepliesBody):
                    texts.append(body.text)
                    if until in body.text:
                        return texts
    raise AssertionError(texts)


async def test_bot_answers_order_status_from_crm_and_hands_off_complaints(
    server: RunningServer, tmp_path: Path
) -> None:
    seed_crm(tmp_path)
    async with worker_process(server, "bot", tmp_path), server.connect("alice") as alice:
        conv = (await alice.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await alice.send_text(conv, "where is my order 123?")
        texts = await _bot_texts(alice, conv, "123")
        answer = texts[-1]
        assert "in transit" in answer.lower() or "SF" in answer, answer
        # A complaint goes to a human, at high priority, tagged for routing.
        await alice.send_text(conv, "我要投诉")
        with trio.fail_after(30):
            async for frame in alice.events:
                if (
                    isinstance(frame, ConversationEvent)
                    and frame.conversation.state is ConvState.QUEUED
                ):
                    break
    async with server.connect("sup", "supervisor", "shop1") as sup:
        from protocol import GetConversation

        info = await sup.request(GetConversation(id=0, conv=conv))
        assert info.conversation.priority >= 8
        assert "handoff:complaint" in info.conversation.tags
        assert any(tag.startswith("skill:") for tag in info.conversation.tags)


async def test_killed_bot_instance_neither_drops_nor_doubles_answers(
    server: RunningServer, tmp_path: Path
) -> None:
    import signal
    from collections import Counter

    seed_crm(tmp_path)
    customers = [f"fan{i}" for i in range(6)]
    with CrmRepository(tmp_path / "workers" / "crm" / "crm.db") as repo:
        now = datetime.now(UTC)
        for name in customers:
            repo.upsert_customer(name)
        repo.upsert_orders(
            [
                Order(
                    shop="shop1",
                    order_id=f"77{i}001",
                    customer=name,
                    channel="tmall",
                    status="in_transit",
                    amount_cents=1000,
                    carrier="SF Express",
                    tracking_no="SF1",
                    created_at=now,
                    updated_at=now,
                )
                for i, name in enumerate(customers)
            ]
        )
    answers: dict[str, list[str]] = {}
    async with (
        worker_process(server, "bot", tmp_path) as first,
        worker_process(server, "bot", tmp_path),
    ):

        async def customer(i: int, name: str) -> None:
            async with server.connect(name) as client:
                conv = (await client.request(OpenConversation(id=0, shop="shop1"))).conversation.id
                for q in range(8):
                    await client.send_text(conv, f"where is my order 77{i}001? ({q})")
                    if i == 0 and q == 3:
                        first.send_signal(signal.SIGKILL)
                texts: list[str] = []
                with trio.fail_after(60):
                    async for frame in client.events:
                        if (
                            isinstance(frame, MessageEvent)
                            and frame.message.sender.startswith("worker:")
                            and isinstance(frame.message.body, TextBody | QuickRepliesBody)
                            and f"77{i}001" in frame.message.body.text
                        ):
                            texts.append(frame.message.body.text)
                            if len(texts) == 8:
                                break
                answers[name] = texts

        async with trio.open_nursery() as nursery:
            for i, name in enumerate(customers):
                nursery.start_soon(customer, i, name)
    for name in customers:
        assert len(answers[name]) == 8, name
    # and nothing more arrives: each question was answered exactly once
    async with server.connect("auditor", "admin", "*") as admin:
        from protocol import History

        for name in customers:
            from imserver.gateway._ids import direct_conversation_id

            page = await admin.request(History(id=0, conv=direct_conversation_id("shop1", name)))
            bot = Counter(m.sender for m in page.messages if m.sender.startswith("worker:"))
            assert sum(bot.values()) == 8 + 1, (name, bot)  # 8 answers and one welcome
