"""Routing engine: which human agent gets which handed-off conversation, and when.

Theory of operation
-------------------
The engine is a deterministic state machine with no I/O, no asyncio and no
clock: every method that depends on time takes ``now`` (seconds, any epoch, must
not go backwards) and every method that changes state returns a list of
``Action`` records (``workers.routing.actions``) for the plugin glue to carry
out. Same calls, same actions. One ``Router`` holds many shops; shops never
share agents, queues or statistics.

State. Each tracked conversation is in exactly one place: in its shop's queue,
or in the ``chats`` of exactly one agent of its shop. Conversations enter with
``request`` (the bot hands off) and leave with ``closed``; a ``request`` for a
conversation already tracked is a no-op, so a redelivered hand-off never makes a
second assignment (after ``closed``, a ``request`` routes it afresh: a reopen).

Agents. ``upsert_agent`` registers an agent (status offline) or updates skills
and ``max_chats``. Status semantics for routing:

* ``online``: keeps its chats and receives new ones up to ``max_chats``;
* ``busy`` and ``away``: keep their chats (and their SLA clocks keep running:
  chats they neglect move on by SLA breach) but receive no new ones;
* ``offline`` (or ``remove_agent``): loses every chat; each is re-routed to the
  best other agent, or re-queued at the head of the queue.

Lowering ``max_chats`` below the current load re-routes the most recently
assigned excess chats the same way, so no agent ever holds more than its
``max_chats``.

Qualification. An agent is *qualified* for a conversation when it has the
conversation's skill (``Classification.skill``) and speaks its language
(``Classification.language``; an agent without any ``lang:*`` skill speaks
``RouterConfig.default_language``, ``lang:zh`` by default). Among qualified
ONLINE agents with free capacity, the least loaded wins, load being
``chats / max_chats`` (then the chat count); ties go to the agent idle longest
(the oldest last assignment; never assigned counts as idle forever), then to
the smallest agent id.

Fallback. When ``fallback_after_seconds`` is ``None`` a conversation only ever
goes to a qualified agent. Otherwise (default 120 s) any online agent of the shop may take it
(ranked: speaks the language, has the skill, then the rule above; the ``Assign``
says ``fallback=True``) when either no agent registered in the shop is
qualified at all (no point waiting), or it has waited at least
``fallback_after_seconds`` in the queue and no online agent it is not excluded
from (see below) is qualified. Qualified agents that are merely full never
trigger a fallback: the customer waits for them.

Queue. One priority queue per shop, ordered by (band, priority desc, time
entered asc). Band 0 is the *head*: conversations taken back from an agent
(agent offline, SLA breach, transfer to a group, capacity lowered) were already
being served and go before every new one. A new request enters band 1. A
conversation's *position* is its rank among queued conversations of the same
shop with the same (skill, language), i.e. competing for the same agents (an
approximation: routes whose agent pools merely overlap, such as no language and
``lang:zh``, are counted apart); the
customer is told it with ``Queued``/``Requeue`` and then with ``QueuePosition``
each time it changes (it can grow when a more urgent conversation arrives).
The queue is bounded by ``max_queue_per_shop`` for new requests: a request
finding it full is assigned if an agent is free, else ``Rejected``
(``queue_full``): the caller keeps it (routing leaves it queued in the store
and offers it again later). Conversations taken back from agents are never
refused; they are bounded by the agents' total ``max_chats``. Below that hard
bound, ``queue_limit`` (``None``: none) is the shop's *overflow* mark: a new
request that finds at least that many conversations queued is queued all the
same, in its place, and its ``Queued`` says ``overflow=True`` (routing tells
the customer the shop is busy and lets the bot keep answering meanwhile).

Restore. The engine's state is a cache of durable facts, so a new routing
process can rebuild it: ``restore`` puts a conversation where the store says it
is -- queued since a time (at the head if it had been taken back from an agent)
or assigned to an agent since a time -- with its SLA clock from the durable
timestamps, announcing nothing; ``settle`` then dispatches and tells every
queued customer their position. Restoring onto an agent who has no room is
allowed (a person claimed the chat, or settings changed meanwhile): the chat is
*forced*, counts toward the load, and the agent gets nothing new until the load
drops. ``forget_shop`` drops a shop (another routing instance owns it now).

Dispatch. Every operation that can free capacity or make a queued conversation
eligible (close, agent online, transfer, SLA breach, settings change, time
passing in ``tick``) ends with a dispatch pass: the queue is walked in order and
each conversation goes to the best eligible free agent, if any. New requests go
through the queue too (entering and leaving it in the same call, so the caller
only sees ``Assign(reason=new)``), which keeps one code path and means a new
conversation never takes an agent an older eligible one could have had.

ETA. ``eta = ceil(position * average_handle / slots)`` where ``average_handle`` is
the mean of the shop's last ``handle_time_window`` assignment-to-close
durations (``default_handle_seconds`` before the first close) and ``slots`` the
sum of ``max_chats`` of online qualified agents (a slot frees every
``average_handle / slots`` seconds on average). With no qualified agent online
the ETA is ``None`` (unknown).

SLA. ``request`` and ``on_customer_message`` mark the customer as waiting since
the oldest unanswered message (the hand-off itself counts: the customer asked
for a human). A reply from the *assigned* agent (``on_agent_reply``) clears it;
replies by anyone else do not. An agent receiving a chat gets a full window: it
breaches when ``now > max(oldest unanswered, assigned at) + sla_seconds``.
``tick`` finds breaches (timer heap, no scan), emits ``SlaBreach`` and moves the
chat to the best other agent (``Assign(reason=sla_breach)``) or to the queue head
(``Requeue``). The breaching agent is *excluded* from that conversation for
``exclusion_seconds``, after which it may get it back (it may be the only one
qualified). The freed slot of the breaching agent is used for other queued
conversations like any other slot.

Transfer. To a colleague (``to_agent``): allowed to an agent of the same shop
who is online or busy (a person choosing a busy colleague on purpose) and below
``max_chats``; a full, away, offline or unknown colleague gives ``Rejected`` and
the chat stays with ``from_agent`` (capacity is a hard limit; transfer to a
group instead). Skills are not checked: the person decided. To a group
(``to_skill``): the conversation's skill becomes ``to_skill`` and it is routed by
the normal rule, ``from_agent`` excluded, through the queue head. The note
travels with the next ``Assign``. A transfer is recognised as a repeat (``[]``)
when the conversation already left ``from_agent`` by a transfer from it; events
should still be deduplicated by id upstream (a transfer redelivered after the
chat came back to ``from_agent`` would be applied again).

Output volume. A dequeue moves up every conversation behind it on the same
route, so one call can emit one ``QueuePosition`` per queued conversation (at
most ``max_queue_per_shop`` plus taken-back chats); the glue may coalesce them.

Bounds. Shops (``max_shops``), agents per shop (``max_agents_per_shop``), chats
per agent (``MAX_CHATS_PER_AGENT``), skills per agent, queue per shop, handle
time samples, exclusions per conversation and timer heaps (stale entries are
compacted) are all limited; see the constants and ``RouterConfig``.

Errors. Contract violations by the caller (bad ids, unknown agent in
``set_status``, an agent moving shops, ``now`` not finite) raise
``RoutingError``. Refusals a customer or agent should hear about are
``Rejected`` actions.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import count
from typing import Final

from msgspec import Struct

from protocol import MAX_ID_CHARS, MAX_TEXT_CHARS, AgentStatus, ConvState

from .actions import (
    Action,
    Assign,
    AssignReason,
    Queued,
    QueuePosition,
    Rejected,
    RejectReason,
    Requeue,
    SlaBreach,
)
from .classify import LANG_PREFIX, LANG_ZH, MAX_PRIORITY, MAX_SKILL_CHARS, Classification

# -- limits and defaults -------------------------------------------------------

DEFAULT_SLA_SECONDS: Final = 60.0
DEFAULT_FALLBACK_AFTER_SECONDS: Final = 120.0
DEFAULT_EXCLUSION_SECONDS: Final = 300.0
DEFAULT_HANDLE_SECONDS: Final = 300.0
"""Assumed handle time before a shop's first close."""
DEFAULT_HANDLE_TIME_WINDOW: Final = 50
DEFAULT_MAX_QUEUE_PER_SHOP: Final = 20_000
DEFAULT_MAX_AGENTS_PER_SHOP: Final = 2000
DEFAULT_MAX_SHOPS: Final = 10_000

