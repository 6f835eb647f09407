"""Customer-service bot plugin: pure decision logic (see :mod:`.engine`).

Importing this package does not load jieba; the dictionary loads on the first
fuzzy match or on :func:`warm_up` (call it at worker start).
"""

from __future__ import annotations

from .engine import (
    BotDecision,
    BotEngine,
    BotReply,
    BotStats,
    Handoff,
    HandoffReason,
    OrderInfo,
    OrderLike,
    OrderLookup,
)
from .hours import BusinessHours
from .knowledge import KnowledgeBase, KnowledgeBaseError, load
from .matching import Matcher, extract_order_id
from .segment import warm_up

__all__ = [
    "BotDecision",
    "BotEngine",
    "BotReply",
    "BotStats",
    "BusinessHours",
    "Handoff",
    "HandoffReason",
    "KnowledgeBase",
    "KnowledgeBaseError",
    "Matcher",
    "OrderInfo",
    "OrderLike",
    "OrderLookup",
    "extract_order_id",
    "load",
    "warm_up",
]
