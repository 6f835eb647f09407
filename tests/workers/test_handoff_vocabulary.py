"""One vocabulary for bot and routing: every handoff the bot can make, routing scores."""

from __future__ import annotations

import typing

import pytest

from protocol import Channel, Conversation, ConvKind, ConvState
from tests.workers.bot._support import OPEN_NOW, SHOP, make_engine
from workers.bot import engine as bot_engine
from workers.handoff import HANDOFF_PRIORITY, REFUND_PRIORITY, HandoffReason, handoff_tags
from workers.routing.plugin import classification_for

# One message per reason the bot's engine can give (it must reach every one).
MESSAGES = {
    "requested": "转人工",
    "complaint": "我要投诉你们",
    "negative": "你们就是骗子",
    "low_confidence": "qwxz plorb vint",
}


def test_the_vocabulary_covers_every_reason_the_bot_can_give() -> None:
    bot_reasons = set(typing.get_args(bot_engine.HandoffReason))
    assert bot_reasons == {r.value for r in HandoffReason}
    assert set(HANDOFF_PRIORITY) == set(HandoffReason)
    assert set(MESSAGES) == bot_reasons


@pytest.mark.parametrize("reason", sorted(MESSAGES))
def test_routing_scores_what_the_bot_emits(reason: str) -> None:
    """Drive the real bot engine to a handoff, put the tags and priority on a
    conversation exactly as the bot plugin does, and classify it as routing does."""
    decision = make_engine().on_customer_message(
        SHOP, f"c-{reason}", "alice", MESSAGES[reason], OPEN_NOW
    )
    handoff = decision.handoff
    assert handoff is not None and handoff.reason == reason
    conv = Conversation(
        id=f"c-{reason}",
        kind=ConvKind.DIRECT,
        shop=SHOP,
        state=ConvState.QUEUED,
        channel=Channel.TAOBAO,
        customer="alice",
        priority=handoff.priority,
        tags=handoff_tags(handoff.reason, handoff.skill, decision.intent),
    )
    routed = classification_for(conv, vip=False)
    assert routed.priority >= handoff.priority > 0
    assert routed.priority >= HANDOFF_PRIORITY[HandoffReason(reason)]
    assert routed.skill == handoff.skill
    # and without the bot's priority on the conversation, the tag alone carries it
    bare = classification_for(
        Conversation(id=conv.id, kind=conv.kind, shop=SHOP, state=conv.state, tags=conv.tags),
        vip=False,
    )
    assert bare.priority >= HANDOFF_PRIORITY[HandoffReason(reason)] > 0


def test_the_bot_cannot_emit_a_reason_routing_does_not_know() -> None:
    with pytest.raises(ValueError, match="furious"):
        handoff_tags("furious", "after-sale")


def test_the_bots_priorities_are_the_vocabularys() -> None:
    assert HANDOFF_PRIORITY[HandoffReason.COMPLAINT] == bot_engine.PRIORITY_COMPLAINT
    assert HANDOFF_PRIORITY[HandoffReason.NEGATIVE] == bot_engine.PRIORITY_NEGATIVE
    assert HANDOFF_PRIORITY[HandoffReason.REQUESTED] == bot_engine.PRIORITY_REQUESTED
    assert HANDOFF_PRIORITY[HandoffReason.LOW_CONFIDENCE] == bot_engine.PRIORITY_LOW_CONFIDENCE
    assert bot_engine.PRIORITY_REFUND == REFUND_PRIORITY
