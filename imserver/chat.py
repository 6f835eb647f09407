"""``imserver chat``: a line-based terminal chat for buyers and agents.

A customer opens (or reopens) their conversation with the shop and sees its
recent history. An agent goes online (routing assigns them chats), sees the
shop's queue and their own chats, is told of each new assignment (with the
buyer's CRM profile when the CRM worker runs), and claims with ``/claim``.
Lines typed are sent to the current conversation; lines starting with ``/``
are commands and never sent (``/help`` lists them). A dropped connection is
resumed: what was missed is replayed, so nothing is lost from the screen.

Rendering is a set of pure functions (``render_*``): every body, system event,
conversation change and plugin event becomes words, never a Python repr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import trio

from protocol import (
    AgentStatus,
    AnyBody,
    Channel,
    CloseCode,
    Conversation,
    ConversationEvent,
    ConversationInfo,
    ConversationPage,
    ConvState,
    FileBody,
    History,
    HistoryPage,
    ImageBody,
    ListConversations,
    Message,
    MessageEvent,
    OpenConversation,
    OrderCardBody,
    PluginEvent,
    ProductCardBody,
    QuickRepliesBody,
    RecallBody,
    ReceiptEvent,
    SetAgentStatus,
    Subscribe,
    SystemBody,
    TextBody,
    Topic,
    TypingEvent,
    UpdateConversation,
    VoiceBody,
)

from .auth import mint_token
from .client import Client, ConnectionClosed, ServerError, connect

HISTORY_ON_OPEN: Final = 10
"""Messages shown when a conversation is opened or claimed."""
QUEUE_SHOWN: Final = 20
"""Queued chats listed by ``/queue`` and at an agent's start."""
RECONNECT_BACKOFF_S: Final = (0.5, 1.0, 2.0, 5.0)

HELP: Final = """commands (never sent as messages):
  /help              this list
  /history [N]       the last N messages of the current chat (default 10)
  /queue             agents: the shop's waiting chats and your own
  /claim CONV        agents: take a chat and make it the current one
  /switch CONV       agents: make CONV the current chat
  /close             close the current chat
  /quit              leave (an agent goes offline)
  1, 2, ...          pick a quick reply offered by the last message
anything else is sent to the current chat."""

_json = msgspec.json.Encoder()

_CURRENCY_SIGNS: Final = {"CNY": "¥", "USD": "$", "EUR": "€", "JPY": "¥", "GBP": "£"}


def money(cents: int, currency: str) -> str:
    sign = _CURRENCY_SIGNS.get(currency.upper())
    amount = f"{cents / 100:,.2f}"
    return f"{sign}{amount}" if sign else f"{amount} {currency.upper()}"


def _size(size: int) -> str:
    return f"{size} B" if size < 1024 else f"{size / 1024:.0f} KB"


def _value(value: Any) -> str:
    """A data value in words: strings as they are, the rest as compact JSON."""
    if isinstance(value, str):
        return value
    return _json.encode(value).decode()


def render_fields(data: Mapping[str, Any]) -> str:
    return ", ".join(f"{key.replace('_', ' ')} {_value(value)}" for key, value in data.items())


_SYSTEM: Final[Mapping[str, str]] = {
    "assigned": "{agent} is now serving this chat",
    "transferred": "transferred from {from} to {agent}",
    "queued": "waiting for an agent",
    "closed": "the chat was closed",
    "reopened": "the chat was reopened",
    "requeued": "{previous_agent} is away ({reason}); back in the queue for the next agent",
}


def render_system(event: str, data: Mapping[str, str]) -> str:
    if event == "members":
        parts = [
            f"{what} {data[key]}"
            for key, what in (("added", "added"), ("removed", "removed"))
            if data.get(key)
        ]
        return "members " + "; ".join(parts) if parts else "members changed"
    template = _SYSTEM.get(event)
    if template is not None:
        try:
            return template.format_map(data)
        except KeyError:
            pass
    rest = render_fields(data)
    return f"{event.replace('_', ' ')}" + (f": {rest}" if rest else "")


