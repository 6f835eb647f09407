"""Small plugins used by the platform tests (run in real worker processes)."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from protocol import ConvState, Role, TextBody, WorkerEvent, WorkerEventKind
from workers.sdk import Plugin, WorkerContext


def _customer_text(event: WorkerEvent) -> str | None:
    message, conv = event.message, event.conversation
    if message is None or conv is None or message.sender_role is not Role.CUSTOMER:
        return None
    if conv.state is not ConvState.BOT or not isinstance(message.body, TextBody):
        return None
    return message.body.text


class EchoPlugin(Plugin):
    """Answers every customer question in state bot with "echo: <text>"."""

    name: ClassVar[str] = "echo"
    kinds: ClassVar[frozenset[WorkerEventKind]] = frozenset({WorkerEventKind.MESSAGE})

    async def on_message(self, ctx: WorkerContext, event: WorkerEvent) -> None:
        text = _customer_text(event)
        if text is not None and event.conversation is not None:
            await ctx.reply(event.conversation.id, f"echo: {text}")


class FlakyPlugin(Plugin):
    """Raises on "boom", hangs on "hang", and answers everything else."""

    name: ClassVar[str] = "flaky"
    kinds: ClassVar[frozenset[WorkerEventKind]] = frozenset({WorkerEventKind.MESSAGE})

    async def on_message(self, ctx: WorkerContext, event: WorkerEvent) -> None:
        text = _customer_text(event)
        if text is None or event.conversation is None:
            return
        if text == "boom":
            raise RuntimeError("plugin bug")
        if text == "hang":
            await asyncio.sleep(3600)
        await ctx.reply(event.conversation.id, f"ok: {text} (attempt {event.attempt})")
