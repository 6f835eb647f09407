"""``imserver chat``: every frame a buyer or agent can receive renders as words (the
rendering functions directly), and the CLI for real against a live server: /help is
local, quick replies are picked by number, an agent sees the queue, claims, gets the
history, and the buyer sees "a1 is now serving this chat"."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import trio

from imserver.chat import (
    render_body,
    render_conversation_event,
    render_plugin_event,
    render_system,
)
from protocol import (
    AnyBody,
    Conversation,
    ConversationEvent,
    ConvKind,
    ConvState,
    FileBody,
    History,
    HistoryPage,
    ImageBody,
    OrderCardBody,
    PluginEvent,
    ProductCardBody,
    QuickRepliesBody,
    RecallBody,
    SystemBody,
    TextBody,
    UpdateConversation,
    VoiceBody,
)
from tests.conftest import SECRET, RunningServer
from workers.crm.models import Order
from workers.crm.repository import CrmRepository

REPR = re.compile(r"[{}]|\b[A-Z]\w*\(\w+=|\bNone\b|\bTrue\b|\bFalse\b")
"""What a Python dict, Struct or repr leaves in text."""


def test_every_body_renders_as_words() -> None:
    bodies: list[tuple[AnyBody, str]] = [
        (TextBody(text="hello"), "hello"),
        (
            QuickRepliesBody(text="Anything else?", options=["查订单", "转人工"]),
            "Anything else?\n    [1] 查订单  [2] 转人工",
        ),
        (
            OrderCardBody(
                order_id="12345",
                status="shipped",
                amount_cents=19900,
                items=["Down jacket"],
                url="https://s/o/12345",
            ),
            "[order 12345] shipped, ¥199.00 (Down jacket) https://s/o/12345",
        ),
        (
            ProductCardBody(product_id="p1", title="Scarf", price_cents=5900, currency="USD"),
            "[product p1] Scarf, $59.00",
        ),
        (
            ImageBody(
                url="https://i/1.png", hash="h", size=20480, mime="image/png", width=64, height=48
            ),
            "[image 64x48, 20 KB] https://i/1.png",
        ),
        (
            VoiceBody(url="https://v/1", hash="h", size=100, mime="audio/ogg", duration_ms=5000),
            "[voice 5 s] https://v/1",
        ),
        (
            FileBody(url="https://f/1", hash="h", size=10, mime="text/plain", name="a.txt"),
            "[file a.txt, 10 B] https://f/1",
        ),
        (RecallBody(seq=7), "(message #7 was recalled)"),
        (
            SystemBody(event="assigned", data={"state": "assigned", "agent": "a1"}),
            "* a1 is now serving this chat",
        ),
        (
            SystemBody(
                event="transferred", data={"agent": "a2", "from": "a1", "state": "assigned"}
            ),
            "* transferred from a1 to a2",
        ),
        (
            SystemBody(event="requeued", data={"previous_agent": "a1", "reason": "offline"}),
            "* a1 is away (offline); back in the queue for the next agent",
        ),
        (
            SystemBody(event="members", data={"added": "u1,u2", "removed": ""}),
            "* members added u1,u2",
        ),
        (SystemBody(event="closed", data={"state": "closed"}), "* the chat was closed"),
    ]
    for body, text in bodies:
        assert render_body(body) == text
    # An event this client does not know still reads as words.
    assert render_system("price_changed", {"sku": "p1", "new_price": "59"}) == (
        "price changed: sku p1, new price 59"
    )


def test_conversation_and_plugin_events_render_as_words(tmp_path: Path) -> None:
    conv = Conversation(
        id="c1",
        kind=ConvKind.DIRECT,
        shop="shop1",
        state=ConvState.ASSIGNED,
        customer="buyer1",
        agent="a1",
        priority=8,
        tags=["handoff:complaint"],
    )
    mine = ConversationEvent(conversation=conv, change="assigned", note="angry about 12345")
    assert render_conversation_event(mine, "a1") == (
        "** chat c1 is yours now (customer buyer1)\n   note: angry about 12345"
    )
    queued = ConversationEvent(
        conversation=msgspec.structs.replace(conv, state=ConvState.QUEUED, agent=None),
        change="queued",
        by="worker:bot",
    )
    assert render_conversation_event(queued, "a1") == (
        "-- new in the queue: c1  customer buyer1  via web  priority 8  tags handoff:complaint"
        " by worker:bot"
    )
    queue = PluginEvent(plugin="routing", kind="queue", data={"position": 3, "eta_seconds": 150})
    assert render_plugin_event(queue) == "* you are number 3 in the queue, about 2 min"
    stats = PluginEvent(
        plugin="bot", kind="bot_stats", data={"deflection_rate": 0.5, "by_reason": {"complaint": 2}}
    )
    assert render_plugin_event(stats) == (
        '(bot bot stats: deflection rate 0.5, by reason {"complaint":2})'
    )

    # The CRM sidebar exactly as the CRM plugin sends it (a real profile, to_builtins).
    now = datetime.now(UTC)
    with CrmRepository(tmp_path / "crm.db") as repo:
        repo.upsert_customer("cu1", display_name="Alice")
        repo.link_identity("taobao", "alice_tb", "cu1")
        repo.set_level("cu1", 3)
        repo.add_tag("shop1", "cu1", "big-spender")
        repo.upsert_orders(
            [
                Order(
                    shop="shop1",
                    order_id="12345",
                    customer="cu1",
                    channel="taobao",
                    status="shipped",
                    amount_cents=19900,
                    created_at=now - timedelta(days=1),
                    updated_at=now,
                )
            ]
        )
        profile = repo.profile("shop1", "cu1")
    data = msgspec.to_builtins(profile)
    data["conv"] = "c1"
    text = render_plugin_event(PluginEvent(plugin="crm", kind="profile", data=data))
    assert text == (
        "== customer Alice (cu1), level 3 VIP\n"
        "   tags: big-spender\n"
        "   1 orders, spent ¥199.00\n"
        "   order 12345: shipped, ¥199.00\n"
        "   identities: taobao:alice_tb"
    )
    assert not REPR.search(text.replace("(cu1)", ""))


class Cli:
    """``imserver chat`` as a child process: lines in, lines out."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.out: list[str] = []
        self._buffer = b""

    async def say(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

    async def until(self, pattern: str) -> str:
        """The next output line matching ``pattern`` (every line read is kept in out)."""
        assert self.process.stdout is not None
        with trio.fail_after(30):
            while True:
                while b"\n" in self._buffer:
                    raw, self._buffer = self._buffer.split(b"\n", 1)
                    line = raw.decode()
                    self.out.append(line)
                    if re.search(pattern, line):
                        return line
                chunk = await self.process.stdout.receive_some(65_536)
                assert chunk, f"chat exited; output so far: {self.out}"
                self._buffer += chunk


async def _cli(server: RunningServer, nursery: trio.Nursery, *args: str) -> Cli:
    command = [
        sys.executable,
        "-m",
        "imserver",
        "chat",
        "--url",
        server.url,
        "--secret",
        SECRET.decode(),
        "--data",
        str(server.data_dir),
        "--shop",
        "shop1",
        *args,
    ]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    nursery.start_soon(process.wait)
    return Cli(process)


async def test_the_cli_for_a_buyer_and_an_agent(server: RunningServer) -> None:
    async with trio.open_nursery() as nursery:
        buyer = await _cli(server, nursery, "--channel", "taobao", "buyer1")
        banner = await buyer.until("^connected as buyer1")
        conv = banner.split("chat: ")[1].split(";")[0]
        await buyer.say("/help")
        await buyer.until(r"^  /queue ")
        await buyer.say("/nonsense")
        await buyer.until("^unknown command /nonsense")
        await buyer.say("hello, is the jacket in stock?")
        await buyer.until(r"^   \(sent #1\)")

        async with server.connect("bot", "worker", "*") as bot:
            await bot.send(conv, QuickRepliesBody(text="Pick one", options=["Size M", "Size L"]))
        await buyer.until(r"^    \[1\] Size M  \[2\] Size L$")
        await buyer.say("2")
        await buyer.until(r"^   \(sent #3\)")
        async with server.connect("sup", "supervisor", "shop1") as sup:
            await sup.request(UpdateConversation(id=0, conv=conv, state=ConvState.QUEUED))

        agent = await _cli(server, nursery, "--role", "agent", "a1")
        await agent.until(f"^   {conv}  customer buyer1  via taobao .*waiting")
        await agent.until("^-- your chats: none")
        await agent.say(f"/claim {conv}")
        await agent.until(f"^-- the last \\d+ messages of {conv}")
        await agent.until(r"#3 buyer1: Size L$")
        await agent.say("Size L is in stock")
        await agent.until(r"^   \(sent #\d+\)")
        await buyer.until(r"\* a1 is now serving this chat$")
        await buyer.until(r"a1: Size L is in stock$")
        for cli in (buyer, agent):
            await cli.say("/quit")
            assert await cli.process.wait() == 0

        # Back later: the buyer sees the recent history first.
        again = await _cli(server, nursery, "buyer1")
        await again.until(f"^-- the last \\d+ messages of {conv}")
        await again.until(r"#1 buyer1: hello, is the jacket in stock\?$")
        await again.say("/quit")
        assert await again.process.wait() == 0

    async with server.connect("sup", "supervisor", "shop1") as sup:
        page: HistoryPage = await sup.request(History(id=0, conv=conv))
    texts = [getattr(m.body, "text", "") for m in page.messages]
    assert "/help" not in texts and "/nonsense" not in texts and "2" not in texts
    assert texts[:3] == ["hello, is the jacket in stock?", "Pick one", "Size L"]
    for cli in (buyer, agent, again):
        assert not any(REPR.search(line) for line in cli.out if "sent #" not in line), cli.out