def render_body(body: AnyBody) -> str:
    if isinstance(body, TextBody):
        return body.text
    if isinstance(body, QuickRepliesBody):
        options = "  ".join(f"[{i}] {option}" for i, option in enumerate(body.options, 1))
        return f"{body.text}\n    {options}"
    if isinstance(body, SystemBody):
        return f"* {render_system(body.event, body.data)}"
    if isinstance(body, OrderCardBody):
        items = f" ({', '.join(body.items)})" if body.items else ""
        url = f" {body.url}" if body.url else ""
        return (
            f"[order {body.order_id}] {body.status}, "
            f"{money(body.amount_cents, body.currency)}{items}{url}"
        )
    if isinstance(body, ProductCardBody):
        url = f" {body.url}" if body.url else ""
        return f"[product {body.product_id}] {body.title}, {money(body.price_cents, body.currency)}{url}"
    if isinstance(body, ImageBody):
        dims = f"{body.width}x{body.height}, " if body.width and body.height else ""
        return f"[image {dims}{_size(body.size)}] {body.url}"
    if isinstance(body, VoiceBody):
        return f"[voice {body.duration_ms / 1000:.0f} s] {body.url}"
    if isinstance(body, FileBody):
        return f"[file {body.name}, {_size(body.size)}] {body.url}"
    assert isinstance(body, RecallBody)  # AnyBody is closed: the decoder admits no other
    return f"(message #{body.seq} was recalled)"


def render_message(message: Message, *, show_conv: bool = False) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(message.ts / 1000))
    where = f"[{message.conv}] " if show_conv else ""
    return f"{stamp} {where}#{message.seq} {message.sender}: {render_body(message.body)}"


def render_conversation(conv: Conversation, *, now_ms: int | None = None) -> str:
    parts = [conv.id, f"customer {conv.customer or '-'}", f"via {conv.channel.value}"]
    if conv.priority:
        parts.append(f"priority {conv.priority}")
    if conv.agent:
        parts.append(f"agent {conv.agent}")
    if conv.state is ConvState.QUEUED and now_ms is not None:
        parts.append(f"waiting {max(0, now_ms - conv.updated_at) // 1000} s")
    if conv.tags:
        parts.append("tags " + ", ".join(conv.tags))
    return "  ".join(parts)


def render_conversation_event(frame: ConversationEvent, me: str) -> str:
    conv = frame.conversation
    change = frame.change
    if change in ("assigned", "transferred") and conv.agent == me:
        text = f"** chat {conv.id} is yours now (customer {conv.customer or '-'})"
    elif change == "queued":
        text = f"-- new in the queue: {render_conversation(conv)}"
    elif change in ("assigned", "transferred"):
        text = f"-- chat {conv.id} {change} to {conv.agent or '-'}"
    else:
        text = f"-- chat {conv.id} {change.replace('_', ' ')} (state {conv.state.value})"
    if frame.by:
        text += f" by {frame.by}"
    if frame.note:
        text += f"\n   note: {frame.note}"
    return text


def render_profile(data: Mapping[str, Any]) -> str:
    """The CRM sidebar (``workers.crm`` ``CustomerProfile``) as a few lines."""
    name = data.get("display_name") or data.get("customer", "?")
    head = [f"customer {name} ({data.get('customer', '?')})"]
    level = data.get("member_level")
    if level is not None:
        head.append(f"level {level}" + (" VIP" if data.get("is_vip") else ""))
    if data.get("points"):
        head.append(f"{data['points']} points")
    if data.get("segment"):
        head.append(f"segment {data['segment']}")
    lines = ["== " + ", ".join(head)]
    tags = [t["tag"] if isinstance(t, Mapping) else str(t) for t in data.get("tags", [])]
    if tags:
        lines.append("   tags: " + ", ".join(tags))
    value = data.get("lifetime_value") or {}
    spent = ", ".join(money(int(cents), currency) for currency, cents in value.items())
    lines.append(f"   {data.get('order_count', 0)} orders" + (f", spent {spent}" if spent else ""))
    for order in data.get("recent_orders", []):
        amount = money(int(order.get("amount_cents", 0)), str(order.get("currency", "CNY")))
        lines.append(f"   order {order.get('order_id')}: {order.get('status')}, {amount}")
    channels = [
        f"{c['channel']}:{c['external_id']}"
        for c in data.get("channels", [])
        if isinstance(c, Mapping)
    ]
    if channels:
        lines.append("   identities: " + ", ".join(channels))
    return "\n".join(lines)


