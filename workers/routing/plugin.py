"""The routing worker plugin: the engine (``engine.py``) fed from durable facts.

Theory of operation
-------------------
The engine is a cache. Everything it decides from is in the server's store:
which conversations are ``queued`` or ``assigned`` and to whom
(``ListConversations``), since when (the ``queued``/``assigned`` system messages
in the conversation's history), the customer's unanswered messages (history:
the SLA clock), the handoff's reason, skill and priority (tags and priority on
the conversation, vocabulary in ``workers.handoff``), whether it was taken back
from an agent (tag ``requeued``, served first) and each agent's last status
and since when (``ListAgents``). So any routing process can be killed at any
moment: the next one rebuilds the same queue, in the same order, with the same
SLA deadlines, and carries on.

Ownership. Several routing instances may run. Each shop is decided by one
instance at a time: the one that owns the shop's shard,
``crc32(shop) % shard_count``, in the server's split of shards among the
plugin's instances (``WorkerJoined``/``WorkerAssignment``). An instance that
gains a shop subscribes to its ``conversations``, ``messages`` and ``agents``
topics, waits ``OWNERSHIP_SETTLE_S`` (the old owner, told at the same moment,
stops; its last requests land; no wait when the instance owns every shard, as
then no other instance is connected to decide anything), reads the shop's facts, restores the engine and
dispatches; live topic events then keep it current (events that arrive while it
reads are replayed after, older versions skipped). An instance that loses a
shop forgets it at once. When an instance dies, the server moves its shards,
and so its shops, to the survivors.

Safety. Every change routing makes is a *conditional* ``UpdateConversation``:
assign only if still ``queued`` (or still with the agent it is taken from),
take back only from the agent who holds it. The conversation's single writer
checks the condition, so two deciders (an old and a new owner in the settle
window, a person claiming a chat) never both win; the loser re-reads that
conversation and continues from the truth. Agent capacity is counted by the one
owner of the shop, from the store, so no agent is given more than
``max_chats``.

Behaviour (see docs/PLUGINS.md, "Routing"):

* a queued customer is told their position and wait (a message, then ``queue``
  plugin events at most every ``POSITION_EVERY_S``);
* overflow: a handoff finding ``queue_limit`` chats already queued keeps its
  place in the queue, is tagged ``overflow`` (the bot keeps answering it) and
  the customer is told the shop is busy and how many are ahead; it is assigned
  in its turn. Past the engine's hard bound the chat stays queued in the store
  untracked and the periodic sweep offers it again: nothing is dropped;
* an agent who goes offline (or whose last connection closes) keeps their
  chats for ``agent_grace_seconds`` (``AGENT_GRACE_S``); after that the chats
  go back to the head of the queue, the previous agent noted (a ``requeued``
  system message, and the next agent's note);
* an assigned agent who does not answer within ``sla_seconds`` loses the chat
  the same way (the ``sla_breach`` dashboard event);
* every ``DASHBOARD_EVERY_S`` the shop's supervisors get ``routing_dashboard``.

Configuration (``routing:`` in the workers YAML): ``agents`` (a list of
{id, shop, skills, max_chats}), ``default_skills`` and ``default_max_chats``
for agents not listed, ``sla_seconds``, ``fallback_after_seconds``,
``queue_limit``, ``agent_grace_seconds``, ``crm_db``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import zlib
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, ClassVar, Final

import msgspec

from protocol import (
    MAX_CONVERSATION_PAGE,
    AgentEvent,
    AgentInfo,
    AgentList,
    AgentStatus,
    Conversation,
    ConversationEvent,
    ConversationInfo,
    ConversationPage,
    ConvKind,
    ConvState,
    GetConversation,
    History,
    HistoryPage,
    ListAgents,
    ListConversations,
    Message,
    MessageEvent,
    Role,
    ServerFrameType,
    Subscribe,
    SystemBody,
    TextBody,
    Topic,
    Unsubscribe,
    WorkerEvent,
    WorkerEventKind,
)
from workers import metrics
from workers.crm.plugin import DEFAULT_DB
from workers.crm.repository import CrmRepository
from workers.handoff import (
    TAG_HANDOFF,
    TAG_INTENT,
    TAG_OVERFLOW,
    TAG_REQUEUED,
    TAG_SKILL,
    tag_value,
)
from workers.sdk import Disconnected, Plugin, RequestFailed, WorkerContext

from .actions import Action, Assign, Queued, QueuePosition, Rejected, Requeue, SlaBreach
from .classify import Classification, classify
from .engine import Router, RouterConfig, RoutingError

log = logging.getLogger("imserver.worker.routing")

DASHBOARD_EVERY_S: Final = 2.0
DEFAULT_MAX_CHATS: Final = 5
OWNERSHIP_SETTLE_S: Final = 2.0
"""A shop gained is decided only after this long: the instance that owned it
before is told at the same moment and its requests in flight land meanwhile."""
AGENT_GRACE_S: Final = 30.0
"""An agent offline (or disconnected) this long loses their chats to the queue head."""
SWEEP_EVERY_S: Final = 10.0
"""How often the store is re-read for shops and chats no live event announced."""
DISCOVER_EVERY_S: Final = 1.0
"""How often the newest queued and assigned chats are listed to find shops not heard
of yet (no configured agent, no agent status change since this process started)."""
POSITION_EVERY_S: Final = 5.0
"""A queued customer hears about a changed position at most this often."""
HISTORY_PAGE: Final = 50
"""Messages read per page when recovering a chat's timestamps."""
HISTORY_PAGES: Final = 4
"""Pages read back at most; past them the conversation's ``updated_at`` stands in."""
REQUESTS_IN_FLIGHT: Final = 128
"""Requests this plugin has awaiting a reply at once, whatever they are for: well below
the server's per-connection bound (MAX_INFLIGHT_REQUESTS, 256; past it requests are
refused and a connection that keeps trying is closed), leaving room for the runner."""
MAX_VERSIONS: Final = 200_000
"""Conversation versions remembered (to skip stale events); least recent dropped."""
MAX_RESYNC_PER_SWEEP: Final = 200
"""Tracked chats the store no longer lists as open, re-read per sweep."""


