"""classify(): skill group, language and priority of a hand-off."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from workers.handoff import HANDOFF_PRIORITY, HandoffReason
from workers.routing import Classification, classify, detect_language
from workers.routing.classify import (
    COMPLAINT_WEIGHT,
    DEFAULT_SKILL,
    MAX_PRIORITY,
    NEGATIVE_SENTIMENT_THRESHOLD,
    NEGATIVE_WEIGHT,
    REFUND_WEIGHT,
    VIP_WEIGHT,
)


def cls(
    text: str = "",
    *,
    intent: str | None = None,
    channel: str = "taobao",
    vip: bool = False,
    sentiment: float | None = None,
    handoff_reason: str | None = None,
    requested_skill: str | None = None,
    floor: int = 0,
) -> Classification:
    return classify(
        intent=intent,
        channel=channel,
        text=text,
        vip=vip,
        sentiment=sentiment,
        handoff_reason=handoff_reason,
        requested_skill=requested_skill,
        floor=floor,
    )


# -- complaints ----------------------------------------------------------------


def test_complaint_with_bot_handoff_skill_lands_on_refunds_at_high_priority() -> None:
    c = cls("我要投诉", intent="complaint", requested_skill="refunds")
    assert c.skill == "refunds"
    assert c.priority == COMPLAINT_WEIGHT
    assert c.language == "lang:zh"
    assert c.signals == ("complaint",)


def test_complaint_words_alone_are_a_complaint() -> None:
    c = cls("我要投诉")
    assert c.skill == "after-sale"
    assert c.priority == COMPLAINT_WEIGHT


def test_complaint_about_a_refund_goes_to_refunds_with_both_weights() -> None:
    c = cls("我要投诉，退款一直没到账")
    assert c.skill == "refunds"
    assert c.priority == COMPLAINT_WEIGHT + REFUND_WEIGHT
    assert c.signals == ("complaint", "refund")


def test_complaint_about_an_order_goes_to_refunds() -> None:
    c = cls("订单有问题，我要投诉你们")
    assert c.skill == "refunds"
    assert c.priority == COMPLAINT_WEIGHT


def test_complaint_handoff_reason_counts() -> None:
    c = cls("hello", handoff_reason="complaint", channel="aliexpress")
    assert c.skill == "after-sale"
    # the bot's reason carries its priority from the shared vocabulary
    assert c.priority == HANDOFF_PRIORITY[HandoffReason.COMPLAINT]
    assert c.language == "lang:en"


def test_the_bots_negative_reason_scores_its_priority_and_vip_comes_on_top() -> None:
    assert cls("hello", handoff_reason="negative").priority == 8
    assert cls("hello", handoff_reason="requested", vip=True).priority == 5 + VIP_WEIGHT
    assert cls("hello", handoff_reason="negative", vip=True).priority == MAX_PRIORITY
    assert cls("hello", handoff_reason="requested").priority == 5
    assert cls("hello", handoff_reason="nonsense").priority == 0
    # the priority the bot put on the conversation is a floor
    assert cls("hello", handoff_reason=None, floor=7).priority == 7


def test_english_complaint_about_order() -> None:
    c = cls("I want to complain about my order", channel="aliexpress")
    assert (c.skill, c.priority) == ("refunds", COMPLAINT_WEIGHT)


# -- skill from intent, handoff reason and text ---------------------------------


def test_intents_map_to_skill_groups() -> None:
    assert cls(intent="refund").skill == "refunds"
    assert cls(intent="refund").priority == REFUND_WEIGHT
    assert cls(intent="order_status").skill == "logistics"
    assert cls(intent="Order-Status").skill == "logistics"
    assert cls(intent="shipping").skill == "logistics"
    assert cls(intent="product").skill == "pre-sale"
    assert cls(intent="size").skill == "pre-sale"
    assert cls(intent="no_such_intent").skill == DEFAULT_SKILL
    assert cls(intent="shipping").priority == 0


def test_handoff_reason_is_used_when_intent_is_unknown() -> None:
    c = cls(intent=None, handoff_reason="refund")
    assert (c.skill, c.priority) == ("refunds", REFUND_WEIGHT)


def test_text_keywords_when_the_bot_gives_no_intent() -> None:
    assert cls("我想退货").skill == "refunds"
    assert cls("快递到哪了").skill == "logistics"
    assert cls("这件有L码吗 尺码偏大吗").skill == "pre-sale"
    assert cls("where is my parcel", channel="aliexpress").skill == "logistics"
    assert cls("你好").skill == DEFAULT_SKILL


def test_latin_keywords_match_whole_words_only() -> None:
    # "border" contains "order", "sizeable" contains "size": neither counts.
    c = cls("I complain about the border", channel="web")
    assert c.skill == "after-sale"
    assert cls("a sizeable thing", channel="web").skill == DEFAULT_SKILL


def test_requested_skill_wins_over_everything_but_not_priority() -> None:
    c = cls("退款", intent="refund", requested_skill="vip-desk")
    assert c.skill == "vip-desk"
    assert c.priority == REFUND_WEIGHT


def test_blank_or_oversized_requested_skill_is_ignored() -> None:
    assert cls(intent="shipping", requested_skill="  ").skill == "logistics"
    assert cls(intent="shipping", requested_skill="x" * 65).skill == "logistics"


# -- priority ----------------------------------------------------------------------


def test_vip_and_negative_sentiment_add_up() -> None:
    assert cls(vip=True).priority == VIP_WEIGHT
    assert cls(sentiment=-0.9).priority == NEGATIVE_WEIGHT
    assert cls(vip=True, sentiment=-0.9).priority == VIP_WEIGHT + NEGATIVE_WEIGHT
    assert cls(handoff_reason="angry").priority == NEGATIVE_WEIGHT


def test_sentiment_threshold_is_strict_and_nan_is_ignored() -> None:
    assert cls(sentiment=NEGATIVE_SENTIMENT_THRESHOLD).priority == 0
    assert cls(sentiment=NEGATIVE_SENTIMENT_THRESHOLD - 0.01).priority == NEGATIVE_WEIGHT
    assert cls(sentiment=math.nan).priority == 0
    assert cls(sentiment=0.8).priority == 0


def test_priority_is_capped() -> None:
    c = cls("我要投诉，马上退款", vip=True, sentiment=-1.0)
    assert COMPLAINT_WEIGHT + REFUND_WEIGHT + NEGATIVE_WEIGHT + VIP_WEIGHT > MAX_PRIORITY
    assert c.priority == MAX_PRIORITY
    assert c.signals == ("complaint", "refund", "negative", "vip")


# -- language ----------------------------------------------------------------------


def test_language_from_script_then_channel() -> None:
    assert detect_language("你好", "aliexpress") == "lang:zh"
    assert detect_language("iPhone 15 Pro Max 有货吗", "web") == "lang:zh"
    assert detect_language("where is my order", "taobao") == "lang:en"
    assert detect_language("где мой заказ order", "aliexpress") == "lang:ru"
    assert detect_language("注文はどこですか", "web") == "lang:ja"
    assert detect_language("주문 어디", "web") == "lang:ko"
    assert detect_language("12345 👍", "aliexpress") == "lang:en"
    assert detect_language("12345 👍", "tmall") == "lang:zh"
    assert detect_language("12345", "web") is None
    assert detect_language("", "no-such-channel") is None


@given(
    text=st.text(max_size=300),
    intent=st.none() | st.sampled_from(["refund", "complaint", "shipping", "size", "x"]),
    channel=st.sampled_from(["taobao", "aliexpress", "web", "jd", "other"]),
    vip=st.booleans(),
    sentiment=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    reason=st.none() | st.text(max_size=20),
    requested=st.none() | st.text(max_size=80),
)
def test_classify_is_total_bounded_and_deterministic(
    text: str,
    intent: str | None,
    channel: str,
    vip: bool,
    sentiment: float | None,
    reason: str | None,
    requested: str | None,
) -> None:
    def run() -> Classification:
        return classify(
            intent=intent,
            channel=channel,
            text=text,
            vip=vip,
            sentiment=sentiment,
            handoff_reason=reason,
            requested_skill=requested,
        )

    c = run()
    assert 0 <= c.priority <= MAX_PRIORITY
    assert 1 <= len(c.skill) <= 64
    assert c.language is None or c.language.startswith("lang:")
    assert run() == c