def render_plugin_event(frame: PluginEvent) -> str:
    data = frame.data
    if frame.kind == "profile":
        return render_profile(data)
    if frame.kind == "queue":
        eta = data.get("eta_seconds")
        wait = f", about {max(1, round(eta / 60))} min" if isinstance(eta, int | float) else ""
        return f"* you are number {data.get('position')} in the queue{wait}"
    if frame.kind == "sla_breach":
        return (
            f"!! {data.get('agent')} has not answered chat {data.get('conv')} for "
            f"{_value(data.get('waiting_seconds'))} s"
        )
    return f"({frame.plugin} {frame.kind.replace('_', ' ')}: {render_fields(data)})"


def render_frame(frame: object, me: str, *, show_conv: bool) -> str | None:
    if isinstance(frame, MessageEvent):
        return render_message(frame.message, show_conv=show_conv)
    if isinstance(frame, ConversationEvent):
        return render_conversation_event(frame, me)
    if isinstance(frame, PluginEvent):
        return render_plugin_event(frame)
    if isinstance(frame, TypingEvent):
        return f"   ({frame.user} is typing)"
    if isinstance(frame, ReceiptEvent):
        return f"   ({frame.user} {frame.kind} up to #{frame.seq})"
    return None


# ---------------------------------------------------------------- the session


@dataclass
class ChatState:
    """What survives a reconnect: where we are and what we have seen."""

    user: str
    role: str
    conv: str | None = None
    channel: str = "web"
    seen: dict[str, int] = field(default_factory=dict)
    options: list[str] = field(default_factory=list)
    """The quick replies offered last (typing ``2`` sends the second)."""
    quit: bool = False
    connected: bool = False
    """Connected before: a new connection is a reconnect (no banner, no history)."""

    def note(self, message: Message) -> None:
        self.seen[message.conv] = max(self.seen.get(message.conv, 0), message.seq)
        if message.sender != self.user and isinstance(message.body, QuickRepliesBody):
            self.options = list(message.body.options)


def _say(text: str) -> None:
    print(text, flush=True)


async def _printer(client: Client, state: ChatState) -> None:
    staff = state.role != "customer"
    async for frame in client.events:
        if isinstance(frame, MessageEvent):
            state.note(frame.message)
        if (
            isinstance(frame, ConversationEvent)
            and frame.change in ("assigned", "transferred")
            and frame.conversation.agent == state.user
            and state.conv is None
        ):
            state.conv = frame.conversation.id
        line = render_frame(frame, state.user, show_conv=staff)
        if line is not None:
            _say(line)


async def _history(client: Client, state: ChatState, conv: str, limit: int) -> None:
    page: HistoryPage = await client.request(History(id=0, conv=conv, limit=limit))
    if page.messages:
        _say(f"-- the last {len(page.messages)} messages of {conv}")
    for message in page.messages:
        state.note(message)
        _say(render_message(message))


async def _queue(client: Client, state: ChatState) -> None:
    now = int(time.time() * 1000)
    queued: ConversationPage = await client.request(
        ListConversations(id=0, state=ConvState.QUEUED, limit=QUEUE_SHOWN)
    )
    _say(f"-- queue: {len(queued.conversations)}{'+' if queued.has_more else ''} waiting")
    for conv in queued.conversations:
        _say(f"   {render_conversation(conv, now_ms=now)}")
    mine: ConversationPage = await client.request(
        ListConversations(id=0, state=ConvState.ASSIGNED, limit=QUEUE_SHOWN)
    )
    own = [c for c in mine.conversations if c.agent == state.user]
    _say(f"-- your chats: {', '.join(c.id for c in own) if own else 'none'}")


