"""Bot, routing and CRM workers together, for real: handoff, queue, SLA."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from imserver.client import Client
from protocol import (
    AgentStatus,
    ConversationEvent,
    ConvState,
    GetConversation,
    OpenConversation,
    PluginEvent,
    SetAgentStatus,
    UpdateConversation,
)
from tests.conftest import RunningServer
from tests.workers.conftest import worker_process

AGENTS = """
routing:
  sla_seconds: {sla}
  agents:
    - {{id: a_pre, shop: shop1, skills: [pre-sale, logistics{extra}], max_chats: {cap}}}
    - {{id: a_ref, shop: shop1, skills: [refunds, after-sale{extra}], max_chats: {cap}}}
"""


@asynccontextmanager
async def workers(
    server: RunningServer, tmp: Path, *, sla: float = 60, cap: int = 5, shared_skill: str = ""
) -> AsyncIterator[None]:
    config = tmp / "workers.yaml"
    extra = f", {shared_skill}" if shared_skill else ""
    config.write_text(AGENTS.format(sla=sla, cap=cap, extra=extra), encoding="utf-8")
    async with AsyncExitStack() as stack:
        for name in ("crm", "routing", "bot"):
            await stack.enter_async_context(worker_process(server, name, tmp, config))
        yield


@asynccontextmanager
async def online_agent(server: RunningServer, name: str) -> AsyncIterator[Client]:
    async with server.connect(name, "agent", "shop1") as agent:
        await agent.request(SetAgentStatus(id=0, status=AgentStatus.ONLINE))
        yield agent


async def _assigned_to(client: Client, conv: str) -> str:
    """The agent a conversation gets assigned to next, as the customer sees it."""
    with trio.fail_after(30):
        async for frame in client.events:
            if (
                isinstance(frame, ConversationEvent)
                and frame.conversation.id == conv
                and frame.conversation.state is ConvState.ASSIGNED
                and frame.conversation.agent
            ):
                return frame.conversation.agent
    raise AssertionError("never assigned")


async def test_complaint_goes_to_a_refunds_agent_at_high_priority(
    server: RunningServer, tmp_path: Path
) -> None:
    async with (
        workers(server, tmp_path),
        online_agent(server, "a_pre"),
        online_agent(server, "a_ref"),
        server.connect("buyer") as buyer,
    ):
        conv = (await buyer.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await buyer.send_text(conv, "我要投诉")
        assert await _assigned_to(buyer, conv) == "a_ref"
        async with server.connect("sup", "supervisor", "shop1") as sup:
            info = await sup.request(GetConversation(id=0, conv=conv))
        assert info.conversation.priority >= 8


async def test_full_agents_queue_with_positions_that_go_down(
    server: RunningServer, tmp_path: Path
) -> None:
    async with (
        workers(server, tmp_path, cap=1),
        online_agent(server, "a_pre") as agent,
        server.connect("b1") as b1,
        server.connect("b2") as b2,
        server.connect("b3") as b3,
    ):
        convs = {}
        for name, client in (("b1", b1), ("b2", b2), ("b3", b3)):
            convs[name] = (
                await client.request(OpenConversation(id=0, shop="shop1"))
            ).conversation.id
            await client.send_text(convs[name], "转人工")
            if name == "b1":
                assert await _assigned_to(b1, convs["b1"]) == "a_pre"
        positions: list[int] = []
        with trio.fail_after(30):
            async for frame in b3.events:
                if isinstance(frame, PluginEvent) and frame.kind == "queue":
                    positions.append(frame.data["position"])
                    if positions[-1] == 2:
                        break
        # the agent finishes with b1: b2 is served, b3 moves up
        await agent.request(UpdateConversation(id=0, conv=convs["b1"], state=ConvState.CLOSED))
        assert await _assigned_to(b2, convs["b2"]) == "a_pre"
        with trio.fail_after(30):
            async for frame in b3.events:
                if isinstance(frame, PluginEvent) and frame.kind == "queue":
                    positions.append(frame.data["position"])
                    if positions[-1] == 1:
                        break
        assert positions[-2:] == [2, 1]


async def test_agent_who_does_not_reply_loses_the_chat(
    server: RunningServer, tmp_path: Path
) -> None:
    async with (
        workers(server, tmp_path, sla=1, shared_skill="pre-sale"),
        online_agent(server, "a_pre"),
        online_agent(server, "a_ref"),
        server.connect("slowpoke") as buyer,
    ):
        conv = (await buyer.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await buyer.send_text(conv, "转人工")  # the bot hands off for skill pre-sale
        first = await _assigned_to(buyer, conv)
        # nobody answers within the 1 s SLA: the chat moves to the other agent
        second = await _assigned_to(buyer, conv)
        assert {first, second} == {"a_pre", "a_ref"}
