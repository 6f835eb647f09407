"""Routing plugin logic: classify handed-off conversations and route them to agents.

Pure and deterministic (no I/O, no asyncio, time passed in as ``now``); the
plugin glue feeds events in and carries the returned actions out. See
``workers.routing.engine`` for the theory of operation.
"""

from .actions import (
    Action,
    AnyAction,
    Assign,
    AssignReason,
    Queued,
    QueuePosition,
    Rejected,
    RejectReason,
    Requeue,
    SlaBreach,
)
from .classify import Classification, classify, detect_language
from .engine import (
    Agent,
    AgentLoad,
    Dashboard,
    Placement,
    Router,
    RouterConfig,
    RoutingError,
    SkillQueue,
)

__all__ = [
    "Action",
    "Agent",
    "AgentLoad",
    "AnyAction",
    "Assign",
    "AssignReason",
    "Classification",
    "Dashboard",
    "Placement",
    "QueuePosition",
    "Queued",
    "RejectReason",
    "Rejected",
    "Requeue",
    "Router",
    "RouterConfig",
    "RoutingError",
    "SkillQueue",
    "SlaBreach",
    "classify",
    "detect_language",
]
