"""What the routing engine asks the outside world to do: plain data, no behaviour.

Every ``Router`` method that changes state returns a ``list[Action]``; the
plugin glue turns each into protocol requests (``UpdateConversation``, a system
message to the customer...). Actions are msgspec Structs tagged by ``"action"``
so they can also be logged or sent to supervisors as they are.
"""

from __future__ import annotations

import enum

from msgspec import Struct


class AssignReason(enum.StrEnum):
    NEW = "new"
    """Routed straight away when the bot handed off."""
    QUEUE = "queue"
    """Waited in the queue; an agent freed up or came online."""
    TRANSFER = "transfer"
    """An agent transferred it (to a colleague, or to a skill group)."""
    SLA_BREACH = "sla_breach"
    """The previous agent did not reply in time."""
    AGENT_OFFLINE = "agent_offline"
    """The previous agent went offline or was removed."""
    CAPACITY_REDUCED = "capacity_reduced"
    """The previous agent's ``max_chats`` was lowered below their load."""


class RejectReason(enum.StrEnum):
    QUEUE_FULL = "queue_full"
    """The shop's queue is at its hard bound ``max_queue_per_shop`` and no agent is
    free: the engine does not track it. Routing leaves it queued in the store, tells
    the customer the shop is busy and offers it again when it reconciles."""
    TOO_MANY_SHOPS = "too_many_shops"
    """This router already tracks ``max_shops`` shops."""
    NOT_ASSIGNED = "not_assigned"
    """Transfer: the conversation is not assigned to ``from_agent``."""
    UNKNOWN_AGENT = "unknown_agent"
    """Transfer: the target agent is not registered in this shop."""
    AGENT_UNAVAILABLE = "agent_unavailable"
    """Transfer: the target agent is away or offline."""
    AGENT_FULL = "agent_full"
    """Transfer: the target agent is at ``max_chats``."""


class Action(Struct, frozen=True, kw_only=True, tag_field="action"):
    """Base of every action. ``conv`` is the conversation, ``shop`` its shop."""

    conv: str
    shop: str


class Assign(Action, frozen=True, tag="assign"):
    """Give ``conv`` to ``agent`` (state assigned). ``previous_agent`` is the agent
    who had it last (transfer, SLA breach, agent offline), if any."""

    agent: str
    previous_agent: str | None
    reason: AssignReason
    priority: int
    note: str = ""
    """Transfer note for the receiving agent."""
    fallback: bool = False
    """True when ``agent`` lacks the skill or language: no qualified agent was
    available (see ``RouterConfig.fallback_after_seconds``)."""
    expect_agent: str | None = None
    """Where the conversation is as far as the engine has said: ``None`` queued, else
    assigned to this agent (a direct move from them). The update is conditional on it."""


class Queued(Action, frozen=True, tag="queued"):
    """``conv`` entered the queue (state queued) at ``position``."""

    position: int
    eta_seconds: int | None
    """Estimated wait; ``None`` when no qualified agent is online to estimate from."""
    priority: int
    overflow: bool = False
    """The shop's queue was at its ``queue_limit``: the customer is told the shop is
    busy and the bot keeps answering until an agent takes the chat."""


class QueuePosition(Action, frozen=True, tag="queue_position"):
    """A queued conversation's position changed (up or down)."""

    position: int
    eta_seconds: int | None


class Requeue(Action, frozen=True, tag="requeue"):
    """``conv`` was taken from ``previous_agent`` and put back in the queue (at the
    head: it was already being served). Replaces ``Queued`` for that conversation."""

    previous_agent: str
    reason: AssignReason
    """Why it left the agent: ``SLA_BREACH``, ``AGENT_OFFLINE``, ``TRANSFER`` or
    ``CAPACITY_REDUCED``."""
    position: int
    eta_seconds: int | None
    priority: int


class SlaBreach(Action, frozen=True, tag="sla_breach"):
    """``agent`` did not reply within the SLA; an ``Assign`` or ``Requeue`` follows."""

    agent: str
    waiting_seconds: float
    """How long the customer's oldest unanswered message has waited."""


class Rejected(Action, frozen=True, tag="rejected"):
    """The request was refused; nothing changed for ``conv``."""

    reason: RejectReason


AnyAction = Assign | Queued | QueuePosition | Requeue | SlaBreach | Rejected
"""Every concrete action (for ``msgspec`` decoding of logged actions)."""
