"""What a plugin author writes: a small class with event handlers.

A plugin subclasses ``Plugin``, names itself and the event kinds it wants,
and implements the handlers it needs. Handlers receive a ``WorkerContext``
whose actions carry idempotency keys derived from the event being handled,
so a redelivered event (delivery is at least once) never sends a second
reply or makes a second assignment. See docs/PLUGINS.md.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

from protocol import (
    MAX_ID_CHARS,
    AnyBody,
    ConvState,
    History,
    HistoryPage,
    Notify,
    QuickRepliesBody,
    Send,
    Sent,
    ServerFrameType,
    TextBody,
    UpdateConversation,
    WorkerEvent,
    WorkerEventKind,
)

from ._client import AsyncClient

MAX_KEY_CHARS: Final = MAX_ID_CHARS
"""Idempotency keys double as client message ids, which are ids."""


@dataclass
class WorkerContext:
    """Actions a handler may take. ``key`` scopes idempotency: the runner sets
    it to the event id being handled; several actions for one event pass a
    distinct ``part`` each."""

    client: AsyncClient
    plugin: str
    data_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    event_key: str = ""
    shard_count: int = 0
    """How many shards the server splits events into (from ``WorkerJoined``)."""

    def key(self, part: str = "") -> str:
        """The idempotency key of an action. Outside an event (timers) there is no
        redelivery to guard against: each action gets a key of its own."""
        key = f"{self.plugin}:{self.event_key or uuid.uuid4().hex}:{part}"
        if len(key) > MAX_KEY_CHARS:  # stays unique and deterministic, within the id limit
            key = f"{self.plugin[:32]}:{hashlib.blake2b(key.encode(), digest_size=20).hexdigest()}"
        return key

    async def send(self, conv: str, body: AnyBody, *, part: str = "") -> Sent:
        sent: Sent = await self.client.request(
            Send(id=0, conv=conv, cmid=self.key(part or "send"), body=body)
        )
        return sent

    async def reply(
        self, conv: str, text: str, *, quick_replies: list[str] | None = None, part: str = ""
    ) -> Sent:
        body: AnyBody = (
            QuickRepliesBody(text=text, options=quick_replies)
            if quick_replies
            else TextBody(text=text)
        )
        return await self.send(conv, body, part=part or "reply")

    async def update(
        self,
        conv: str,
        *,
        state: ConvState | None = None,
        agent: str | None = None,
        priority: int | None = None,
        tags_add: list[str] | None = None,
        tags_remove: list[str] | None = None,
        note: str = "",
        part: str = "",
        if_state: ConvState | None = None,
        if_agent: str | None = None,
    ) -> None:
        """``if_state``/``if_agent``: apply only if the conversation is still in that
        state / with that agent, else ``RequestFailed`` with code ``conflict``."""
        await self.client.request(
            UpdateConversation(
                id=0,
                conv=conv,
                state=state,
                agent=agent,
                priority=priority,
                tags_add=tags_add or [],
                tags_remove=tags_remove or [],
                note=note,
                key=self.key(part or "update"),
                if_state=if_state,
                if_agent=if_agent,
            )
        )

    async def notify(
        self,
        kind: str,
        data: dict[str, Any],
        *,
        conv: str | None = None,
        user: str | None = None,
        shop: str | None = None,
    ) -> None:
        await self.client.request(
            Notify(id=0, kind=kind, data=data, conv=conv, user=user, shop=shop)
        )

    async def history(self, conv: str, *, limit: int = 20) -> HistoryPage:
        page: HistoryPage = await self.client.request(History(id=0, conv=conv, limit=limit))
        return page


class Plugin:
    """Base class of worker plugins."""

    name: ClassVar[str] = ""
    kinds: ClassVar[frozenset[WorkerEventKind]] = frozenset(
        {WorkerEventKind.MESSAGE, WorkerEventKind.CONVERSATION}
    )
    tick_seconds: ClassVar[float] = 0.0
    """If > 0, ``on_tick`` runs this often (timers such as SLAs)."""

    async def setup(self, ctx: WorkerContext) -> None:
        """Open the plugin's own store, load configuration."""

    async def on_message(self, ctx: WorkerContext, event: WorkerEvent) -> None:
        """A message was stored in a conversation of this instance's shards."""

    async def on_conversation(self, ctx: WorkerContext, event: WorkerEvent) -> None:
        """A conversation changed (``event.change``)."""

    async def on_agent(self, ctx: WorkerContext, event: WorkerEvent) -> None:
        """An agent's status changed (every instance gets these)."""

    async def on_tick(self, ctx: WorkerContext, now: float) -> None:
        """Periodic work; ``now`` is ``time.time()``."""

    async def on_shards(self, ctx: WorkerContext, shards: list[int]) -> None:
        """This instance's shards changed (``[]`` when its connection ended; the
        shards it gets after reconnecting come with the next call)."""

    def on_push(self, ctx: WorkerContext, frame: ServerFrameType) -> None:
        """Any other server push (topic events after a ``Subscribe``: conversation,
        message and agent events), in the order received. Synchronous, so the order
        is kept: queue the work, do not block."""

    async def teardown(self) -> None:
        """Close what ``setup`` opened."""
