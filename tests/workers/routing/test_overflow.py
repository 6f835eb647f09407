"""Overflow, grace period and business hours with the real bot, routing and CRM processes."""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from imserver.client import Client
from protocol import (
    AgentStatus,
    ConversationEvent,
    ConvState,
    MessageEvent,
    OpenConversation,
    QuickRepliesBody,
    SetAgentStatus,
    Subscribe,
    TextBody,
    Topic,
    UpdateConversation,
)
from tests.conftest import RunningServer
from tests.workers.conftest import worker_process
from workers.handoff import TAG_OVERFLOW, TAG_REQUEUED

WORKERS_YAML = """
routing:
  sla_seconds: 600
  agent_grace_seconds: {grace}
  queue_limit: 2
  default_skills: [pre-sale, after-sale, refunds, logistics]
  default_max_chats: 1
bot:
  hours: {{shop1: {{timezone: UTC, weekly: {{mon-sun: "{hours}"}}}}}}
"""


@asynccontextmanager
async def shop_workers(
    server: RunningServer, tmp: Path, *, grace: float = 600, hours: str = "00:00-24:00"
) -> AsyncIterator[None]:
    config = tmp / "workers.yaml"
    config.write_text(WORKERS_YAML.format(grace=grace, hours=hours), encoding="utf-8")
    async with AsyncExitStack() as stack:
        for name in ("crm", "routing", "bot"):
            await stack.enter_async_context(worker_process(server, name, tmp, config))
        yield


SEEN: weakref.WeakKeyDictionary[Client, list[ConversationEvent]] = weakref.WeakKeyDictionary()
"""Conversation events a client received, so that a later wait also finds an event
that arrived while the test waited for another."""


async def conversation_event(
    client: Client, conv: str, *, state: ConvState, agent: str | None = None, tag: str | None = None
) -> ConversationEvent:
    def wanted(frame: ConversationEvent) -> bool:
        c = frame.conversation
        return (
            c.id == conv
            and c.state is state
            and (agent is None or c.agent == agent)
            and (tag is None or tag in c.tags)
        )

    seen = SEEN.setdefault(client, [])
    for i, frame in enumerate(seen):
        if wanted(frame):
            del seen[: i + 1]
            return frame
    with trio.fail_after(30):
        async for event in client.events:
            if isinstance(event, ConversationEvent):
                if wanted(event):
                    return event
                seen.append(event)
    raise AssertionError("closed")


async def text_from(client: Client, sender: str, contains: str) -> str:
    with trio.fail_after(30):
        async for frame in client.events:
            if (
                isinstance(frame, MessageEvent)
                and frame.message.sender == sender
                and isinstance(frame.message.body, TextBody)
                and contains in frame.message.body.text
            ):
                return frame.message.body.text
    raise AssertionError("closed")


