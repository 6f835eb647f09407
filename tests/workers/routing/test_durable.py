"""Routing survives kill -9 and runs as several instances: real server, real worker processes.

The test stands in for the bot (a worker connection that hands conversations
off with the bot's tags) and for the agents (connections that go online and
close their chats); an observer watches every conversation event of the shops
and keeps the ledger the assertions read: who holds what, how often each
conversation was assigned, the highest load any agent ever had.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from imserver.client import Client
from protocol import (
    AgentStatus,
    ConversationEvent,
    ConvState,
    MessageEvent,
    OpenConversation,
    PluginEvent,
    SetAgentStatus,
    Subscribe,
    TextBody,
    Topic,
    UpdateConversation,
)
from tests.conftest import RunningServer
from tests.workers.conftest import worker_process
from workers.handoff import HANDOFF_PRIORITY, HandoffReason, handoff_tags

ROUTING_YAML = """
routing:
  sla_seconds: {sla}
  agent_grace_seconds: 600
  default_skills: [pre-sale]
  default_max_chats: {cap}
"""


def config(tmp: Path, cap: int, sla: float = 600) -> Path:
    path = tmp / "workers.yaml"
    path.write_text(ROUTING_YAML.format(cap=cap, sla=sla), encoding="utf-8")
    return path


@dataclass
class Ledger:
    """What the observer saw, event by event."""

    cap: int
    holding: dict[str, set[str]] = field(default_factory=dict)
    assignments: dict[str, list[str]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    max_load: int = 0

    def see(self, event: ConversationEvent) -> str | None:
        """Apply an event; the conversation id if it was an assignment."""
        conv = event.conversation
        for chats in self.holding.values():
            chats.discard(conv.id)
        if conv.state is not ConvState.ASSIGNED or not conv.agent:
            return None
        self.holding.setdefault(conv.agent, set()).add(conv.id)
        self.max_load = max(self.max_load, len(self.holding[conv.agent]))
        if event.change in ("assigned", "transferred"):
            self.assignments.setdefault(conv.id, []).append(conv.agent)
            self.order.append(conv.id)
            return conv.id
        return None

    @property
    def assigned(self) -> int:
        return len(self.assignments)


@asynccontextmanager
async def online_agents(
    server: RunningServer, shop: str, names: list[str]
) -> AsyncIterator[dict[str, Client]]:
    async with AsyncExitStack() as stack:
        agents = {}
        for name in names:
            agent = await stack.enter_async_context(server.connect(name, "agent", shop))
            await agent.request(SetAgentStatus(id=0, status=AgentStatus.ONLINE))
            agents[name] = agent
        yield agents


async def hand_off(
    server: RunningServer,
    bot: Client,
    shop: str,
    buyer: str,
    reason: HandoffReason = HandoffReason.REQUESTED,
) -> str:
    """A buyer opens a chat and the (stand-in) bot hands it off as the bot does."""
    async with server.connect(buyer) as client:
        conv: str = (await client.request(OpenConversation(id=0, shop=shop))).conversation.id
    await bot.request(
        UpdateConversation(
            id=0,
            conv=conv,
            state=ConvState.QUEUED,
            priority=HANDOFF_PRIORITY[reason],
            tags_add=handoff_tags(reason, "pre-sale"),
        )
    )
    return conv


async def next_assignment(observer: Client, ledger: Ledger) -> str:
    with trio.fail_after(30):
        async for frame in observer.events:
            if isinstance(frame, ConversationEvent) and (conv := ledger.see(frame)):
                return conv
    raise AssertionError("observer closed")


async def until_closed_seen(observer: Client, ledger: Ledger, conv: str) -> None:
    with trio.fail_after(30):
        async for frame in observer.events:
            if isinstance(frame, ConversationEvent):
                ledger.see(frame)
                if frame.conversation.id == conv and frame.conversation.state is ConvState.CLOSED:
                    return


async def close(agents: dict[str, Client], ledger: Ledger, conv: str) -> None:
    holder = next(a for a, chats in ledger.holding.items() if conv in chats)
    await agents[holder].request(UpdateConversation(id=0, conv=conv, state=ConvState.CLOSED))


async def routing_gone(server: RunningServer) -> None:
    """The server has noticed the killed instance (its shards moved)."""
    dispatcher = server.server.dispatcher
    assert dispatcher is not None
    with trio.fail_after(30):
        while (group := dispatcher.groups.get("routing")) is not None and group.instances:
            await dispatcher.membership_changed()


async def test_kill_9_with_chats_queued_and_assigned(server: RunningServer, tmp_path: Path) -> None:
    """Four chats assigned, four queued (a complaint last); routing is killed, the
    agents finish two chats meanwhile; a new routing process assigns from the store:
    the complaint first, then in order, every chat exactly once, nobody over 2."""
    cfg = config(tmp_path, cap=2)
    ledger = Ledger(cap=2)
    async with (
        server.connect("observer", "supervisor", "shop1") as observer,
        server.connect("bot", "worker", "*") as bot,
        online_agents(server, "shop1", ["a1", "a2"]) as agents,
    ):
        await observer.request(Subscribe(id=0, topics=[Topic.CONVERSATIONS]))
        async with worker_process(server, "routing", tmp_path, cfg) as first:
            convs = [await hand_off(server, bot, "shop1", f"b{i}") for i in range(4)]
            while ledger.assigned < 4:
                await next_assignment(observer, ledger)
            convs += [await hand_off(server, bot, "shop1", f"b{i}") for i in range(4, 7)]
            convs.append(await hand_off(server, bot, "shop1", "b7", HandoffReason.COMPLAINT))
            first.kill()  # SIGKILL: no goodbye
            await routing_gone(server)
        # routing is down; the agents finish one chat each meanwhile
        for conv in (convs[0], convs[1]):
            await close(agents, ledger, conv)
            await until_closed_seen(observer, ledger, conv)
        async with worker_process(server, "routing", tmp_path, cfg):
            restarted = {
                await next_assignment(observer, ledger),
                await next_assignment(observer, ledger),
            }
            assert restarted == {convs[7], convs[4]}  # the complaint jumps the queue
            for expected in (convs[5], convs[6]):
                await close(agents, ledger, convs[2] if expected == convs[5] else convs[3])
                assert await next_assignment(observer, ledger) == expected
    assert sorted(ledger.assignments) == sorted(convs)
    assert all(len(agents_) == 1 for agents_ in ledger.assignments.values()), ledger.assignments
    assert ledger.max_load <= 2


def _shops_on_both_parities() -> list[str]:
    """Two shops on even shards and two on odd ones: two instances own two each."""
    even = [s for s in (f"shop{i}" for i in range(1, 40)) if zlib.crc32(s.encode()) % 2 == 0]
    odd = [s for s in (f"shop{i}" for i in range(1, 40)) if zlib.crc32(s.encode()) % 2 == 1]
    return even[:2] + odd[:2]


async def test_two_instances_one_killed_never_over_capacity(
    server: RunningServer, tmp_path: Path
) -> None:
    """Four shops split between two routing instances; agents close every chat as it
    comes; half-way one instance is killed: every chat is still assigned exactly
    once and no agent ever holds more than max_chats."""
    shops = _shops_on_both_parities()
    cfg = config(tmp_path, cap=2)
    ledger = Ledger(cap=2)
    per_shop = 6
    async with AsyncExitStack() as stack:
        observer = await stack.enter_async_context(server.connect("observer", "worker", "*"))
        bot = await stack.enter_async_context(server.connect("bot", "worker", "*"))
        agents: dict[str, Client] = {}
        for shop in shops:
            await observer.request(Subscribe(id=0, topics=[Topic.CONVERSATIONS], shop=shop))
            agents.update(
                await stack.enter_async_context(
                    online_agents(server, shop, [f"{shop}-a1", f"{shop}-a2"])
                )
            )
        first = await stack.enter_async_context(worker_process(server, "routing", tmp_path, cfg))
        await stack.enter_async_context(worker_process(server, "routing", tmp_path, cfg))
        convs = [
            await hand_off(server, bot, shop, f"{shop}-b{i}")
            for i in range(per_shop)
            for shop in shops
        ]
        total = len(convs)
        killed = False
        while ledger.assigned < total:
            conv = await next_assignment(observer, ledger)
            if not killed and ledger.assigned >= total // 2:
                first.kill()
                killed = True
            await close(agents, ledger, conv)
        assert killed
    assert sorted(ledger.assignments) == sorted(convs)
    assert all(len(a) == 1 for a in ledger.assignments.values()), ledger.assignments
    assert ledger.max_load <= 2


async def test_a_burst_past_the_servers_request_bound_is_queued_on_one_connection(
    server: RunningServer, tmp_path: Path
) -> None:
    """300 handoffs at once, nobody online: routing tells all 300 their place without
    ever having more requests outstanding than the server allows (it would refuse
    them and, insisting, be disconnected)."""
    cfg = config(tmp_path, cap=2)
    dispatcher = server.server.dispatcher
    assert dispatcher is not None
    async with (
        server.connect("observer", "supervisor", "shop1") as observer,
        server.connect("bot", "worker", "*") as bot,
        worker_process(server, "routing", tmp_path, cfg),
    ):
        [instance] = dispatcher.groups["routing"].instances
        await observer.request(Subscribe(id=0, topics=[Topic.MESSAGES]))
        convs = []
        for i in range(300):
            async with server.connect(f"b{i}") as buyer:
                convs.append(
                    (await buyer.request(OpenConversation(id=0, shop="shop1"))).conversation.id
                )
        async with trio.open_nursery() as burst:
            for conv in convs:
                burst.start_soon(
                    partial(
                        bot.request,
                        UpdateConversation(
                            id=0,
                            conv=conv,
                            state=ConvState.QUEUED,
                            priority=HANDOFF_PRIORITY[HandoffReason.REQUESTED],
                            tags_add=handoff_tags(HandoffReason.REQUESTED, "pre-sale"),
                        ),
                    )
                )
        told: set[str] = set()
        with trio.fail_after(60):
            async for frame in observer.events:
                if (
                    isinstance(frame, MessageEvent)
                    and frame.message.sender == "worker:routing"
                    and isinstance(frame.message.body, TextBody)
                ):
                    told.add(frame.message.conv)
                    if len(told) == len(convs):
                        break
        assert dispatcher.groups["routing"].instances == [instance]  # never disconnected


async def test_an_sla_deadline_survives_a_restart(server: RunningServer, tmp_path: Path) -> None:
    """The SLA clock runs from the customer's stored message, not from when a routing
    process started: a deadline that passed while routing was down is a breach at once,
    counted from the message."""
    cfg = config(tmp_path, cap=1, sla=2)
    ledger = Ledger(cap=1)
    async with (
        server.connect("observer", "supervisor", "shop1") as observer,
        server.connect("bot", "worker", "*") as bot,
        server.connect("buyer") as buyer,
        online_agents(server, "shop1", ["a1", "a2"]),
    ):
        await observer.request(Subscribe(id=0, topics=[Topic.CONVERSATIONS, Topic.DASHBOARD]))
        conv = (await buyer.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        async with worker_process(server, "routing", tmp_path, cfg) as first:
            await bot.request(
                UpdateConversation(
                    id=0,
                    conv=conv,
                    state=ConvState.QUEUED,
                    tags_add=handoff_tags(HandoffReason.REQUESTED, "pre-sale"),
                )
            )
            await next_assignment(observer, ledger)
            asked = await buyer.send_text(conv, "hello? anyone?")
            first.kill()
            await routing_gone(server)
        # routing stays down past the deadline (the scenario, not a synchronisation)
        await trio.sleep(2.5)
        async with worker_process(server, "routing", tmp_path, cfg):
            rejoined_ms = time.time() * 1000
            with trio.fail_after(30):
                async for frame in observer.events:
                    if isinstance(frame, PluginEvent) and frame.kind == "sla_breach":
                        waited = frame.data["waiting_seconds"]
                        break
    # counted from the stored message: longer than the routing process has existed
    assert waited >= (rejoined_ms - asked.ts) / 1000 > 2.5
