"""The handoff vocabulary shared by the bot and routing: one place for both sides.

The bot hands a conversation to humans with a *reason*; routing orders the
queue by *priority*. Both import this module, so a reason the bot can give is
a reason routing scores (``tests/workers/test_handoff_vocabulary.py`` drives
the bot to every reason and checks routing's score). The tags carry the
handoff on the conversation itself, so a routing instance that starts later
reads them from the store:

* ``handoff:<reason>``, ``skill:<group>``, ``intent:<intent>`` — set by the bot;
* ``overflow`` — set by routing while the chat waits beyond the shop's queue
  limit: the bot keeps answering it (see docs/PLUGINS.md, "Routing");
* ``requeued`` — set by routing when it takes a chat back from an agent
  (offline past the grace period, SLA missed): it is served before new chats.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Final


class HandoffReason(enum.StrEnum):
    REQUESTED = "requested"
    """The customer asked for a person."""
    LOW_CONFIDENCE = "low_confidence"
    """The bot could not answer."""
    COMPLAINT = "complaint"
    """A complaint (投诉, 差评, 12315) or a refund demand."""
    NEGATIVE = "negative"
    """Strongly negative wording (骗子, scam)."""


HANDOFF_PRIORITY: Final[Mapping[HandoffReason, int]] = {
    HandoffReason.COMPLAINT: 9,  # threatens the shop's rating: first in the queue
    HandoffReason.NEGATIVE: 8,
    HandoffReason.REQUESTED: 5,
    HandoffReason.LOW_CONFIDENCE: 3,
}
"""Queue priority (0..9, higher first) of each reason."""

REFUND_PRIORITY: Final = 8
"""A refund demand: the bot files it as a ``complaint`` with intent ``refund`` at
this priority (money involved, no threat to the rating yet)."""

TAG_SKILL: Final = "skill:"
TAG_INTENT: Final = "intent:"
TAG_HANDOFF: Final = "handoff:"
TAG_OVERFLOW: Final = "overflow"
TAG_REQUEUED: Final = "requeued"


def handoff_tags(reason: str, skill: str, intent: str | None = None) -> list[str]:
    """The tags the bot puts on a conversation it hands off. An unknown reason is
    a programming error (``ValueError``): routing would not score it."""
    tags = [f"{TAG_SKILL}{skill}", f"{TAG_HANDOFF}{HandoffReason(reason).value}"]
    if intent:
        tags.append(f"{TAG_INTENT}{intent}")
    return tags


def tag_value(tags: Iterable[str], prefix: str) -> str | None:
    """The value of the first tag starting with ``prefix`` (``skill:`` ...), if any."""
    for tag in tags:
        if tag.startswith(prefix):
            return tag[len(prefix) :]
    return None


def handoff_priority(reason: str | None) -> int:
    """The priority of a handoff reason; 0 for none or one this version does not know."""
    try:
        return HANDOFF_PRIORITY[HandoffReason(reason)] if reason else 0
    except ValueError:
        return 0
