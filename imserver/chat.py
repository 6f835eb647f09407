"""``imserver chat``: a line-based terminal chat for live demos.

A customer opens (or reopens) their conversation with the shop; an agent
goes online (so routing assigns them chats), claims a conversation
(``--conv``) or, without it, watches the shop's queue and claims with
``/claim CONV``. Lines typed are sent; events are printed.
Commands: ``/history``, ``/close``, ``/quit``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import trio

from protocol import (
    AgentStatus,
    ConversationEvent,
    ConversationInfo,
    ConvState,
    History,
    HistoryPage,
    Message,
    MessageEvent,
    OpenConversation,
    ReceiptEvent,
    SetAgentStatus,
    Subscribe,
    SystemBody,
    TextBody,
    Topic,
    TypingEvent,
    UpdateConversation,
)

from .auth import mint_token
from .client import Client, ServerError, connect


def _line(message: Message) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(message.ts / 1000))
    body = message.body
    if isinstance(body, TextBody):
        text = body.text
    elif isinstance(body, SystemBody):
        text = f"* {body.event} {body.data}"
    else:
        text = f"[{type(body).__name__}]"
    return f"{stamp} #{message.seq} {message.sender}: {text}"


async def _printer(client: Client) -> None:
    async for frame in client.events:
        if isinstance(frame, MessageEvent):
            print(_line(frame.message), flush=True)
        elif isinstance(frame, ConversationEvent):
            conv = frame.conversation
            print(
                f"-- {conv.id} {frame.change} state={conv.state} agent={conv.agent or '-'}"
                + (f" note={frame.note!r}" if frame.note else ""),
                flush=True,
            )
        elif isinstance(frame, TypingEvent):
            print(f"   ({frame.user} is typing)", flush=True)
        elif isinstance(frame, ReceiptEvent):
            print(f"   ({frame.user} {frame.kind} up to #{frame.seq})", flush=True)


async def _chat(args: argparse.Namespace, secret: bytes) -> None:
    shop = "" if args.role == "customer" else args.shop
    token = mint_token(secret, user=args.user, role=args.role, shop=shop, ttl_s=3600)
    async with connect(args.url, token, device=f"chat-{os.getpid()}") as client:
        conv: str | None = args.conv
        if args.role == "customer":
            info: ConversationInfo = await client.request(OpenConversation(id=0, shop=args.shop))
            conv = info.conversation.id
        else:
            await client.request(Subscribe(id=0, topics=[Topic.CONVERSATIONS]))
            if args.role == "agent":
                # Online: routing assigns this agent chats (closing the chat tool, the
                # last connection, sets offline; routing requeues after its grace period).
                await client.request(SetAgentStatus(id=0, status=AgentStatus.ONLINE))
            if conv:
                await client.request(
                    UpdateConversation(id=0, conv=conv, state=ConvState.ASSIGNED, agent=args.user)
                )
        print(
            f"connected as {args.user} ({args.role}); conversation: {conv or '-'}; /quit to leave",
            flush=True,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_printer, client)
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            buffer = b""
            while True:
                chunk = await stdin.receive_some(4096)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line:
                        continue
                    try:
                        if line == "/quit":
                            nursery.cancel_scope.cancel()
                            return
                        if line.startswith("/claim "):
                            conv = line.split(None, 1)[1]
                            await client.request(
                                UpdateConversation(
                                    id=0, conv=conv, state=ConvState.ASSIGNED, agent=args.user
                                )
                            )
                        elif line == "/close" and conv:
                            await client.request(
                                UpdateConversation(id=0, conv=conv, state=ConvState.CLOSED)
                            )
                        elif line == "/history" and conv:
                            page: HistoryPage = await client.request(
                                History(id=0, conv=conv, limit=20)
                            )
                            for message in page.messages:
                                print(_line(message), flush=True)
                        elif conv:
                            sent = await client.send_text(conv, line)
                            print(f"   (sent #{sent.seq})", flush=True)
                        else:
                            print("no conversation yet: /claim CONV", flush=True)
                    except ServerError as exc:
                        print(f"!! {exc}", flush=True)
            nursery.cancel_scope.cancel()


def run_chat(args: argparse.Namespace, secret: bytes) -> int:
    trio.run(_chat, args, secret)
    return 0