async def _command(client: Client, state: ChatState, line: str) -> None:
    """One typed line: a command (handled here, never sent) or a message."""
    word, _, rest = line.partition(" ")
    rest = rest.strip()
    if word == "/help":
        _say(HELP)
    elif word == "/quit":
        state.quit = True
    elif word == "/history":
        if state.conv is None:
            _say("no current chat")
        else:
            await _history(client, state, state.conv, int(rest) if rest.isdigit() else 10)
    elif word == "/queue" and state.role != "customer":
        await _queue(client, state)
    elif word in ("/claim", "/switch") and state.role != "customer" and rest:
        if word == "/claim":
            await client.request(
                UpdateConversation(id=0, conv=rest, state=ConvState.ASSIGNED, agent=state.user)
            )
        state.conv = rest
        await _history(client, state, rest, HISTORY_ON_OPEN)
    elif word == "/close":
        if state.conv is None:
            _say("no current chat")
        else:
            await client.request(UpdateConversation(id=0, conv=state.conv, state=ConvState.CLOSED))
    elif word.startswith("/"):
        _say(f"unknown command {word} (or missing argument): /help lists them")
    elif state.conv is None:
        _say("no current chat: /queue, then /claim CONV")
    else:
        if line.isdigit() and 1 <= int(line) <= len(state.options):
            line = state.options[int(line) - 1]  # a quick reply, sent as its label
        sent = await client.send_text(state.conv, line)
        state.seen[state.conv] = max(state.seen.get(state.conv, 0), sent.seq)
        _say(f"   (sent #{sent.seq})")


async def _session(
    client: Client, state: ChatState, shop: str, lines: trio.MemoryReceiveChannel[str]
) -> None:
    if state.role == "customer":
        info: ConversationInfo = await client.request(
            OpenConversation(id=0, shop=shop, channel=Channel(state.channel))
        )
        state.conv = info.conversation.id
    else:
        await client.request(Subscribe(id=0, topics=[Topic.CONVERSATIONS]))
        if state.role == "agent":
            # Online: routing assigns this agent chats (closing the chat tool, the
            # last connection, sets offline; routing requeues after its grace period).
            await client.request(SetAgentStatus(id=0, status=AgentStatus.ONLINE))
    if not state.connected:
        state.connected = True
        _say(
            f"connected as {state.user} ({state.role}); chat: {state.conv or '-'};"
            " /help for commands"
        )
        if state.role != "customer":
            await _queue(client, state)
        if state.conv and state.role != "customer":
            await _command(client, state, f"/claim {state.conv}")
        elif state.conv:
            await _history(client, state, state.conv, HISTORY_ON_OPEN)
    else:
        _say("-- reconnected")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_printer, client, state)
        async for line in lines:
            try:
                await _command(client, state, line)
            except ServerError as exc:
                _say(f"!! {exc}")
            if state.quit:
                break
        nursery.cancel_scope.cancel()
    state.quit = True


async def _read_stdin(send: trio.MemorySendChannel[str]) -> None:
    async with send:
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buffer = b""
        while chunk := await stdin.receive_some(4096):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").strip()
                if line:
                    await send.send(line)


_FINAL_CLOSES: Final = frozenset({CloseCode.UNAUTHORIZED, CloseCode.UNSUPPORTED_VERSION})


async def _chat(args: argparse.Namespace, secret: bytes) -> None:
    shop = "" if args.role == "customer" else args.shop
    state = ChatState(user=args.user, role=args.role, conv=args.conv, channel=args.channel)
    send, lines = trio.open_memory_channel[str](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_stdin, send)
        failures = 0
        while not state.quit:
            token = mint_token(secret, user=args.user, role=args.role, shop=shop, ttl_s=3600)
            try:
                # resume: the server replays what this chat missed while it was away
                async with connect(
                    args.url, token, device=f"chat-{os.getpid()}", resume=dict(state.seen)
                ) as client:
                    failures = 0
                    await _session(client, state, args.shop, lines)
            except (ConnectionClosed, OSError, trio.BrokenResourceError) as exc:
                if isinstance(exc, ConnectionClosed) and exc.code in _FINAL_CLOSES:
                    raise
                delay = RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
                failures += 1
                _say(f"-- connection lost ({exc}); reconnecting in {delay:g} s")
                await trio.sleep(delay)
        nursery.cancel_scope.cancel()


def run_chat(args: argparse.Namespace, secret: bytes) -> int:
    trio.run(_chat, args, secret)
    return 0