async def test_queue_limit_2_with_5_buyers_serves_all_5_in_order(
    server: RunningServer, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(shop_workers(server, tmp_path))
        sup = await stack.enter_async_context(server.connect("sup", "supervisor", "shop1"))
        await sup.request(Subscribe(id=0, topics=[Topic.CONVERSATIONS]))
        agent = await stack.enter_async_context(server.connect("a1", "agent", "shop1"))
        await agent.request(SetAgentStatus(id=0, status=AgentStatus.ONLINE))
        buyers: list[Client] = []
        convs: list[str] = []
        for i in range(5):
            buyer = await stack.enter_async_context(server.connect(f"b{i}"))
            conv = (await buyer.request(OpenConversation(id=0, shop="shop1"))).conversation.id
            await buyer.send_text(conv, "转人工")
            # one at a time, so that the queue order is the order they asked
            await conversation_event(
                sup, conv, state=ConvState.ASSIGNED if i == 0 else ConvState.QUEUED
            )
            buyers.append(buyer)
            convs.append(conv)
        # b1, b2 wait in the queue; b3, b4 found it at its limit: told the shop is busy
        for i in (3, 4):
            await text_from(buyers[i], "worker:routing", "当前咨询人数较多")
        for i in (3, 4):
            await conversation_event(sup, convs[i], state=ConvState.QUEUED, tag=TAG_OVERFLOW)
        await text_from(buyers[2], "worker:routing", "您前面还有1位")
        # ... and the bot keeps answering an overflowing buyer meanwhile
        await buyers[4].send_text(convs[4], "可以开发票吗")
        await text_from(buyers[4], "worker:bot", "发票")
        # the agent works through the queue: each chat is assigned in its turn
        served = [convs[0]]
        SEEN.pop(sup, None)
        while len(served) < len(convs):
            await agent.request(UpdateConversation(id=0, conv=served[-1], state=ConvState.CLOSED))
            with trio.fail_after(30):
                async for frame in sup.events:
                    if (
                        isinstance(frame, ConversationEvent)
                        and frame.change == "assigned"
                        and frame.conversation.agent == "a1"
                    ):
                        served.append(frame.conversation.id)
                        assert TAG_OVERFLOW not in frame.conversation.tags
                        break
        assert served == convs


async def test_an_agent_gone_past_the_grace_period_loses_chats_to_the_queue_head(
    server: RunningServer, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(shop_workers(server, tmp_path, grace=1))
        sup = await stack.enter_async_context(server.connect("sup", "supervisor", "shop1"))
        await sup.request(Subscribe(id=0, topics=[Topic.CONVERSATIONS]))
        first = await stack.enter_async_context(server.connect("first"))
        conv = (await first.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        async with server.connect("gone", "agent", "shop1") as gone:
            await gone.request(SetAgentStatus(id=0, status=AgentStatus.ONLINE))
            await first.send_text(conv, "转人工")
            await conversation_event(sup, conv, state=ConvState.ASSIGNED, agent="gone")
        # the agent's connection closed (offline); meanwhile another buyer queues up
        later = await stack.enter_async_context(server.connect("later"))
        conv2 = (await later.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await later.send_text(conv2, "转人工")
        await conversation_event(sup, conv2, state=ConvState.QUEUED)
        # after the grace period the chat goes back to the queue: at its head
        await conversation_event(sup, conv, state=ConvState.QUEUED, tag=TAG_REQUEUED)
        # a colleague comes online (one slot): the requeued chat first, the previous
        # agent noted
        colleague = await stack.enter_async_context(server.connect("next", "agent", "shop1"))
        await colleague.request(SetAgentStatus(id=0, status=AgentStatus.ONLINE))
        note = await conversation_event(colleague, conv, state=ConvState.ASSIGNED, agent="next")
        while "gone" not in note.note:
            note = await conversation_event(colleague, conv, state=ConvState.ASSIGNED)
        assert "previously with gone" in note.note
        assert (
            await conversation_event(sup, conv, state=ConvState.ASSIGNED)
        ).conversation.agent == "next"


async def test_out_of_hours_an_online_agent_is_assigned_and_the_bot_does_not_say_closed(
    server: RunningServer, tmp_path: Path
) -> None:
    """The rule: an online agent makes the shop open. Outside its hours (a one-minute
    window that is not now) the bot says when humans are back only if nobody is online."""
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(shop_workers(server, tmp_path, hours=_not_now()))
        sup = await stack.enter_async_context(server.connect("sup", "supervisor", "shop1"))
        await sup.request(Subscribe(id=0, topics=[Topic.CONVERSATIONS]))
        night = await stack.enter_async_context(server.connect("night", "customer"))
        conv = (await night.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await night.send_text(conv, "转人工")
        said = await bot_says_until_handoff(night)
        assert any(OFFLINE_MARK in text for text in said), said  # nobody online: "back at"
        await conversation_event(sup, conv, state=ConvState.QUEUED)
        agent = await stack.enter_async_context(server.connect("owl", "agent", "shop1"))
        await agent.request(SetAgentStatus(id=0, status=AgentStatus.ONLINE))
        # routing assigns the online agent at night: the queue is served
        await conversation_event(sup, conv, state=ConvState.ASSIGNED, agent="owl")
        # ... and with an agent online, the next buyer is not told the shop is closed
        late = await stack.enter_async_context(server.connect("late", "customer"))
        conv2 = (await late.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await late.send_text(conv2, "转人工")
        said = await bot_says_until_handoff(late)
        assert not any(OFFLINE_MARK in text for text in said), said


OFFLINE_MARK = "上线"
"""In the away and offline-handoff texts (人工客服将于{back_at}上线)."""


async def bot_says_until_handoff(client: Client) -> list[str]:
    """The bot's texts up to its handoff reply (转接: staffed; 登记: nobody is in)."""
    said: list[str] = []
    with trio.fail_after(30):
        async for frame in client.events:
            if isinstance(frame, MessageEvent) and frame.message.sender == "worker:bot":
                body = frame.message.body
                text = body.text if isinstance(body, TextBody | QuickRepliesBody) else ""
                said.append(text)
                if "转接" in text or "登记" in text:
                    return said
    raise AssertionError("closed")


def _not_now() -> str:
    """A one-minute daily window twelve hours from now (UTC)."""
    hour = (time.gmtime().tm_hour + 12) % 24
    return f"{hour:02d}:00-{hour:02d}:01"