class _Phase(enum.Enum):
    PENDING = "pending"
    """Owned, waiting out ``OWNERSHIP_SETTLE_S``; events are reflected in the read to come."""
    LOADING = "loading"
    """Reading the store; events are kept and replayed after."""
    READY = "ready"


def shop_shard(shop: str, shard_count: int) -> int:
    """The shard whose owner decides ``shop``."""
    return zlib.crc32(shop.encode()) % max(1, shard_count)


def classification_for(conv: Conversation, vip: bool) -> Classification:
    """What routing makes of a handed-off conversation: its tags (bot vocabulary)
    and the priority the bot gave it (a floor)."""
    return classify(
        intent=tag_value(conv.tags, TAG_INTENT),
        channel=str(conv.channel),
        text="",
        vip=vip,
        sentiment=None,
        handoff_reason=tag_value(conv.tags, TAG_HANDOFF),
        requested_skill=tag_value(conv.tags, TAG_SKILL),
        floor=conv.priority,
    )


class _Facts(msgspec.Struct, frozen=True):
    """What the store says about one open conversation."""

    conv: Conversation
    since: float
    unanswered_since: float | None
    previous_agent: str | None
    told: bool


class Durable(msgspec.Struct, frozen=True):
    """What a conversation's history says about its place (see ``durable_times``)."""

    since: float | None
    """When it entered its state: the last ``queued`` (or ``assigned``/``transferred``)
    system message."""
    unanswered_since: float | None
    """The oldest customer message after the last staff reply (the SLA clock)."""
    previous_agent: str | None
    """The agent a ``requeued`` message after that entry names."""
    told: bool
    """``me`` (routing) wrote to the customer after that entry."""


def durable_times(messages: list[Message], state: ConvState, me: str = "") -> Durable:
    """Read a conversation's recent history (ascending), newest first."""
    entries = ("queued",) if state is ConvState.QUEUED else ("assigned", "transferred")
    since: float | None = None
    unanswered: float | None = None
    previous: str | None = None
    answered = told = False
    for message in reversed(messages):
        body = message.body
        if since is None and message.sender == me and isinstance(body, TextBody):
            told = True
        if isinstance(body, SystemBody):
            if since is None and body.event in entries:
                since = message.ts / 1000
            elif since is None and body.event == "requeued" and previous is None:
                previous = body.data.get("previous_agent") or None
            continue
        if answered:
            continue
        if message.sender_role is Role.CUSTOMER:
            unanswered = message.ts / 1000
        elif message.sender_role in (Role.AGENT, Role.SUPERVISOR):
            answered = True
    return Durable(since=since, unanswered_since=unanswered, previous_agent=previous, told=told)