MAX_CHATS_PER_AGENT: Final = 50
MAX_SKILLS_PER_AGENT: Final = 32
MAX_EXCLUSIONS_PER_CONV: Final = 16
MAX_NOTE_CHARS: Final = MAX_TEXT_CHARS
"""Longer transfer notes are truncated."""
MIN_HANDLE_SAMPLE_SECONDS: Final = 1.0
MAX_HANDLE_SAMPLE_SECONDS: Final = 4 * 3600.0
"""Handle time samples are clamped to this range (a chat left open overnight
must not make every ETA absurd)."""
HEAP_SLACK: Final = 1024
"""Timer heaps are rebuilt when stale entries exceed live ones by this much."""

_HEAD_BAND: Final = 0
_NORMAL_BAND: Final = 1


class RoutingError(ValueError):
    """The caller broke the engine's contract (bad id, unknown agent, bad time...)."""


class RouterConfig(Struct, frozen=True, kw_only=True):
    """Tunables; all durations in seconds."""

    sla_seconds: float = DEFAULT_SLA_SECONDS
    """The assigned agent must reply within this of the oldest unanswered message."""
    fallback_after_seconds: float | None = DEFAULT_FALLBACK_AFTER_SECONDS
    """Queued this long with no qualified agent online: any online agent may take
    it. ``None``: never fall back. See the module docstring."""
    exclusion_seconds: float = DEFAULT_EXCLUSION_SECONDS
    """An agent who breached the SLA on (or transferred away) a conversation is
    not given it again for this long (> 0, so never in the same call)."""
    default_handle_seconds: float = DEFAULT_HANDLE_SECONDS
    handle_time_window: int = DEFAULT_HANDLE_TIME_WINDOW
    max_queue_per_shop: int = DEFAULT_MAX_QUEUE_PER_SHOP
    """Hard bound on a shop's queue (memory): beyond it new requests are ``Rejected``."""
    queue_limit: int | None = None
    """Overflow mark: a new request finding this many queued is queued with
    ``Queued.overflow``. ``None``: no overflow."""
    max_agents_per_shop: int = DEFAULT_MAX_AGENTS_PER_SHOP
    max_shops: int = DEFAULT_MAX_SHOPS
    default_language: str | None = LANG_ZH
    """Language of agents that have no ``lang:*`` skill (``None``: speaks none, so
    they only qualify for conversations without a language)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sla_seconds) and self.sla_seconds > 0):
            raise RoutingError("sla_seconds must be finite and > 0")
        fb = self.fallback_after_seconds
        if fb is not None and not (math.isfinite(fb) and fb >= 0):
            raise RoutingError("fallback_after_seconds must be None or finite and >= 0")
        if not (math.isfinite(self.exclusion_seconds) and self.exclusion_seconds > 0):
            raise RoutingError("exclusion_seconds must be finite and > 0")
        if not (math.isfinite(self.default_handle_seconds) and self.default_handle_seconds > 0):
            raise RoutingError("default_handle_seconds must be finite and > 0")
        for name in (
            "handle_time_window",
            "max_queue_per_shop",
            "max_agents_per_shop",
            "max_shops",
        ):
            if getattr(self, name) < 1:
                raise RoutingError(f"{name} must be >= 1")
        if self.queue_limit is not None and self.queue_limit < 0:
            raise RoutingError("queue_limit must be None or >= 0")
        if self.default_language is not None and not self.default_language.startswith(LANG_PREFIX):
            raise RoutingError(f"default_language must start with {LANG_PREFIX!r}")


# -- public records ------------------------------------------------------------


class Agent(Struct, frozen=True, kw_only=True):
    """A snapshot of one agent."""

    id: str
    shop: str
    skills: frozenset[str]
    status: AgentStatus
    max_chats: int
    chats: tuple[str, ...]
    """Assigned conversations, oldest assignment first."""
    last_assigned_at: float | None
    """When the agent last received a conversation (idle tie-break)."""

    @property
    def load(self) -> int:
        return len(self.chats)


class Placement(Struct, frozen=True, kw_only=True):
    """Where one tracked conversation is now."""

    conv: str
    shop: str
    state: ConvState
    """``queued`` or ``assigned``."""
    agent: str | None
    position: int | None
    """Queue position (same shop, skill and language), when queued."""
    skill: str
    language: str | None
    priority: int
    customer: str | None
    unanswered_since: float | None
    sla_due: float | None


class AgentLoad(Struct, frozen=True, kw_only=True):
    agent: str
    status: AgentStatus
    chats: int
    max_chats: int
    skills: list[str]
    idle_seconds: float | None
    """Since the last assignment; ``None`` if never assigned."""


class SkillQueue(Struct, frozen=True, kw_only=True):
    skill: str
    queued: int
    longest_wait_seconds: float
    average_wait_seconds: float


class Dashboard(Struct, frozen=True, kw_only=True):
    """One shop at ``at``, for supervisors. Waits count from entering the queue."""

    shop: str
    at: float
    queued: int
    longest_wait_seconds: float
    average_wait_seconds: float
    queues: dict[str, SkillQueue]
    """Per skill group (only groups with someone waiting)."""
    agents: list[AgentLoad]
    """Every registered agent, by id."""
    online_agents: int
    available_agents: int
    """Online with a free slot."""
    assigned: int
    online_capacity: int
    """Sum of ``max_chats`` of online agents."""
    average_handle_seconds: float
    sla_breaches: int
    """Since this router started."""


# -- internal state ------------------------------------------------------------

_QueueKey = tuple[int, int, float, int, str]
"""(band, -priority, entered at, sequence, conv id): sorts in service order."""
_Route = tuple[str, str | None]
"""(skill, language): conversations with the same route compete for the same agents."""


@dataclass(slots=True)
class _AgentState:
    id: str
    shop: str
    skills: frozenset[str]
    speaks: frozenset[str]
    max_chats: int
    status: AgentStatus = AgentStatus.OFFLINE
    chats: dict[str, None] = field(default_factory=dict)
    last_assigned_at: float | None = None
    forced: set[str] = field(default_factory=set)
    """Chats restored onto this agent when it had no room (a subset of ``chats``)."""

    def has_room(self) -> bool:
        return len(self.chats) < self.max_chats

    def rank(self) -> tuple[Fraction, int, float, str]:
        last = self.last_assigned_at
        return (
            Fraction(len(self.chats), self.max_chats) if self.max_chats else Fraction(1),
            len(self.chats),
            -math.inf if last is None else last,
            self.id,
        )

    def snapshot(self) -> Agent:
        return Agent(
            id=self.id,
            shop=self.shop,
            skills=self.skills,
            status=self.status,
            max_chats=self.max_chats,
            chats=tuple(self.chats),
            last_assigned_at=self.last_assigned_at,
        )


@dataclass(slots=True)
class _Conv:
    id: str
    shop: str
    customer: str | None
    skill: str
    language: str | None
    priority: int
    agent: str | None = None
    assigned_at: float | None = None
    queue_key: _QueueKey | None = None
    queued_at: float | None = None
    unanswered_since: float | None = None
    sla_due: float | None = None
    excluded: dict[str, float] = field(default_factory=dict)
    """agent id -> not offered to that agent before this time."""
    previous_agent: str | None = None
    transferred_from: str | None = None
    note: str = ""
    route_reason: AssignReason = AssignReason.QUEUE
    """Reason of the Assign if it is assigned within the current call."""
    announce: bool = False
    """Entered the queue in the current call; Queued/Requeue not yet emitted."""
    overflow: bool = False
    """Entered the queue past ``queue_limit`` (told with the next ``Queued``)."""
    told_agent: str | None = None
    """Where the outside world last put it: the agent of the last ``Assign`` (or
    restore), ``None`` once ``Queued``/``Requeue`` said it is queued. An ``Assign``
    carries it as ``expect_agent`` so that its update can be conditional."""
    position: int | None = None
    """Last position told to the customer."""
    _route: _Route = ("", None)

    @property
    def route(self) -> _Route:
        return self._route

    def set_skill(self, skill: str) -> None:
        self.skill = skill
        self._route = (skill, self.language)

    def __post_init__(self) -> None:
        self._route = (self.skill, self.language)

    def excludes(self, agent: str, now: float) -> bool:
        until = self.excluded.get(agent)
        return until is not None and now < until


@dataclass(slots=True)
class _Shop:
    id: str
    handle_times: deque[float]
    agents: dict[str, _AgentState] = field(default_factory=dict)
    queue: list[_QueueKey] = field(default_factory=list)
    sla_breaches: int = 0
    queue_changed: bool = False
    """The queue changed since positions were last told."""


def _check_now(now: float) -> float:
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise RoutingError(f"now must be a finite number, got {now!r}")
    return float(now)


def _check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_CHARS:
        raise RoutingError(f"{kind} must be a string of 1..{MAX_ID_CHARS} characters")
    return value


def _check_skill(skill: str) -> str:
    if (
        not isinstance(skill, str)
        or not 1 <= len(skill) <= MAX_SKILL_CHARS
        or not skill.isprintable()
    ):
        raise RoutingError(f"bad skill {skill!r}: 1..{MAX_SKILL_CHARS} printable characters")
    return skill


class Router:
    """Routing state of many shops. See the module docstring."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self._shops: dict[str, _Shop] = {}
        self._agents: dict[str, _AgentState] = {}
        self._convs: dict[str, _Conv] = {}
        self._sla_timers: list[tuple[float, int, str]] = []
        self._wake_timers: list[tuple[float, int, str]] = []
        self._seq = count()
        self._wake_floor = 0
        """Size of the wake heap after its last rebuild (compaction threshold)."""

    # -- agents ----------------------------------------------------------------

    def upsert_agent(
        self, agent_id: str, shop: str, skills: Iterable[str], max_chats: int, *, now: float
    ) -> list[Action]:
        """Register an agent (status offline) or update its skills and ``max_chats``.

        Lowering ``max_chats`` below the current load re-routes the most recently
        assigned excess chats (``reason=capacity_reduced``). Chats held for a skill
        the agent no longer has are kept. An agent cannot move to another shop
        (``remove_agent`` first): ``RoutingError``.
        """
        now = _check_now(now)
        _check_id("agent_id", agent_id)
        _check_id("shop", shop)
        skill_set = frozenset(_check_skill(s) for s in skills)
        if len(skill_set) > MAX_SKILLS_PER_AGENT:
            raise RoutingError(f"at most {MAX_SKILLS_PER_AGENT} skills per agent")
        if (
            isinstance(max_chats, bool)
            or not isinstance(max_chats, int)
            or not 0 <= max_chats <= MAX_CHATS_PER_AGENT
        ):
            raise RoutingError(f"max_chats must be an int in 0..{MAX_CHATS_PER_AGENT}")
        speaks = frozenset(s for s in skill_set if s.startswith(LANG_PREFIX))
        if not speaks and self.config.default_language is not None:
            speaks = frozenset({self.config.default_language})

        agent = self._agents.get(agent_id)
        if agent is not None and agent.shop != shop:
            raise RoutingError(f"agent {agent_id!r} belongs to shop {agent.shop!r}")
        state = self._shop(shop)
        if state is None:
            raise RoutingError(f"too many shops (max_shops={self.config.max_shops})")
        out: list[Action] = []
        if agent is None:
            if len(state.agents) >= self.config.max_agents_per_shop:
                raise RoutingError(f"shop {shop!r} has max_agents_per_shop agents")
            agent = _AgentState(
                id=agent_id, shop=shop, skills=skill_set, speaks=speaks, max_chats=max_chats
            )
            state.agents[agent_id] = agent
            self._agents[agent_id] = agent
        else:
            agent.skills, agent.speaks, agent.max_chats = skill_set, speaks, max_chats
            excess = list(agent.chats)[max_chats:]
            self._take_back(state, excess, now, AssignReason.CAPACITY_REDUCED)
        self._settle(state, now, out)
        return out

    def remove_agent(self, agent_id: str, *, now: float) -> list[Action]:
        """Forget an agent; its chats are re-routed as if it went offline.
        Unknown agents: no-op."""
        now = _check_now(now)
        agent = self._agents.get(agent_id)
        if agent is None:
            return []
        state = self._shops[agent.shop]
        agent.status = AgentStatus.OFFLINE
        self._take_back(state, list(agent.chats), now, AssignReason.AGENT_OFFLINE)
        del state.agents[agent_id]
        del self._agents[agent_id]
        out: list[Action] = []
        self._settle(state, now, out)
        return out

    def set_status(self, agent_id: str, status: AgentStatus | str, now: float) -> list[Action]:
        """Change an agent's status. Offline: its chats are re-routed (or re-queued
        at the head). Online: it pulls from the queue. Same status: no-op."""
        now = _check_now(now)
        agent = self._agents.get(agent_id)
        if agent is None:
            raise RoutingError(f"unknown agent {agent_id!r}")
        try:
            new = AgentStatus(status)
        except ValueError:
            raise RoutingError(f"unknown status {status!r}") from None
        if agent.status is new:
            return []
        agent.status = new
        state = self._shops[agent.shop]
        out: list[Action] = []
        if new is AgentStatus.OFFLINE:
            self._take_back(state, list(agent.chats), now, AssignReason.AGENT_OFFLINE)
        self._settle(state, now, out)
        return out

    # -- conversations -----------------------------------------------------------

    def request(
        self,
        conv: str,
        shop: str,
        classification: Classification,
        now: float,
        *,
        customer: str | None = None,
    ) -> list[Action]:
        """The bot hands ``conv`` off: assign it now or queue it.

        Returns ``[Assign(reason=new)]``, ``[Queued, QueuePosition...]`` or
        ``[Rejected]``; ``[]`` if ``conv`` is already queued or assigned.
        """
        now = _check_now(now)
        _check_id("conv", conv)
        _check_id("shop", shop)
        _check_skill(classification.skill)
        if not 0 <= classification.priority <= MAX_PRIORITY:
            raise RoutingError(f"priority must be in 0..{MAX_PRIORITY}")
        if classification.language is not None:
            _check_skill(classification.language)
        if conv in self._convs:
            return []
        state = self._shop(shop)
        if state is None:
            return [Rejected(conv=conv, shop=shop, reason=RejectReason.TOO_MANY_SHOPS)]
        c = _Conv(
            id=conv,
            shop=shop,
            customer=customer,
            skill=classification.skill,
            language=classification.language,
            priority=classification.priority,
            unanswered_since=now,
            route_reason=AssignReason.NEW,
        )
        out: list[Action] = []
        if len(state.queue) >= self.config.max_queue_per_shop:
            free = [
                a for a in state.agents.values() if a.status is AgentStatus.ONLINE and a.has_room()
            ]
            choice = self._choose(state, c, free, now, waited=0.0)
            if choice is None:
                return [Rejected(conv=conv, shop=shop, reason=RejectReason.QUEUE_FULL)]
            self._convs[conv] = c
            self._assign(c, choice[0], now, out, fallback=choice[1])
        else:
            self._convs[conv] = c
            limit = self.config.queue_limit
            c.overflow = limit is not None and len(state.queue) >= limit
            self._enqueue(state, c, now, head=False, reason=AssignReason.NEW)
        self._settle(state, now, out)
        return out

    def restore(
        self,
        conv: str,
        shop: str,
        classification: Classification,
        *,
        since: float,
        agent: str | None = None,
        customer: str | None = None,
        unanswered_since: float | None = None,
        head: bool = False,
        previous_agent: str | None = None,
        announce: bool = False,
    ) -> None:
        """Track ``conv`` where the durable record says it is: queued since ``since``
        (in the head band if ``head``), or assigned to ``agent`` since ``since``.
        Moves it if it is tracked elsewhere; announces nothing (call ``settle``) unless
        ``announce``: the customer of a queued conversation was never told, so its
        ``Queued`` comes with the next ``settle``.
        ``agent`` must be registered in ``shop`` (``RoutingError``)."""
        since = _check_now(since)
        _check_id("conv", conv)
        _check_skill(classification.skill)
        if not 0 <= classification.priority <= MAX_PRIORITY:
            raise RoutingError(f"priority must be in 0..{MAX_PRIORITY}")
        target = None
        if agent is not None:
            target = self._agents.get(agent)
            if target is None or target.shop != shop:
                raise RoutingError(f"unknown agent {agent!r} in shop {shop!r}")
        c = self._convs.get(conv)
        if c is not None:
            if c.shop != shop:
                raise RoutingError(f"conversation {conv!r} belongs to shop {c.shop!r}")
            if c.agent == agent and (agent is not None or c.queue_key is not None):
                return  # already there
            state = self._shops[c.shop]
            if c.agent is not None:
                self._unassign(c)
            else:
                self._dequeue(state, c)
        else:
            created = self._shop(shop)
            if created is None:
                raise RoutingError(f"too many shops (max_shops={self.config.max_shops})")
            state = created
            c = _Conv(
                id=conv,
                shop=shop,
                customer=customer,
                skill=classification.skill,
                language=classification.language,
                priority=classification.priority,
            )
            self._convs[conv] = c
        c.unanswered_since = unanswered_since
        c.previous_agent = previous_agent
        c.told_agent = agent
        if target is not None:
            c.agent = target.id
            c.assigned_at = since
            if not target.has_room():
                target.forced.add(c.id)
            target.chats[c.id] = None
            if unanswered_since is not None:
                self._arm_sla(c, max(unanswered_since, since) + self.config.sla_seconds)
        else:
            self._enqueue(state, c, since, head=head, reason=AssignReason.QUEUE)
            c.announce = announce  # else told when it entered; settle tells its position

    def set_priority(self, conv: str, priority: int, now: float) -> list[Action]:
        """``conv``'s priority changed (the bot escalated a waiting chat): a queued
        conversation moves to its new place, keeping its band and time of entry."""
        now = _check_now(now)
        if not 0 <= priority <= MAX_PRIORITY:
            raise RoutingError(f"priority must be in 0..{MAX_PRIORITY}")
        c = self._convs.get(conv)
        if c is None or c.priority == priority:
            return []
        c.priority = priority
        if c.queue_key is None:
            return []
        state = self._shops[c.shop]
        band, _, entered, seq, conv_id = c.queue_key
        del state.queue[bisect_left(state.queue, c.queue_key)]
        c.queue_key = (band, -priority, entered, seq, conv_id)
        insort(state.queue, c.queue_key)
        state.queue_changed = True
        out: list[Action] = []
        self._settle(state, now, out)
        return out

    def settle(self, shop: str, now: float) -> list[Action]:
        """Dispatch ``shop``'s queue and tell queued customers their positions
        (after ``restore``)."""
        now = _check_now(now)
        state = self._shops.get(shop)
        out: list[Action] = []
        if state is not None:
            state.queue_changed = True
            self._settle(state, now, out)
        return out

    def forget_shop(self, shop: str) -> None:
        """Drop everything about ``shop`` (another routing instance owns it now)."""
        state = self._shops.pop(shop, None)
        if state is None:
            return
        for agent_id in state.agents:
            self._agents.pop(agent_id, None)
        for conv in [k for k, c in self._convs.items() if c.shop == shop]:
            del self._convs[conv]

    def shops(self) -> list[str]:
        """Shops the engine tracks."""
        return sorted(self._shops)

    def on_customer_message(self, conv: str, now: float) -> list[Action]:
        """The customer wrote: start the SLA clock unless it is already running
        (it runs from the oldest unanswered message). Untracked convs: ignored."""
        now = _check_now(now)
        c = self._convs.get(conv)
        if c is not None and c.unanswered_since is None:
            c.unanswered_since = now
            if c.agent is not None:
                self._arm_sla(c, now + self.config.sla_seconds)
        return []

    def on_agent_reply(self, conv: str, agent: str, now: float) -> list[Action]:
        """``agent`` replied to the customer: if it is the assigned agent, the SLA
        clock stops until the next customer message. Anyone else: ignored."""
        _check_now(now)
        c = self._convs.get(conv)
        if c is not None and c.agent == agent:
            c.unanswered_since = None
            c.sla_due = None
        return []

    def closed(self, conv: str, now: float) -> list[Action]:
        """``conv`` is closed (or the customer left the queue): free its slot or
        queue place, serve the queue, update positions. Unknown conv: no-op."""
        now = _check_now(now)
        c = self._convs.pop(conv, None)
        if c is None:
            return []
        state = self._shops[c.shop]
        if c.agent is not None:
            if c.assigned_at is not None:
                sample = min(
                    max(now - c.assigned_at, MIN_HANDLE_SAMPLE_SECONDS), MAX_HANDLE_SAMPLE_SECONDS
                )
                state.handle_times.append(sample)
            holder = self._agents[c.agent]
            del holder.chats[c.id]
            holder.forced.discard(c.id)
            c.agent = None
        else:
            self._dequeue(state, c)
        out: list[Action] = []
        self._settle(state, now, out)
        return out

    def transfer(
        self,
        conv: str,
        from_agent: str,
        to_agent: str | None,
        to_skill: str | None,
        note: str,
        now: float,
    ) -> list[Action]:
        """Hand ``conv`` from ``from_agent`` to a colleague or to a skill group.

        Exactly one of ``to_agent`` / ``to_skill`` must be given (else
        ``RoutingError``). See "Transfer" in the module docstring for the policy.
        A repeat of a transfer already done returns ``[]``.
        """
        now = _check_now(now)
        if (to_agent is None) == (to_skill is None):
            raise RoutingError("give exactly one of to_agent and to_skill")
        if to_skill is not None:
            _check_skill(to_skill)
        note = note[:MAX_NOTE_CHARS]
        c = self._convs.get(conv)
        if c is None or c.agent != from_agent:
            if c is not None and c.transferred_from == from_agent:
                return []  # a redelivered transfer
            source = self._agents.get(from_agent)
            shop = c.shop if c is not None else (source.shop if source else "")
            return [Rejected(conv=conv, shop=shop, reason=RejectReason.NOT_ASSIGNED)]
        state = self._shops[c.shop]
        out: list[Action] = []
        if to_agent is not None:
            if to_agent == from_agent:
                return []
            target = self._agents.get(to_agent)
            if target is None or target.shop != c.shop:
                return [Rejected(conv=conv, shop=c.shop, reason=RejectReason.UNKNOWN_AGENT)]
            if target.status not in (AgentStatus.ONLINE, AgentStatus.BUSY):
                return [Rejected(conv=conv, shop=c.shop, reason=RejectReason.AGENT_UNAVAILABLE)]
            if not target.has_room():
                return [Rejected(conv=conv, shop=c.shop, reason=RejectReason.AGENT_FULL)]
            self._unassign(c)
            c.note, c.transferred_from, c.route_reason = note, from_agent, AssignReason.TRANSFER
            self._assign(c, target, now, out, fallback=False)
        else:
            assert to_skill is not None
            self._unassign(c)
            c.set_skill(to_skill)
            c.note, c.transferred_from = note, from_agent
            self._exclude(c, from_agent, now)
            self._enqueue(state, c, now, head=True, reason=AssignReason.TRANSFER)
        self._settle(state, now, out)
        return out

    def tick(self, now: float) -> list[Action]:
        """Let time pass: SLA breaches move chats; conversations whose fallback time
        came or whose exclusion expired are offered to free agents."""
        now = _check_now(now)
        out: list[Action] = []
        touched: dict[str, _Shop] = {}
        while self._sla_timers and self._sla_timers[0][0] < now:
            due, _, conv = heapq.heappop(self._sla_timers)
            c = self._convs.get(conv)
            if c is None or c.agent is None or c.sla_due != due:
                continue  # stale timer
            state = self._shops[c.shop]
            touched[state.id] = state
            agent = c.agent
            waiting = now - c.unanswered_since if c.unanswered_since is not None else 0.0
            out.append(
                SlaBreach(conv=c.id, shop=c.shop, agent=agent, waiting_seconds=max(0.0, waiting))
            )
            state.sla_breaches += 1
            self._unassign(c)
            self._exclude(c, agent, now)
            self._enqueue(state, c, now, head=True, reason=AssignReason.SLA_BREACH)
        while self._wake_timers and self._wake_timers[0][0] <= now:
            _, _, conv = heapq.heappop(self._wake_timers)
            c = self._convs.get(conv)
            if c is not None and c.queue_key is not None:
                state = self._shops[c.shop]
                touched[state.id] = state
        for state in touched.values():
            self._settle(state, now, out)
        return out

    # -- views -------------------------------------------------------------------

    def agent(self, agent_id: str) -> Agent | None:
        a = self._agents.get(agent_id)
        return None if a is None else a.snapshot()

    def agents(self, shop: str) -> list[Agent]:
        """Every agent of ``shop``, by id."""
        state = self._shops.get(shop)
        if state is None:
            return []
        return [state.agents[k].snapshot() for k in sorted(state.agents)]

    def queue(self, shop: str) -> list[str]:
        """Queued conversations of ``shop`` in service order."""
        state = self._shops.get(shop)
        return [] if state is None else [key[-1] for key in state.queue]

    def where(self, conv: str) -> tuple[str, str | None, float | None] | None:
        """Cheaply: (shop, agent or ``None`` if queued, unanswered since) of a tracked
        conversation, or ``None`` (``conversation`` also computes the queue position)."""
        c = self._convs.get(conv)
        return None if c is None else (c.shop, c.agent, c.unanswered_since)

    def conversation(self, conv: str) -> Placement | None:
        """Where ``conv`` is, or ``None`` if it is not tracked (bot, closed, rejected)."""
        c = self._convs.get(conv)
        if c is None:
            return None
        position: int | None = None
        if c.queue_key is not None:
            state = self._shops[c.shop]
            position = 1 + sum(
                1
                for key in state.queue[: bisect_left(state.queue, c.queue_key)]
                if self._convs[key[-1]].route == c.route
            )
        return Placement(
            conv=c.id,
            shop=c.shop,
            state=ConvState.ASSIGNED if c.agent is not None else ConvState.QUEUED,
            agent=c.agent,
            position=position,
            skill=c.skill,
            language=c.language,
            priority=c.priority,
            customer=c.customer,
            unanswered_since=c.unanswered_since,
            sla_due=c.sla_due,
        )

    def dashboard(self, shop: str, now: float) -> Dashboard:
        """Queue and agent figures of ``shop`` at ``now`` (empty for an unknown shop)."""
        now = _check_now(now)
        state = self._shops.get(shop)
        if state is None:
            return Dashboard(
                shop=shop,
                at=now,
                queued=0,
                longest_wait_seconds=0.0,
                average_wait_seconds=0.0,
                queues={},
                agents=[],
                online_agents=0,
                available_agents=0,
                assigned=0,
                online_capacity=0,
                average_handle_seconds=self.config.default_handle_seconds,
                sla_breaches=0,
            )
        waits: dict[str, list[float]] = {}
        for key in state.queue:
            c = self._convs[key[-1]]
            entered = c.queued_at if c.queued_at is not None else now
            waits.setdefault(c.skill, []).append(max(0.0, now - entered))
        every = [w for ws in waits.values() for w in ws]
        queues = {
            skill: SkillQueue(
                skill=skill,
                queued=len(ws),
                longest_wait_seconds=max(ws),
                average_wait_seconds=sum(ws) / len(ws),
            )
            for skill, ws in sorted(waits.items())
        }
        rows = []
        online = available = assigned = capacity = 0
        for agent_id in sorted(state.agents):
            a = state.agents[agent_id]
            assigned += len(a.chats)
            if a.status is AgentStatus.ONLINE:
                online += 1
                capacity += a.max_chats
                available += a.has_room()
            rows.append(
                AgentLoad(
                    agent=a.id,
                    status=a.status,
                    chats=len(a.chats),
                    max_chats=a.max_chats,
                    skills=sorted(a.skills),
                    idle_seconds=None
                    if a.last_assigned_at is None
                    else max(0.0, now - a.last_assigned_at),
                )
            )
        return Dashboard(
            shop=shop,
            at=now,
            queued=len(state.queue),
            longest_wait_seconds=max(every, default=0.0),
            average_wait_seconds=sum(every) / len(every) if every else 0.0,
            queues=queues,
            agents=rows,
            online_agents=online,
            available_agents=available,
            assigned=assigned,
            online_capacity=capacity,
            average_handle_seconds=self._average_handle(state),
            sla_breaches=state.sla_breaches,
        )

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the internal state is inconsistent (tests)."""
        seen: set[str] = set()
        for shop_id, state in self._shops.items():
            if state.queue != sorted(state.queue):
                raise AssertionError(f"queue of {shop_id} is not sorted")
            for key in state.queue:
                c = self._convs.get(key[-1])
                if c is None or c.queue_key != key or c.agent is not None or c.shop != shop_id:
                    raise AssertionError(f"bad queue entry {key}")
                if c.id in seen:
                    raise AssertionError(f"{c.id} queued twice")
                seen.add(c.id)
            for agent_id, a in state.agents.items():
                if self._agents.get(agent_id) is not a or a.shop != shop_id:
                    raise AssertionError(f"agent {agent_id} misfiled")
                if len(a.chats) - len(a.forced) > a.max_chats or not a.forced <= set(a.chats):
                    raise AssertionError(f"agent {agent_id} over max_chats")
                if a.status is AgentStatus.OFFLINE and a.chats:
                    raise AssertionError(f"offline agent {agent_id} holds chats")
                for conv in a.chats:
                    c = self._convs.get(conv)
                    if c is None or c.agent != agent_id or c.queue_key is not None:
                        raise AssertionError(f"bad chat {conv} of {agent_id}")
                    if conv in seen:
                        raise AssertionError(f"{conv} in two places")
                    seen.add(conv)
        if seen != set(self._convs):
            raise AssertionError(f"conversations nowhere: {set(self._convs) - seen}")
        if len(self._agents) != sum(len(s.agents) for s in self._shops.values()):
            raise AssertionError("agent index out of sync")

    # -- internals -----------------------------------------------------------------

    def _shop(self, shop: str) -> _Shop | None:
        state = self._shops.get(shop)
        if state is None:
            if len(self._shops) >= self.config.max_shops:
                return None
            state = _Shop(id=shop, handle_times=deque(maxlen=self.config.handle_time_window))
            self._shops[shop] = state
        return state

    def _qualified(self, agent: _AgentState, route: _Route) -> bool:
        skill, language = route
        return skill in agent.skills and (language is None or language in agent.speaks)

    def _choose(
        self, state: _Shop, c: _Conv, free: list[_AgentState], now: float, waited: float
    ) -> tuple[_AgentState, bool] | None:
        """The best free agent for ``c`` and whether it is a fallback, or None."""
        route = c.route
        pool = [a for a in free if not c.excludes(a.id, now)]
        qualified = [a for a in pool if self._qualified(a, route)]
        if qualified:
            return min(qualified, key=_AgentState.rank), False
        if not pool or not self._may_fall_back(state, c, now, waited):
            return None
        language, skill = c.language, c.skill

        def fallback_rank(a: _AgentState) -> tuple[bool, bool, Fraction, int, float, str]:
            return (
                language is not None and language not in a.speaks,
                skill not in a.skills,
                *a.rank(),
            )

        return min(pool, key=fallback_rank), True

    def _may_fall_back(self, state: _Shop, c: _Conv, now: float, waited: float) -> bool:
        after = self.config.fallback_after_seconds
        if after is None:
            return False
        route = c.route
        if not any(self._qualified(a, route) for a in state.agents.values()):
            return True  # nobody could ever take it
        if waited < after:
            return False
        return not any(
            a.status is AgentStatus.ONLINE
            and self._qualified(a, route)
            and not c.excludes(a.id, now)
            for a in state.agents.values()
        )

    def _assign(
        self, c: _Conv, agent: _AgentState, now: float, out: list[Action], *, fallback: bool
    ) -> None:
        c.agent = agent.id
        c.assigned_at = now
        agent.chats[c.id] = None
        agent.last_assigned_at = now
        if c.unanswered_since is not None:
            self._arm_sla(c, max(c.unanswered_since, now) + self.config.sla_seconds)
        out.append(
            Assign(
                conv=c.id,
                shop=c.shop,
                agent=agent.id,
                previous_agent=c.previous_agent,
                reason=c.route_reason,
                priority=c.priority,
                note=c.note,
                fallback=fallback,
                expect_agent=c.told_agent,
            )
        )
        c.told_agent = agent.id
        c.previous_agent = None
        c.note = ""
        c.route_reason = AssignReason.QUEUE
        c.announce = False

    def _unassign(self, c: _Conv) -> None:
        assert c.agent is not None
        holder = self._agents[c.agent]
        del holder.chats[c.id]
        holder.forced.discard(c.id)
        c.previous_agent = c.agent
        c.agent = None
        c.assigned_at = None
        c.sla_due = None

    def _take_back(self, state: _Shop, convs: list[str], now: float, reason: AssignReason) -> None:
        """Move assigned ``convs`` to the head of the queue (the dispatch that follows
        may give them to other agents at once)."""
        for conv in convs:
            c = self._convs[conv]
            self._unassign(c)
            self._enqueue(state, c, now, head=True, reason=reason)

    def _enqueue(
        self, state: _Shop, c: _Conv, now: float, *, head: bool, reason: AssignReason
    ) -> None:
        key: _QueueKey = (
            _HEAD_BAND if head else _NORMAL_BAND,
            -c.priority,
            now,
            next(self._seq),
            c.id,
        )
        insort(state.queue, key)
        state.queue_changed = True
        c.queue_key = key
        c.queued_at = now
        c.route_reason = reason
        c.announce = True
        c.position = None
        after = self.config.fallback_after_seconds
        if after is not None:
            self._wake_at(now + after, c)

    def _dequeue(self, state: _Shop, c: _Conv) -> None:
        assert c.queue_key is not None
        i = bisect_left(state.queue, c.queue_key)
        assert state.queue[i] == c.queue_key
        del state.queue[i]
        state.queue_changed = True
        c.queue_key = None
        c.queued_at = None
        c.position = None

    def _exclude(self, c: _Conv, agent: str, now: float) -> None:
        until = now + self.config.exclusion_seconds
        live = {a: t for a, t in c.excluded.items() if t > now}
        live[agent] = until
        if len(live) > MAX_EXCLUSIONS_PER_CONV:
            keep = sorted(live.items(), key=lambda item: item[1])[-MAX_EXCLUSIONS_PER_CONV:]
            live = dict(keep)
        c.excluded = live
        self._wake_at(until, c)

    def _arm_sla(self, c: _Conv, due: float) -> None:
        c.sla_due = due
        heapq.heappush(self._sla_timers, (due, next(self._seq), c.id))
        self._compact_timers()

    def _wake_at(self, when: float, c: _Conv) -> None:
        heapq.heappush(self._wake_timers, (when, next(self._seq), c.id))
        self._compact_timers()

    def _dispatch(self, state: _Shop, now: float, out: list[Action]) -> None:
        """Walk the queue in order; give each conversation the best eligible free agent."""
        if not state.queue:
            return
        free = [a for a in state.agents.values() if a.status is AgentStatus.ONLINE and a.has_room()]
        for key in list(state.queue):
            if not free:
                break
            c = self._convs[key[-1]]
            waited = now - c.queued_at if c.queued_at is not None else 0.0
            choice = self._choose(state, c, free, now, waited)
            if choice is None:
                continue
            agent, fallback = choice
            self._dequeue(state, c)
            self._assign(c, agent, now, out, fallback=fallback)
            if not agent.has_room():
                free.remove(agent)

    def _settle(self, state: _Shop, now: float, out: list[Action]) -> None:
        """End of every mutating call: dispatch, then tell queued customers their
        (new) positions, then keep the timer heaps compact."""
        self._dispatch(state, now, out)
        if not state.queue_changed:
            return  # positions cannot have changed
        state.queue_changed = False
        counters: dict[_Route, int] = {}
        slots: dict[_Route, int] = {}
        average = self._average_handle(state)
        for key in state.queue:
            c = self._convs[key[-1]]
            route = c.route
            position = counters.get(route, 0) + 1
            counters[route] = position
            if not c.announce and c.position == position:
                continue
            if route not in slots:
                slots[route] = sum(
                    a.max_chats
                    for a in state.agents.values()
                    if a.status is AgentStatus.ONLINE and self._qualified(a, route)
                )
            eta = math.ceil(position * average / slots[route]) if slots[route] else None
            if c.announce and c.previous_agent is not None:
                out.append(
                    Requeue(
                        conv=c.id,
                        shop=c.shop,
                        previous_agent=c.previous_agent,
                        reason=c.route_reason,
                        position=position,
                        eta_seconds=eta,
                        priority=c.priority,
                    )
                )
            elif c.announce:
                out.append(
                    Queued(
                        conv=c.id,
                        shop=c.shop,
                        position=position,
                        eta_seconds=eta,
                        priority=c.priority,
                        overflow=c.overflow,
                    )
                )
            else:
                out.append(
                    QueuePosition(conv=c.id, shop=c.shop, position=position, eta_seconds=eta)
                )
            if c.announce:
                c.told_agent = None
            c.announce = False
            c.route_reason = AssignReason.QUEUE
            c.position = position

    def _average_handle(self, state: _Shop) -> float:
        if not state.handle_times:
            return self.config.default_handle_seconds
        return sum(state.handle_times) / len(state.handle_times)

    def _compact_timers(self) -> None:
        """Rebuild a timer heap from live state when stale entries dominate it."""
        live = len(self._convs)
        if len(self._sla_timers) > 2 * live + HEAP_SLACK:
            self._sla_timers = [
                (c.sla_due, next(self._seq), c.id)
                for c in self._convs.values()
                if c.sla_due is not None
            ]
            heapq.heapify(self._sla_timers)
        if len(self._wake_timers) > 2 * max(live, self._wake_floor) + HEAP_SLACK:
            after = self.config.fallback_after_seconds
            timers: list[tuple[float, int, str]] = []
            for c in self._convs.values():
                if after is not None and c.queued_at is not None:
                    timers.append((c.queued_at + after, next(self._seq), c.id))
                # every conversation's, queued or not: an exclusion may be set just
                # before the conversation is queued
                timers.extend((t, next(self._seq), c.id) for t in c.excluded.values())
            heapq.heapify(timers)
            self._wake_timers = timers
            self._wake_floor = len(timers)
