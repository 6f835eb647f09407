"""The bot worker plugin: the engine (``engine.py``) wired to conversations.

* A conversation opens (or reopens): the shop's welcome, with quick replies,
  and outside business hours the away message.
* A customer writes while the bot owns the conversation (state ``bot``): the
  engine answers (order status comes from the CRM database), and/or hands off:
  the conversation goes to ``queued`` with the handoff's priority and tags
  ``skill:<skill>``, ``intent:<intent>``, ``handoff:<reason>`` for routing,
  and the reason as a note for the agent.
* A conversation closes: counted for the deflection rate (closed without a
  human / closed), published to the shop's dashboard as ``bot_stats``.
* Overflow: while routing keeps a queued conversation waiting past the shop's
  queue limit (tag ``overflow``), the bot keeps answering it as if it were its own.
* Business hours: the shop counts as open while its hours say so **or** while
  any of its agents is online (status ``online``): routing assigns whoever is
  online at any hour, so the bot says "back at 09:00" only when nobody is. It
  learns agent statuses from ``ListAgents`` when it joins and from agent events.

Configuration (``bot:`` in the workers YAML): ``knowledge`` maps a shop (or
``"*"`` for every shop) to a KB file (YAML or CSV; default: the example KB),
``hours`` maps a shop to ``{timezone, weekly: {mon-fri: "09:00-18:00"}, holidays}``,
``threshold`` the handoff confidence threshold, ``crm_db`` the CRM database.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar

from protocol import (
    AgentList,
    AgentStatus,
    ConvState,
    ListAgents,
    Role,
    TextBody,
    WorkerEvent,
    WorkerEventKind,
)
from workers import metrics
from workers.crm.plugin import DEFAULT_DB
from workers.crm.repository import CrmRepository
from workers.handoff import TAG_OVERFLOW, handoff_tags
from workers.sdk import Disconnected, Plugin, RequestFailed, WorkerContext

from .engine import DEFAULT_HANDOFF_THRESHOLD, BotEngine
from .hours import BusinessHours
from .knowledge import KnowledgeBase

log = logging.getLogger("imserver.worker.bot")
T = TypeVar("T")

EXAMPLE_KB: Final = Path(__file__).parent / "examples" / "kb.yaml"
MAX_REMEMBERED_HUMAN_CONVS: Final = 100_000
"""Conversations remembered as having had a human (for the deflection rate)."""


@dataclass(frozen=True, slots=True)
class StaffedHours(BusinessHours):
    """A shop's hours, open as well whenever ``staffed()`` (an agent is online)."""

    staffed: Callable[[], bool] = lambda: False

    def is_open(self, now: datetime) -> bool:
        return self.staffed() or BusinessHours.is_open(self, now)


