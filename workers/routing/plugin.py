"""The routing worker plugin: the engine (``engine.py``) wired to conversations.

* The bot hands a conversation off (state ``queued``, tags ``skill:``,
  ``intent:``, ``handoff:``): it is classified (VIPs from the CRM database)
  and assigned to the least loaded qualified online agent, or queued. A
  queued customer is told their position and estimated wait (a message the
  first time, then ``queue`` plugin events as it moves).
* Agents' status changes come from the server (an agent who disconnects goes
  offline and loses their chats to the next agent).
* Customer and agent messages drive the SLA clock; a tick every second moves
  chats whose agent did not answer within ``sla_seconds``.
* A conversation closing frees its agent's slot for the head of the queue.
* Every ``DASHBOARD_EVERY_S`` the shop's supervisors get ``routing_dashboard``
  (queue lengths, waits, agent loads).

Configuration (``routing:`` in the workers YAML): ``agents`` (a list of
{id, shop, skills, max_chats}), ``default_skills`` and ``default_max_chats``
for agents not listed, ``sla_seconds``, ``fallback_after_seconds``,
``crm_db``. One routing instance should serve a shop: the engine's view of
agent loads is in that process's memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, ClassVar, Final

import msgspec

from protocol import AgentStatus, ConvState, Role, TextBody, WorkerEvent, WorkerEventKind
from workers.crm.plugin import DEFAULT_DB
from workers.crm.repository import CrmRepository
from workers.sdk import Plugin, RequestFailed, WorkerContext

from .actions import Action, Assign, Queued, QueuePosition, Rejected, Requeue, SlaBreach
from .classify import classify
from .engine import Router, RouterConfig

log = logging.getLogger("imserver.worker.routing")

DASHBOARD_EVERY_S: Final = 2.0
DEFAULT_MAX_CHATS: Final = 5


def _tag(tags: list[str], prefix: str) -> str | None:
    for tag in tags:
        if tag.startswith(prefix):
            return tag[len(prefix):]
    return None


def _wait_text(position: int, eta_seconds: int | None) -> str:
    wait = f"，预计等待约{max(1, round(eta_seconds / 60))}分钟" if eta_seconds is not None else ""
    wait_en = f", about {max(1, round(eta_seconds / 60))} min" if eta_seconds is not None else ""
    return (f"正在为您转接人工客服，您前面还有{position - 1}位{wait}。"
            f" / Connecting you to an agent: you are number {position} in the queue{wait_en}.")


class RoutingPlugin(Plugin):
    name: ClassVar[str] = "routing"
    kinds: ClassVar[frozenset[WorkerEventKind]] = frozenset(
        {WorkerEventKind.CONVERSATION, WorkerEventKind.MESSAGE, WorkerEventKind.AGENT}
    )
    tick_seconds: ClassVar[float] = 1.0

    def __init__(self) -> None:
        self.router = Router()
        self.crm: CrmRepository | None = None
        self.default_skills: list[str] = []
        self.default_max_chats = DEFAULT_MAX_CHATS
        self._shops: set[str] = set()
        self._dashboard_at = 0.0
        self._lock = asyncio.Lock()  # one router, many concurrent conversations

    async def setup(self, ctx: WorkerContext) -> None:
        config = ctx.config
        fields = {k: config[k] for k in ("sla_seconds", "fallback_after_seconds") if k in config}
        self.router = Router(msgspec.convert(fields, RouterConfig))
        now = time.time()
        for agent in config.get("agents", []):
            self.router.upsert_agent(agent["id"], agent["shop"], agent.get("skills", []),
                                     int(agent.get("max_chats", DEFAULT_MAX_CHATS)), now=now)
            self._shops.add(agent["shop"])
        self.default_skills = list(config.get("default_skills", []))
        self.default_max_chats = int(config.get("default_max_chats", DEFAULT_MAX_CHATS))
        crm_db = Path(str(config.get("crm_db") or ctx.data_dir.parent / "crm" / DEFAULT_DB))
        crm_db.parent.mkdir(parents=True, exist_ok=True)
        self.crm = await asyncio.to_thread(CrmRepository, crm_db)

    async def teardown(self) -> None:
        if self.crm is not None:
            self.crm.close()

    # -- events

    async def on_agent(self, ctx: WorkerContext, event: WorkerEvent) -> None:
        if event.agent is None or event.agent_status is None:
            return
        async with self._lock:
            now = time.time()
            if self.router.agent(event.agent) is None:
                if event.agent_status is AgentStatus.OFFLINE:
                    return
                self.router.upsert_agent(event.agent, event.shop, self.default_skills,
                                         self.default_max_chats, now=now)
                self._shops.add(event.shop)
            actions = self.router.set_status(event.agent, event.agent_status, now)
        await self._execute(ctx, actions)

    async def on_conversation(self, ctx: WorkerContext, event: WorkerEvent) -> None:
        conv = event.conversation
        if conv is None or conv.customer is None:
            return
        self._shops.add(conv.shop)
        async with self._lock:
            now = time.time()
            actions: list[Action] = []
            if event.change == "queued" or (event.change == "updated"
                                             and conv.state is ConvState.QUEUED):
                vip = False
                if self.crm is not None:
                    vip = await asyncio.to_thread(self.crm.is_vip, conv.customer)
                classification = classify(
                    intent=_tag(conv.tags, "intent:"), channel=str(conv.channel), text="",
                    vip=vip, sentiment=None, handoff_reason=_tag(conv.tags, "handoff:"),
                    requested_skill=_tag(conv.tags, "skill:"))
                actions = self.router.request(conv.id, conv.shop, classification, now,
                                              customer=conv.customer)
            elif event.change == "closed":
                actions = self.router.closed(conv.id, now)
            elif event.change in ("assigned", "transferred") and conv.agent:
                placement = self.router.conversation(conv.id)
                if placement is not None and placement.agent not in (None, conv.agent):
                    # Someone moved the chat by hand: keep the engine's loads true.
                    actions = self.router.transfer(conv.id, placement.agent, conv.agent, None,
                                                   event.change, now)
        await self._execute(ctx, actions)

    async def on_message(self, ctx: WorkerContext, event: WorkerEvent) -> None:
        message, conv = event.message, event.conversation
        if message is None or conv is None or conv.state is not ConvState.ASSIGNED:
            return
        async with self._lock:
            now = time.time()
            if message.sender_role is Role.CUSTOMER:
                actions = self.router.on_customer_message(conv.id, now)
            elif message.sender == conv.agent:
                actions = self.router.on_agent_reply(conv.id, message.sender, now)
            else:
                return
        await self._execute(ctx, actions)

    async def on_tick(self, ctx: WorkerContext, now: float) -> None:
        async with self._lock:
            actions = self.router.tick(now)
        await self._execute(ctx, actions)
        if now - self._dashboard_at >= DASHBOARD_EVERY_S:
            self._dashboard_at = now
            for shop in sorted(self._shops):
                board: dict[str, Any] = msgspec.to_builtins(self.router.dashboard(shop, now))
                await ctx.notify("routing_dashboard", board, shop=shop)

    # -- actions

    async def _execute(self, ctx: WorkerContext, actions: list[Action]) -> None:
        for action in actions:
            try:
                await self._apply(ctx, action)
            except RequestFailed as exc:
                log.warning("routing action %s failed: %s", type(action).__name__, exc)

    async def _apply(self, ctx: WorkerContext, action: Action) -> None:
        if isinstance(action, Assign):
            note = action.note or f"{action.reason}" + (" (fallback)" if action.fallback else "")
            await ctx.update(action.conv, state=ConvState.ASSIGNED, agent=action.agent,
                             note=note, part=f"assign:{action.agent}:{action.reason}")
        elif isinstance(action, Queued):
            await ctx.send(action.conv, TextBody(text=_wait_text(action.position,
                                                                 action.eta_seconds)),
                           part="queued")
            await self._position(ctx, action.conv, action.position, action.eta_seconds)
        elif isinstance(action, QueuePosition):
            await self._position(ctx, action.conv, action.position, action.eta_seconds)
        elif isinstance(action, Requeue):
            await ctx.update(action.conv, state=ConvState.QUEUED,
                             part=f"requeue:{action.previous_agent}:{action.reason}")
            await self._position(ctx, action.conv, action.position, action.eta_seconds)
        elif isinstance(action, SlaBreach):
            log.info("SLA breach: %s did not answer %s for %.0fs", action.agent, action.conv,
                     action.waiting_seconds)
            await ctx.notify("sla_breach", {"conv": action.conv, "agent": action.agent,
                                            "waiting_seconds": action.waiting_seconds},
                             shop=action.shop)
        elif isinstance(action, Rejected):
            log.warning("routing refused %s: %s", action.conv, action.reason)

    @staticmethod
    async def _position(ctx: WorkerContext, conv: str, position: int, eta: int | None) -> None:
        await ctx.notify("queue", {"position": position, "eta_seconds": eta}, conv=conv)