def _wait_text(position: int, eta_seconds: int | None) -> str:
    wait = f"，预计等待约{max(1, round(eta_seconds / 60))}分钟" if eta_seconds is not None else ""
    wait_en = f", about {max(1, round(eta_seconds / 60))} min" if eta_seconds is not None else ""
    return (
        f"正在为您转接人工客服，您前面还有{position - 1}位{wait}。"
        f" / Connecting you to an agent: you are number {position} in the queue{wait_en}."
    )


def _busy_text(position: int | None) -> str:
    ahead = f"您前面还有{position - 1}位，" if position else ""
    ahead_en = f" {position - 1} people are ahead of you." if position else ""
    return (
        f"当前咨询人数较多，{ahead}您的排队位置会为您保留，排队期间智能助手会继续为您解答。"
        f" / We are very busy right now.{ahead_en} You keep your place in the queue,"
        " and our assistant keeps answering meanwhile."
    )


class RoutingPlugin(Plugin):
    name: ClassVar[str] = "routing"
    # Conversations and messages come from the owned shops' topics (see above);
    # the per-shard event stream is only used for agent status (new shops).
    kinds: ClassVar[frozenset[WorkerEventKind]] = frozenset({WorkerEventKind.AGENT})
    tick_seconds: ClassVar[float] = 0.5

    def __init__(self) -> None:
        self.config = RouterConfig()
        self.router = Router(self.config)
        self.crm: CrmRepository | None = None
        self.default_skills: list[str] = []
        self.default_max_chats = DEFAULT_MAX_CHATS
        self.grace_s = AGENT_GRACE_S
        self._agent_conf: dict[str, tuple[str, list[str], int]] = {}
        self._ctx: WorkerContext | None = None
        self._shards: set[int] = set()
        self._known: set[str] = set()
        self._phase: dict[str, _Phase] = {}
        self._settle_at: dict[str, float] = {}
        self._buffer: dict[str, list[ServerFrameType]] = {}
        self._versions: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._offline_since: dict[str, float] = {}
        self._positions: dict[str, tuple[int, int | None]] = {}
        self._positions_told: dict[str, float] = {}
        self._lanes: dict[str, deque[Action]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(REQUESTS_IN_FLIGHT)
        self._dashboard_at = 0.0
        self._sweep_at = 0.0
        self._discover_at = 0.0
        self._loading = False

    async def setup(self, ctx: WorkerContext) -> None:
        config = ctx.config
        fields = {
            k: config[k]
            for k in ("sla_seconds", "fallback_after_seconds", "queue_limit")
            if k in config
        }
        self.config = msgspec.convert(fields, RouterConfig)
        self.router = Router(self.config)
        for agent in config.get("agents", []):
            self._agent_conf[str(agent["id"])] = (
                str(agent["shop"]),
                [str(s) for s in agent.get("skills", [])],
                int(agent.get("max_chats", DEFAULT_MAX_CHATS)),
            )
            self._known.add(str(agent["shop"]))
        self.default_skills = [str(s) for s in config.get("default_skills", [])]
        self.default_max_chats = int(config.get("default_max_chats", DEFAULT_MAX_CHATS))
        self.grace_s = float(config.get("agent_grace_seconds", AGENT_GRACE_S))
        crm_db = Path(str(config.get("crm_db") or ctx.data_dir.parent / "crm" / DEFAULT_DB))
        crm_db.parent.mkdir(parents=True, exist_ok=True)
        self.crm = await asyncio.to_thread(CrmRepository, crm_db)

    async def teardown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.crm is not None:
            self.crm.close()

    # -- ownership -------------------------------------------------------------------

    def owns(self, shop: str) -> bool:
        ctx = self._ctx
        return ctx is not None and shop_shard(shop, ctx.shard_count) in self._shards

    async def on_shards(self, ctx: WorkerContext, shards: list[int]) -> None:
        if ctx is not self._ctx:
            # A new connection: subscriptions and in-flight work of the old one are gone.
            for shop in list(self._phase):
                self._drop(shop)
            self._ctx = ctx
        self._shards = set(shards)
        for shop in list(self._phase):
            if not self.owns(shop):
                self._drop(shop)
                with contextlib.suppress(RequestFailed, Disconnected):
                    await ctx.client.request(
                        Unsubscribe(
                            id=0,
                            topics=[Topic.CONVERSATIONS, Topic.MESSAGES, Topic.AGENTS],
                            shop=shop,
                        )
                    )
        for shop in sorted(self._known):
            await self._maybe_acquire(shop)

    async def _maybe_acquire(self, shop: str) -> None:
        ctx = self._ctx
        if ctx is None or shop in self._phase or not self.owns(shop):
            return
        self._phase[shop] = _Phase.PENDING
        # Alone (every shard is ours), no other instance can still be deciding: the
        # previous owner's connection is gone, and with it anything it could send.
        alone = len(self._shards) >= ctx.shard_count
        self._settle_at[shop] = time.monotonic() + (0.0 if alone else OWNERSHIP_SETTLE_S)
        try:
            await ctx.client.request(
                Subscribe(
                    id=0, topics=[Topic.CONVERSATIONS, Topic.MESSAGES, Topic.AGENTS], shop=shop
                )
            )
        except (RequestFailed, Disconnected) as exc:
            log.warning("cannot watch shop %s: %s", shop, exc)
            self._drop(shop)

    def _drop(self, shop: str) -> None:
        self._phase.pop(shop, None)
        self._settle_at.pop(shop, None)
        self._buffer.pop(shop, None)
        for agent in self.router.agents(shop):
            self._offline_since.pop(agent.id, None)
        for conv in self.router.queue(shop):
            self._positions.pop(conv, None)
            self._positions_told.pop(conv, None)
        self.router.forget_shop(shop)
        for lane in self._lanes.values():
            if lane and lane[0].shop == shop:
                lane.clear()

    def _learn(self, shop: str) -> None:
        if shop and shop != "*" and shop not in self._known:
            self._known.add(shop)
            self._spawn(self._maybe_acquire(shop))

    # -- loading a shop from the store ------------------------------------------------

    async def _load(self, ctx: WorkerContext, shops: set[str]) -> None:
        try:
            await self._load_shops(ctx, shops)
        except Exception as exc:
            log.error("loading shops %s failed: %r; retrying", sorted(shops), exc)
            for shop in shops:
                if self._phase.get(shop) is _Phase.LOADING:
                    self._phase[shop] = _Phase.PENDING
                    self._settle_at[shop] = time.monotonic() + OWNERSHIP_SETTLE_S
        finally:
            self._loading = False

    async def _load_shops(self, ctx: WorkerContext, shops: set[str]) -> None:
        for shop in shops:
            self._phase[shop] = _Phase.LOADING
            self._buffer[shop] = []
        try:
            convs = [
                c
                for state in (ConvState.QUEUED, ConvState.ASSIGNED)
                for c in await self._list_open(ctx, state)
                if c.shop in shops and c.kind is ConvKind.DIRECT and c.customer
            ]
            agents: dict[str, list[AgentInfo]] = {}
            for shop in shops:
                listed: AgentList = await ctx.client.request(ListAgents(id=0, shop=shop))
                agents[shop] = listed.agents
            facts = await asyncio.gather(*(self._facts(ctx, c) for c in convs))
        except (RequestFailed, Disconnected, TimeoutError) as exc:
            log.warning("loading shops failed (%s); retrying", exc)
            for shop in shops:
                if self._phase.get(shop) is _Phase.LOADING:
                    self._phase[shop] = _Phase.PENDING
                    self._settle_at[shop] = time.monotonic() + OWNERSHIP_SETTLE_S
            return
        now = time.time()
        actions: list[Action] = []
        loaded = {s for s in shops if self._phase.get(s) is _Phase.LOADING and self._ctx is ctx}
        for shop in loaded:
            self.router.forget_shop(shop)
            for agent_id, (agent_shop, _, _) in self._agent_conf.items():
                if agent_shop == shop:
                    self._register(agent_id, shop)
            for record in agents[shop]:
                self._register(record.agent, shop)
        for fact in facts:
            conv = fact.conv
            if conv.shop not in loaded:
                continue
            if conv.agent:
                self._register(conv.agent, conv.shop)
            self._remember(conv)
            self.router.restore(
                conv.id,
                conv.shop,
                self._classify(conv),
                since=fact.since,
                agent=conv.agent if conv.state is ConvState.ASSIGNED else None,
                customer=conv.customer,
                unanswered_since=fact.unanswered_since,
                head=TAG_REQUEUED in conv.tags,
                previous_agent=fact.previous_agent,
                # queued while no routing was there to tell them: they hear it now
                announce=conv.state is ConvState.QUEUED
                and not fact.told
                and fact.previous_agent is None,
            )
        for shop in loaded:
            known = {info.agent: info for info in agents[shop]}
            for agent in self.router.agents(shop):
                found = known.get(agent.id)
                if (
                    found is not None
                    and found.connected
                    and found.status is not AgentStatus.OFFLINE
                ):
                    actions += self.router.set_status(agent.id, found.status, now)
                elif found is not None and found.status is AgentStatus.OFFLINE:
                    self._offline_since[agent.id] = found.since / 1000
                else:
                    # Never seen, or a stale status after a server restart: the grace
                    # period runs from now.
                    self._offline_since[agent.id] = now
            actions += self.router.settle(shop, now)
            self._phase[shop] = _Phase.READY
            self._settle_at.pop(shop, None)
            log.info(
                "routing owns shop %s: %d queued, %d agents",
                shop,
                len(self.router.queue(shop)),
                len(self.router.agents(shop)),
            )
        self._submit(actions)
        self._expire_grace(now)
        for shop in loaded:
            for frame in self._buffer.pop(shop, []):
                self._apply(frame)

    async def _list_open(self, ctx: WorkerContext, state: ConvState) -> list[Conversation]:
        out: list[Conversation] = []
        before: int | None = None
        before_id: str | None = None
        while True:
            page: ConversationPage = await ctx.client.request(
                ListConversations(
                    id=0,
                    state=state,
                    updated_before=before,
                    before_id=before_id,
                    limit=MAX_CONVERSATION_PAGE,
                )
            )
            out += page.conversations
            if not page.has_more or not page.conversations:
                return out
            last = page.conversations[-1]
            before, before_id = last.updated_at, last.id

    async def _facts(self, ctx: WorkerContext, conv: Conversation) -> _Facts:
        messages: list[Message] = []
        before: int | None = None
        found = Durable(since=None, unanswered_since=None, previous_agent=None, told=False)
        async with self._slots:
            for _ in range(HISTORY_PAGES):
                page: HistoryPage = await ctx.client.request(
                    History(id=0, conv=conv.id, before=before, limit=HISTORY_PAGE)
                )
                messages = page.messages + messages
                found = durable_times(messages, conv.state, ctx.client.welcome.user)
                if found.since is not None or not page.has_more or not page.messages:
                    break
                before = page.messages[0].seq
        return _Facts(
            conv=conv,
            since=found.since if found.since is not None else conv.updated_at / 1000,
            unanswered_since=found.unanswered_since,
            previous_agent=found.previous_agent,
            told=found.told,
        )

    # -- live events -----------------------------------------------------------------

    async def on_agent(self, ctx: WorkerContext, event: WorkerEvent) -> None:
        self._learn(event.shop)  # statuses of owned shops come from their topic, in order

    def on_push(self, ctx: WorkerContext, frame: ServerFrameType) -> None:
        if ctx is self._ctx:
            self._apply(frame)

    def _apply(self, frame: ServerFrameType) -> None:
        if isinstance(frame, ConversationEvent):
            shop = frame.conversation.shop
        elif isinstance(frame, AgentEvent):
            shop = frame.shop
        elif isinstance(frame, MessageEvent):
            found = self.router.where(frame.message.conv)
            if found is None:
                return
            shop = found[0]
        else:
            return
        phase = self._phase.get(shop)
        if phase is _Phase.LOADING:
            self._buffer[shop].append(frame)
            return
        if phase is not _Phase.READY:
            return  # pending: the coming read of the store reflects it
        now = time.time()
        try:
            if isinstance(frame, ConversationEvent):
                self._submit(self._conversation(frame.conversation, frame.change, now))
            elif isinstance(frame, AgentEvent):
                self._submit(self._agent_status(frame.agent, shop, frame.status, now))
            else:
                self._message(frame.message)
        except RoutingError as exc:
            log.warning("routing ignored %s: %s", type(frame).__name__, exc)

    def _conversation(self, conv: Conversation, change: str, now: float) -> list[Action]:
        if conv.kind is not ConvKind.DIRECT or conv.customer is None:
            return []
        if not self._remember(conv):
            return []  # older than what is applied already
        found = self.router.where(conv.id)
        holder = found[1] if found is not None else None
        if conv.state is ConvState.QUEUED:
            if found is not None:
                if holder is not None and change == "queued" and TAG_REQUEUED not in conv.tags:
                    # Someone put it back in the queue by hand: it was being served.
                    self.router.restore(
                        conv.id,
                        conv.shop,
                        self._classify(conv),
                        since=now,
                        customer=conv.customer,
                        head=True,
                        previous_agent=holder,
                    )
                    return self.router.settle(conv.shop, now)
                if holder is None:  # the bot may have escalated it (a complaint after 转人工)
                    return self.router.set_priority(conv.id, self._classify(conv).priority, now)
                return []
            actions = self.router.request(
                conv.id, conv.shop, self._classify(conv), now, customer=conv.customer
            )
            if actions and isinstance(actions[0], Rejected) and change != "queued":
                return []  # told already when it entered; the sweep offers it again
            return actions
        if conv.state is ConvState.ASSIGNED and conv.agent:
            if found is not None and holder == conv.agent:
                return []
            # A person claimed or transferred it (or another decider won): follow.
            self._register(conv.agent, conv.shop)
            self.router.restore(
                conv.id,
                conv.shop,
                self._classify(conv),
                since=now,
                agent=conv.agent,
                customer=conv.customer,
                unanswered_since=found[2] if found is not None else None,
            )
            return self.router.settle(conv.shop, now)
        self._positions.pop(conv.id, None)
        self._positions_told.pop(conv.id, None)
        return self.router.closed(conv.id, now)  # closed, or back with the bot

    def _agent_status(self, agent: str, shop: str, status: AgentStatus, now: float) -> list[Action]:
        self._register(agent, shop)
        if status is AgentStatus.OFFLINE:
            self._offline_since.setdefault(agent, now)
            return self.router.set_status(agent, AgentStatus.AWAY, now)
        self._offline_since.pop(agent, None)
        return self.router.set_status(agent, status, now)

    def _message(self, message: Message) -> None:
        now = message.ts / 1000
        if message.sender_role is Role.CUSTOMER:
            self.router.on_customer_message(message.conv, now)
        elif message.sender_role in (Role.AGENT, Role.SUPERVISOR):
            self.router.on_agent_reply(message.conv, message.sender, now)

    # -- helpers ---------------------------------------------------------------------

    def _register(self, agent: str, shop: str) -> None:
        """Make ``agent`` known to the engine (configured skills, else the defaults),
        holding chats but taking none until its status is known."""
        if self.router.agent(agent) is not None:
            return
        conf_shop, skills, max_chats = self._agent_conf.get(
            agent, (shop, self.default_skills, self.default_max_chats)
        )
        if conf_shop != shop:
            skills, max_chats = self.default_skills, self.default_max_chats
        self.router.upsert_agent(agent, shop, skills, max_chats, now=time.time())
        self.router.set_status(agent, AgentStatus.AWAY, time.time())

    def _classify(self, conv: Conversation) -> Classification:
        vip = False
        if self.crm is not None and conv.customer:
            try:
                vip = self.crm.is_vip(self.crm.chat_customer(conv.customer, str(conv.channel)))
            except Exception as exc:  # the CRM is an enrichment: route without it
                log.warning("VIP lookup failed: %r", exc)
        return classification_for(conv, vip)

    def _remember(self, conv: Conversation) -> bool:
        """Record the conversation's version; False if an applied one is newer."""
        version = (conv.last_seq, conv.updated_at)
        seen = self._versions.get(conv.id)
        if seen is not None and version < seen:
            return False
        self._versions[conv.id] = version
        self._versions.move_to_end(conv.id)
        if len(self._versions) > MAX_VERSIONS:
            self._versions.popitem(last=False)
        return True

    def _expire_grace(self, now: float) -> None:
        actions: list[Action] = []
        for agent, since in list(self._offline_since.items()):
            if now - since < self.grace_s:
                continue
            del self._offline_since[agent]
            if self.router.agent(agent) is not None:
                actions += self.router.set_status(agent, AgentStatus.OFFLINE, now)
        self._submit(actions)

    # -- timers ----------------------------------------------------------------------

    async def on_tick(self, ctx: WorkerContext, now: float) -> None:
        if ctx is not self._ctx:
            return
        due = {
            shop
            for shop, at in self._settle_at.items()
            if self._phase.get(shop) is _Phase.PENDING and at <= time.monotonic()
        }
        if due and not self._loading:
            self._loading = True  # one load at a time; it outlives a tick
            self._spawn(self._load(ctx, due))
        self._submit(self.router.tick(now))
        self._expire_grace(now)
        self._flush_positions(ctx, now)
        if now - self._discover_at >= DISCOVER_EVERY_S:
            self._discover_at = now
            self._spawn(self._discover(ctx))
        if now - self._sweep_at >= SWEEP_EVERY_S and not self._loading:
            self._sweep_at = now
            self._spawn(self._sweep(ctx))
        if now - self._dashboard_at >= DASHBOARD_EVERY_S:
            self._dashboard_at = now
            for shop in [s for s, p in self._phase.items() if p is _Phase.READY]:
                dashboard = self.router.dashboard(shop, now)
                metrics.observe_dashboard(dashboard)
                board: dict[str, Any] = msgspec.to_builtins(dashboard)
                self._spawn(self._quietly(ctx.notify("routing_dashboard", board, shop=shop)))

    async def _discover(self, ctx: WorkerContext) -> None:
        """Learn the shops of the newest queued and assigned chats (a page of each)."""
        for state in (ConvState.QUEUED, ConvState.ASSIGNED):
            try:
                async with self._slots:
                    page: ConversationPage = await ctx.client.request(
                        ListConversations(id=0, state=state, limit=MAX_CONVERSATION_PAGE)
                    )
            except (RequestFailed, Disconnected, TimeoutError):
                return
            if ctx is not self._ctx:
                return
            for conv in page.conversations:
                self._learn(conv.shop)

    async def _sweep(self, ctx: WorkerContext) -> None:
        """Find shops nobody announced and chats no event told about: chats refused
        at the engine's hard bound, events lost with a dropped subscription."""
        try:
            queued = await self._list_open(ctx, ConvState.QUEUED)
            assigned = await self._list_open(ctx, ConvState.ASSIGNED)
        except (RequestFailed, Disconnected, TimeoutError) as exc:
            log.warning("sweep failed: %s", exc)
            return
        if ctx is not self._ctx:
            return
        for conv in (*queued, *assigned):
            self._learn(conv.shop)
        now = time.time()
        listed = {c.id for c in queued} | {c.id for c in assigned}
        for conv in queued:
            if self._phase.get(conv.shop) is _Phase.READY and self.router.where(conv.id) is None:
                self._submit(self._conversation(conv, "queued", now))
        stale = [
            conv
            for shop, phase in self._phase.items()
            if phase is _Phase.READY
            for conv in self.router.queue(shop)
            if conv not in listed
        ]
        stale += [
            conv
            for shop, phase in self._phase.items()
            if phase is _Phase.READY
            for agent in self.router.agents(shop)
            for conv in agent.chats
            if conv not in listed
        ]
        for conv_id in stale[:MAX_RESYNC_PER_SWEEP]:
            await self._resync(ctx, conv_id)

    async def _resync(self, ctx: WorkerContext, conv_id: str) -> None:
        """Put one conversation where the store says it is."""
        try:
            async with self._slots:
                info: ConversationInfo = await ctx.client.request(
                    GetConversation(id=0, conv=conv_id)
                )
        except RequestFailed as exc:
            if exc.code == "not_found" and self.router.where(conv_id) is not None:
                self._submit(self.router.closed(conv_id, time.time()))
            return
        except Disconnected:
            return
        conv = info.conversation
        if ctx is self._ctx and self._phase.get(conv.shop) is _Phase.READY:
            self._submit(self._conversation(conv, "updated", time.time()))

    # -- carrying actions out ----------------------------------------------------------

    def _submit(self, actions: list[Action]) -> None:
        """Queue actions per conversation: one conversation's run in order, different
        conversations concurrently."""
        for action in actions:
            if isinstance(action, QueuePosition):
                self._positions[action.conv] = (action.position, action.eta_seconds)
                continue
            lane = self._lanes.get(action.conv)
            if lane is None:
                lane = self._lanes[action.conv] = deque()
                lane.append(action)
                self._spawn(self._drain(action.conv))
            else:
                lane.append(action)

    async def _drain(self, conv: str) -> None:
        lane = self._lanes[conv]
        try:
            while lane:
                action = lane.popleft()
                ctx = self._ctx
                if ctx is None or self._phase.get(action.shop) is not _Phase.READY:
                    continue
                try:
                    async with self._slots:
                        await self._carry_out(ctx, action)
                except RequestFailed as exc:
                    if exc.code == "conflict":
                        lane.clear()  # the chat moved on: follow the truth
                        await self._resync(ctx, conv)
                    else:
                        log.warning("routing %s of %s failed: %s", type(action).__name__, conv, exc)
                except Disconnected:
                    lane.clear()  # a new connection re-reads everything
        finally:
            if self._lanes.get(conv) is lane and not lane:
                del self._lanes[conv]

    async def _carry_out(self, ctx: WorkerContext, action: Action) -> None:
        if isinstance(action, Assign):
            note = action.note or str(action.reason) + (" (fallback)" if action.fallback else "")
            if action.previous_agent:
                note += f"; previously with {action.previous_agent}"
            expect = action.expect_agent
            await ctx.update(
                action.conv,
                state=ConvState.ASSIGNED,
                agent=action.agent,
                note=note,
                tags_remove=[TAG_OVERFLOW, TAG_REQUEUED],
                if_state=ConvState.ASSIGNED if expect else ConvState.QUEUED,
                if_agent=expect,
                part=f"assign:{action.agent}:{action.reason}",
            )
            metrics.ROUTING_ASSIGNMENTS.labels(shop=action.shop, reason=str(action.reason)).inc()
            self._positions.pop(action.conv, None)
            self._positions_told.pop(action.conv, None)
        elif isinstance(action, Queued):
            if action.overflow:
                metrics.ROUTING_OVERFLOW.labels(shop=action.shop).inc()
                await ctx.update(
                    action.conv, tags_add=[TAG_OVERFLOW], if_state=ConvState.QUEUED, part="overflow"
                )
                text = _busy_text(action.position)
            else:
                text = _wait_text(action.position, action.eta_seconds)
            await ctx.send(action.conv, TextBody(text=text), part="queued")
            await self._position(ctx, action.conv, action.position, action.eta_seconds)
        elif isinstance(action, Requeue):
            await ctx.update(
                action.conv,
                state=ConvState.QUEUED,
                tags_add=[TAG_REQUEUED],
                if_state=ConvState.ASSIGNED,
                if_agent=action.previous_agent,
                part=f"requeue:{action.previous_agent}:{action.reason}",
            )
            await ctx.send(
                action.conv,
                SystemBody(
                    event="requeued",
                    data={"previous_agent": action.previous_agent, "reason": str(action.reason)},
                ),
                part="requeued",
            )
            await self._position(ctx, action.conv, action.position, action.eta_seconds)
        elif isinstance(action, SlaBreach):
            metrics.ROUTING_SLA_BREACHES.labels(shop=action.shop).inc()
            log.info(
                "SLA breach: %s did not answer %s for %.0fs",
                action.agent,
                action.conv,
                action.waiting_seconds,
            )
            await ctx.notify(
                "sla_breach",
                {
                    "conv": action.conv,
                    "agent": action.agent,
                    "waiting_seconds": action.waiting_seconds,
                },
                shop=action.shop,
            )
        elif isinstance(action, Rejected):
            # Past the engine's hard bound: the chat stays queued in the store, the
            # customer hears the shop is busy, the sweep offers it again later.
            log.warning("routing holds %s back: %s", action.conv, action.reason)
            await ctx.send(action.conv, TextBody(text=_busy_text(None)), part="busy")

    def _flush_positions(self, ctx: WorkerContext, now: float) -> None:
        for conv, (position, eta) in list(self._positions.items()):
            if now - self._positions_told.get(conv, 0.0) < POSITION_EVERY_S:
                continue
            del self._positions[conv]
            self._positions_told[conv] = now
            self._spawn(self._quietly(self._position(ctx, conv, position, eta)))

    async def _position(
        self, ctx: WorkerContext, conv: str, position: int, eta: int | None
    ) -> None:
        self._positions_told[conv] = time.time()
        await ctx.notify("queue", {"position": position, "eta_seconds": eta}, conv=conv)

    async def _quietly(self, coro: Any) -> None:
        async with self._slots:
            with contextlib.suppress(RequestFailed, Disconnected):
                await coro

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