class BotPlugin(Plugin):
    name: ClassVar[str] = "bot"
    kinds: ClassVar[frozenset[WorkerEventKind]] = frozenset(
        {WorkerEventKind.MESSAGE, WorkerEventKind.CONVERSATION, WorkerEventKind.AGENT}
    )

    def __init__(self) -> None:
        self.engine: BotEngine | None = None
        self.default_kb: KnowledgeBase | None = None
        self.crm: CrmRepository | None = None
        self._had_human: OrderedDict[str, None] = OrderedDict()
        self._shops_with_kb: set[str] = set()
        self._online: dict[str, set[str]] = {}
        """Shops with business hours -> their agents online now."""
        # The engine is not thread-safe and a match takes milliseconds: every call
        # goes through one thread, off the event loop.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bot-engine")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, partial(fn, *args))

    async def setup(self, ctx: WorkerContext) -> None:
        config = ctx.config
        knowledge: dict[str, Any] = dict(config.get("knowledge", {}))
        kbs = {
            shop: await asyncio.to_thread(KnowledgeBase.load, Path(str(path)))
            for shop, path in knowledge.items()
            if shop != "*"
        }
        self.default_kb = await asyncio.to_thread(
            KnowledgeBase.load, Path(str(knowledge.get("*", EXAMPLE_KB)))
        )
        hours: dict[str, BusinessHours] = {}
        for shop, spec in dict(config.get("hours", {})).items():
            parsed = BusinessHours.parse(
                spec["timezone"], spec.get("weekly", {}), holidays=spec.get("holidays", ())
            )
            online = self._online.setdefault(shop, set())
            hours[shop] = StaffedHours(
                parsed.zone,
                parsed.weekly,
                parsed.holidays,
                parsed.special_days,
                staffed=partial(bool, online),
            )
        crm_db = Path(str(config.get("crm_db") or ctx.data_dir.parent / "crm" / DEFAULT_DB))
        crm_db.parent.mkdir(parents=True, exist_ok=True)
        self.crm = await asyncio.to_thread(CrmRepository, crm_db)
        self._shops_with_kb = set(kbs)
        self.engine = BotEngine(
            kbs,
            self.crm,
            business_hours=hours,
            handoff_threshold=float(config.get("threshold", DEFAULT_HANDOFF_THRESHOLD)),
        )
        from .segment import warm_up

        await self._call(warm_up)

    async def on_shards(self, ctx: WorkerContext, shards: list[int]) -> None:
        if not shards:
            return
        for shop, online in self._online.items():
            try:
                listed: AgentList = await ctx.client.request(ListAgents(id=0, shop=shop))
            except (RequestFailed, Disconnected) as exc:
                log.warning("cannot list the agents of %s: %s", shop, exc)
                continue
            online.clear()
            online.update(
                a.agent for a in listed.agents if a.connected and a.status is AgentStatus.ONLINE
            )

    async def on_agent(self, ctx: WorkerContext, event: WorkerEvent) -> None:
        online = self._online.get(event.shop)
        if online is None or event.agent is None:
            return
        if event.agent_status is AgentStatus.ONLINE:
            online.add(event.agent)
        else:
            online.discard(event.agent)

    async def teardown(self) -> None:
        self._thread.shutdown(wait=True)
        if self.crm is not None:
            self.crm.close()

    async def _customer(self, user: str, channel: str) -> str:
        """The CRM customer the chat user is (whose orders the bot may discuss):
        docs/CRM.md, "Who is the buyer"."""
        crm = self.crm
        assert crm is not None
        return await self._call(crm.chat_customer, user, channel)

    def _engine_for(self, shop: str) -> BotEngine:
        engine = self.engine
        assert engine is not None and self.default_kb is not None
        if shop not in self._shops_with_kb:
            engine.set_knowledge_base(shop, self.default_kb)
            self._shops_with_kb.add(shop)
        return engine

    async def on_conversation(self, ctx: WorkerContext, event: WorkerEvent) -> None:
        conv = event.conversation
        if conv is None or conv.customer is None:
            return
        engine = self._engine_for(conv.shop)
        now = datetime.now(UTC)
        if event.change in ("opened", "reopened"):
            customer = await self._customer(conv.customer, str(conv.channel))
            reply = await self._call(
                engine.on_conversation_opened, conv.shop, conv.id, customer, now
            )
            if reply is not None:
                await ctx.reply(
                    conv.id, reply.text, quick_replies=reply.quick_replies or None, part="welcome"
                )
        elif event.change in ("assigned", "transferred"):
            self._had_human[conv.id] = None
            if len(self._had_human) > MAX_REMEMBERED_HUMAN_CONVS:
                self._had_human.popitem(last=False)
        elif event.change == "closed":
            await self._call(
                engine.on_conversation_closed, conv.shop, conv.id, conv.id in self._had_human
            )
            self._had_human.pop(conv.id, None)
            stats = await self._call(engine.stats, conv.shop)
            await ctx.notify(
                "bot_stats",
                {
                    "conversations": stats.conversations,
                    "handed_off": stats.handed_off,
                    "closed": stats.closed,
                    "closed_without_human": stats.closed_without_human,
                    "deflection_rate": stats.deflection_rate,
                },
                shop=conv.shop,
            )

    async def on_message(self, ctx: WorkerContext, event: WorkerEvent) -> None:
        message, conv = event.message, event.conversation
        if message is None or conv is None or conv.customer is None:
            return
        if message.sender_role is not Role.CUSTOMER or not isinstance(message.body, TextBody):
            return
        engine = self._engine_for(conv.shop)
        if conv.state is ConvState.QUEUED and TAG_OVERFLOW in conv.tags:
            # Waiting past the queue limit: the bot keeps serving meanwhile.
            await self._call(engine.resume_bot, conv.shop, conv.id)
        elif conv.state is not ConvState.BOT:
            return
        customer = await self._customer(conv.customer, str(conv.channel))
        decision = await self._call(
            engine.on_customer_message,
            conv.shop,
            conv.id,
            customer,
            message.body.text,
            datetime.now(UTC),
        )
        metrics.BOT_MESSAGES.labels(shop=conv.shop).inc()
        if decision.reply is not None and decision.handoff is None:
            metrics.BOT_ANSWERS.labels(shop=conv.shop).inc()
        if decision.handoff is not None:
            metrics.BOT_HANDOFFS.labels(shop=conv.shop, reason=str(decision.handoff.reason)).inc()
        if decision.reply is not None:
            await ctx.reply(
                conv.id,
                decision.reply.text,
                quick_replies=decision.reply.quick_replies or None,
                part="answer",
            )
        handoff = decision.handoff
        if handoff is not None:
            tags = handoff_tags(handoff.reason, handoff.skill, decision.intent)
            await ctx.update(
                conv.id,
                state=ConvState.QUEUED,
                priority=max(conv.priority, handoff.priority),  # never lowers it
                tags_add=tags,
                note=handoff.note[:500],
                part="handoff",
            )
