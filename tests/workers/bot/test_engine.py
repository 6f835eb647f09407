"""BotEngine decisions over the example knowledge base."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.bot import engine as engine_module
from workers.bot.engine import (
    DEFAULT_HANDOFF_THRESHOLD,
    PRIORITY_COMPLAINT,
    PRIORITY_LOW_CONFIDENCE,
    PRIORITY_REQUESTED,
    SKILL_AFTER_SALE,
    SKILL_LOGISTICS,
    SKILL_REFUNDS,
    BotDecision,
    BotEngine,
    BotStats,
    OrderInfo,
)
from workers.bot.knowledge import KnowledgeBase

from ._support import (
    CLOSED_NOW,
    LATEST,
    OPEN_NOW,
    SHOP,
    FakeOrders,
    example_kb,
    make_engine,
)


def ask(
    engine: BotEngine,
    text: str,
    *,
    conv: str = "c1",
    customer: str = "alice",
    now: datetime = OPEN_NOW,
) -> BotDecision:
    return engine.on_customer_message(SHOP, conv, customer, text, now)


# --------------------------------------------------------------------------- orders


def test_explicit_order_id_is_looked_up_and_its_status_shown() -> None:
    orders = FakeOrders()
    decision = ask(make_engine(orders), "where is my order 123?")
    assert decision.handoff is None
    assert decision.reply is not None
    assert "123" in decision.reply.text
    assert "shipped" in decision.reply.text  # English message, English status label
    assert decision.intent == "order_status"
    assert decision.order_id == "123"
    assert decision.language == "en"
    assert ("order", SHOP, "123") in orders.calls
    assert not any(call[0] == "latest_order" for call in orders.calls)


def test_logistics_question_without_id_uses_latest_order() -> None:
    orders = FakeOrders()
    decision = ask(make_engine(orders), "我的快递到哪了")
    assert decision.handoff is None
    assert decision.reply is not None
    text = decision.reply.text
    assert LATEST.order_id in text
    assert "顺丰速运" in text and "SF1234567890" in text and "1月4日" in text
    assert decision.intent == "shipping"
    assert decision.confidence >= DEFAULT_HANDOFF_THRESHOLD
    assert orders.calls == [("latest_order", SHOP, "alice")]


def test_chinese_status_label_and_amount_formatting() -> None:
    decision = ask(make_engine(), "订单123怎么样了")
    assert decision.reply is not None
    assert "已发货" in decision.reply.text
    assert "¥199.00" in decision.reply.text
    assert "碎花连衣裙" in decision.reply.text


def test_unknown_order_says_so_and_offers_a_human() -> None:
    engine = make_engine()
    decision = ask(engine, "我的订单999999到哪了")
    assert decision.handoff is None
    assert decision.reply is not None
    assert "999999" in decision.reply.text and "没有查到" in decision.reply.text
    assert decision.reply.quick_replies == ["转人工"]
    # Tapping the offered button is a handoff request.
    tap = ask(engine, decision.reply.quick_replies[0])
    assert tap.handoff is not None and tap.handoff.reason == "requested"


def test_unknown_order_in_english_offers_english_button() -> None:
    decision = ask(make_engine(), "where is my order 424242?")
    assert decision.reply is not None
    assert "couldn't find order 424242" in decision.reply.text
    assert decision.reply.quick_replies == ["Talk to a human"]
    tap = ask(make_engine(), "Talk to a human")
    assert tap.handoff is not None and tap.handoff.reason == "requested"


def test_customer_without_orders_is_asked_for_the_number_then_answered() -> None:
    orders = FakeOrders(latest={})
    engine = make_engine(orders)
    first = ask(engine, "我的快递到哪了", customer="alice")
    assert first.reply is not None and "订单号发给我" in first.reply.text
    assert first.handoff is None
    # The next message is just the id: the logistics question is answered for it.
    second = ask(engine, "123", customer="alice")
    assert second.handoff is None
    assert second.reply is not None
    assert "ZT998877" in second.reply.text
    assert second.order_id == "123"


def test_bare_order_id_at_start_answers_order_status() -> None:
    decision = ask(make_engine(), "订单号：240101000000000001")
    assert decision.handoff is None
    assert decision.intent == "order_status"
    assert decision.reply is not None and "运输中" in decision.reply.text


def test_order_mentioned_earlier_is_the_one_followed_up() -> None:
    engine = make_engine()
    ask(engine, "订单123怎么样了")
    decision = ask(engine, "我的快递到哪了")
    assert decision.order_id == "123"  # not the latest order
    assert decision.reply is not None and "ZT998877" in decision.reply.text


def test_order_not_shipped_yet_gets_pending_message_not_blanks() -> None:
    decision = ask(make_engine(), "订单555555的快递到哪了")
    assert decision.reply is not None
    text = decision.reply.text
    assert "555555" in text and "已付款，待发货" in text and "还没有物流信息" in text
    assert "运单号，" not in text  # the logistics template was not rendered with blanks


def test_someone_elses_order_is_not_disclosed() -> None:
    decision = ask(make_engine(), "where is my order 777777", customer="alice")
    assert decision.reply is not None
    assert "couldn't find order 777777" in decision.reply.text
    assert "YD1" not in decision.reply.text


# --------------------------------------------------------------------------- handoffs


def test_complaint_is_high_priority_after_sale() -> None:
    decision = ask(make_engine(), "我要投诉")
    assert decision.handoff is not None
    assert decision.handoff.reason == "complaint"
    assert decision.handoff.priority == PRIORITY_COMPLAINT == 9
    assert decision.handoff.skill == SKILL_AFTER_SALE  # documented: complaints go to after-sale
    assert decision.reply is not None and "人工客服" in decision.reply.text
    assert "投诉" in decision.handoff.note


def test_complaint_about_money_goes_to_refunds() -> None:
    decision = ask(make_engine(), "退款一直不到账，我要投诉你们")
    assert decision.handoff is not None
    assert decision.handoff.reason == "complaint"
    assert decision.handoff.skill == SKILL_REFUNDS


@pytest.mark.parametrize(
    "text",
    [
        "转人工",
        "人工",
        "人工客服",
        "找真人",
        "human",
        "agent please",
        "I want a real person",
        "can I talk to a human?",
        "叫你们店长来",
    ],
)
def test_explicit_request_hands_off(text: str) -> None:
    decision = ask(make_engine(), text)
    assert decision.handoff is not None
    assert decision.handoff.reason == "requested"
    assert decision.handoff.priority == PRIORITY_REQUESTED
    assert decision.reply is not None
    assert any(word in decision.reply.text for word in ("人工", "team", "agent"))


def test_requested_handoff_skill_follows_the_conversation() -> None:
    engine = make_engine()
    ask(engine, "我的快递到哪了")
    decision = ask(engine, "转人工")
    assert decision.handoff is not None and decision.handoff.skill == SKILL_LOGISTICS


@pytest.mark.parametrize(
    "text", ["asdkjh qwpeoi zxcmnb", "阿斯顿发噶士大夫", "今天天气不错啊", "is this human hair?"]
)
def test_gibberish_or_off_topic_hands_off_for_low_confidence(text: str) -> None:
    decision = ask(make_engine(), text)
    assert decision.handoff is not None
    assert decision.handoff.reason == "low_confidence"
    assert decision.handoff.priority == PRIORITY_LOW_CONFIDENCE
    assert decision.confidence < DEFAULT_HANDOFF_THRESHOLD
    assert decision.reply is not None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("你们就是骗子", "negative"),
        ("这衣服质量太差了", "negative"),
        ("this is a scam", "negative"),
        ("terrible service", "negative"),
        ("给你们差评", "complaint"),
        ("I will file a complaint", "complaint"),
        ("我要打12315", "complaint"),
    ],
)
def test_negative_and_complaint_wording(text: str, reason: str) -> None:
    decision = ask(make_engine(), text)
    assert decision.handoff is not None
    assert decision.handoff.reason == reason
    assert decision.handoff.priority >= 8


@pytest.mark.parametrize(
    "text", ["我要退款", "给我退钱", "I want a refund", "give me my money back"]
)
def test_refund_demand_goes_to_refunds(text: str) -> None:
    decision = ask(make_engine(), text)
    assert decision.handoff is not None
    assert decision.handoff.skill == SKILL_REFUNDS
    assert decision.handoff.priority >= 8
    assert decision.intent == "refund"


@pytest.mark.parametrize("text", ["退款多久到账", "how long does a refund take"])
def test_refund_process_question_is_answered_from_the_kb(text: str) -> None:
    decision = ask(make_engine(), text)
    assert decision.handoff is None
    assert decision.entry_id == "refund_time"
    assert decision.reply is not None and ("48" in decision.reply.text)


def test_refund_question_without_a_matching_entry_still_hands_off() -> None:
    kb = KnowledgeBase.from_yaml("""
entries:
  - {id: hi, intent: greeting, questions: [你好], answer: 您好}
""")
    decision = ask(make_engine(kb=kb), "退款多久到账")
    assert decision.handoff is not None and decision.handoff.skill == SKILL_REFUNDS


def test_lexicon_beats_keyword_rules() -> None:
    # "谢谢" is an exact keyword rule, "差评" a complaint: the complaint wins.
    decision = ask(make_engine(), "谢谢，差评")
    assert decision.handoff is not None and decision.handoff.reason == "complaint"


def test_bot_stays_quiet_after_handoff_but_escalates() -> None:
    engine = make_engine()
    first = ask(engine, "转人工")
    assert first.handoff is not None
    quiet = ask(engine, "在吗")
    assert quiet.reply is None and quiet.handoff is None
    again = ask(engine, "人工！")
    assert again.reply is None and again.handoff is None  # same priority: nothing new
    worse = ask(engine, "你们就是骗子")
    assert worse.reply is None
    assert worse.handoff is not None and worse.handoff.reason == "negative"
    assert worse.handoff.priority > first.handoff.priority
    engine.resume_bot(SHOP, "c1")
    back = ask(engine, "在吗")
    assert back.reply is not None and back.handoff is None


def test_handoff_outside_business_hours_says_when_humans_are_back() -> None:
    decision = ask(make_engine(), "转人工", now=CLOSED_NOW)
    assert decision.handoff is not None  # still queued
    assert decision.reply is not None
    assert "明天 10:00" in decision.reply.text  # Saturday opens at 10:00
    assert "请稍候" not in decision.reply.text


def test_complaint_outside_business_hours_apologises() -> None:
    decision = ask(make_engine(), "this is a scam", now=CLOSED_NOW)
    assert decision.reply is not None
    assert decision.reply.text.startswith("We're very sorry")
    assert "tomorrow at 10:00 (UTC+08:00)" in decision.reply.text


# --------------------------------------------------------------------------- answers


def test_keyword_rule_wins_over_fuzzy_match() -> None:
    # "可以发顺丰吗" is close to the carrier entry's questions, but the contains
    # rule on 顺丰 answers it.
    decision = ask(make_engine(), "能指定快递吗？可以发顺丰吗")
    assert decision.entry_id == "sf_express"
    assert decision.confidence == 1.0


def test_quick_reply_tap_follows_the_guided_flow() -> None:
    engine = make_engine()
    returns = ask(engine, "怎么退货")
    assert returns.reply is not None
    assert returns.reply.quick_replies == ["退款多久到账", "退货运费谁出"]
    tap = ask(engine, returns.reply.quick_replies[1])
    assert tap.entry_id == "return_shipping" and tap.confidence == 1.0


def test_reply_language_follows_the_customer() -> None:
    engine = make_engine()
    en = ask(engine, "can i return it")
    assert en.reply is not None and en.reply.text.startswith("Returns are accepted")
    assert en.reply.quick_replies == ["How long does a refund take", "Who pays return shipping"]
    zh = ask(engine, "可以退货吗")
    assert zh.reply is not None and zh.reply.text.startswith("支持7天无理由退换")


def test_emoji_only_message_is_ignored() -> None:
    decision = ask(make_engine(), "👍👍")
    assert decision.reply is None and decision.handoff is None and decision.intent is None


def test_unknown_shop_hands_off() -> None:
    engine = make_engine()
    decision = engine.on_customer_message("nope", "c1", "alice", "我的快递到哪了", OPEN_NOW)
    assert decision.handoff is not None and decision.handoff.reason == "low_confidence"
    assert decision.confidence == 0.0


def test_threshold_is_respected() -> None:
    text = "how soon do you ship"  # a paraphrase of ship_time, neither exact nor hopeless
    probe = ask(make_engine(threshold=0.0), text)
    assert probe.entry_id == "ship_time"
    assert 0.3 < probe.confidence < 1.0
    at = ask(make_engine(threshold=probe.confidence), text)
    above = ask(make_engine(threshold=min(1.0, probe.confidence + 0.01)), text)
    assert at.handoff is None and at.entry_id == "ship_time"
    assert above.handoff is not None and above.handoff.reason == "low_confidence"
    assert above.confidence == pytest.approx(probe.confidence)
    assert above.handoff.skill == "logistics"  # the low-confidence guess still picks the skill


def test_threshold_must_be_a_probability() -> None:
    with pytest.raises(ValueError, match="handoff_threshold"):
        make_engine(threshold=1.5)


# --------------------------------------------------------------------------- welcome / away


def test_welcome_has_quick_replies_and_is_sent_once() -> None:
    engine = make_engine()
    reply = engine.on_conversation_opened(SHOP, "c1", "alice", OPEN_NOW, customer_name="小爱")
    assert reply is not None
    assert reply.text.startswith("小爱您好，欢迎光临小鹿旗舰店")
    assert reply.quick_replies == ["查订单", "我的快递到哪了", "退换货", "尺码推荐", "转人工"]
    assert "非工作时间" not in reply.text
    assert engine.on_conversation_opened(SHOP, "c1", "alice", OPEN_NOW) is None  # reconnect


def test_welcome_quick_reply_taps_resolve() -> None:
    engine = make_engine()
    reply = engine.on_conversation_opened(SHOP, "c1", "alice", OPEN_NOW)
    assert reply is not None
    expected = ["order_status", "logistics", "returns", "size"]
    for label, entry_id in zip(reply.quick_replies, expected, strict=False):
        decision = ask(engine, label, conv=f"tap-{entry_id}")
        assert decision.entry_id == entry_id, label
    human = ask(engine, reply.quick_replies[-1], conv="tap-human")
    assert human.handoff is not None and human.handoff.reason == "requested"


def test_away_message_outside_business_hours() -> None:
    reply = make_engine().on_conversation_opened(SHOP, "c1", "alice", CLOSED_NOW)
    assert reply is not None
    assert reply.text.startswith("亲您好，欢迎光临小鹿旗舰店")
    assert "非工作时间" in reply.text and "明天 10:00" in reply.text
    assert reply.quick_replies  # self-service still offered


def test_business_hours_use_the_shop_timezone() -> None:
    # 02:00 UTC is 10:00 in Shanghai (open); 14:00 UTC is 22:00 (closed).
    engine = make_engine()
    morning = engine.on_conversation_opened(
        SHOP, "a", "alice", datetime(2025, 1, 3, 2, 0, tzinfo=UTC)
    )
    evening = engine.on_conversation_opened(
        SHOP, "b", "alice", datetime(2025, 1, 3, 14, 0, tzinfo=UTC)
    )
    assert morning is not None and "非工作时间" not in morning.text
    assert evening is not None and "非工作时间" in evening.text


def test_holiday_away_message_names_next_working_day() -> None:
    holiday = datetime(2025, 1, 1, 11, 0, tzinfo=UTC)  # Wed 19:00 in Shanghai, a holiday
    reply = make_engine().on_conversation_opened(SHOP, "c1", "alice", holiday)
    assert reply is not None and "明天 09:00" in reply.text


def test_no_business_hours_means_always_staffed() -> None:
    reply = make_engine(hours=False).on_conversation_opened(SHOP, "c1", "alice", CLOSED_NOW)
    assert reply is not None and "非工作时间" not in reply.text


def test_disabled_welcome_still_sends_away_message() -> None:
    kb = KnowledgeBase.from_yaml("""
shop: {name: 小店, welcome: ""}
entries:
  - {id: hi, intent: greeting, questions: [你好], answer: 您好}
""")
    assert make_engine(kb=kb).on_conversation_opened(SHOP, "c1", "alice", OPEN_NOW) is None
    away = make_engine(kb=kb).on_conversation_opened(SHOP, "c1", "alice", CLOSED_NOW)
    assert away is not None and away.text.startswith("现在是非工作时间")


def test_naive_datetimes_are_rejected() -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match="timezone-aware"):
        engine.on_conversation_opened(SHOP, "c1", "alice", datetime(2025, 1, 3, 10, 0))
    with pytest.raises(ValueError, match="timezone-aware"):
        engine.on_customer_message(SHOP, "c1", "alice", "hi", datetime(2025, 1, 3, 10, 0))


# --------------------------------------------------------------------------- stats


def test_deflection_rate_arithmetic() -> None:
    engine = make_engine()
    assert engine.stats(SHOP) == BotStats()
    assert engine.stats(SHOP).deflection_rate == 0.0

    # c1, c2, c3: answered by the bot and closed without a human.
    for conv in ("c1", "c2", "c3"):
        engine.on_conversation_opened(SHOP, conv, "alice", OPEN_NOW)
        ask(engine, "我的快递到哪了", conv=conv)
        engine.on_conversation_closed(SHOP, conv, had_human=False)
    # c4: handed off, an agent took it.
    ask(engine, "转人工", conv="c4")
    engine.on_conversation_closed(SHOP, "c4", had_human=True)
    # c5: complaint, customer left before an agent came.
    ask(engine, "我要投诉", conv="c5")
    engine.on_conversation_closed(SHOP, "c5", had_human=False)
    # c6: still open.
    ask(engine, "在吗", conv="c6")

    stats = engine.stats(SHOP)
    assert stats.conversations == 6
    assert stats.handed_off == 2
    assert stats.closed == 5
    assert stats.closed_without_human == 4
    assert stats.abandoned_after_handoff == 1
    assert stats.messages == 6
    assert stats.answered == 4
    assert stats.handoffs_by_reason == {"requested": 1, "complaint": 1}
    assert stats.deflection_rate == pytest.approx(4 / 5)
    assert engine.stats("other-shop") == BotStats()


def test_close_is_idempotent_and_reopen_starts_a_new_cycle() -> None:
    engine = make_engine()
    engine.on_conversation_opened(SHOP, "c1", "alice", OPEN_NOW)
    engine.on_conversation_closed(SHOP, "c1", had_human=False)
    engine.on_conversation_closed(SHOP, "c1", had_human=False)
    assert engine.stats(SHOP).closed == 1
    assert engine.on_conversation_opened(SHOP, "c1", "alice", OPEN_NOW) is not None  # re-welcomed
    engine.on_conversation_closed(SHOP, "c1", had_human=True)
    stats = engine.stats(SHOP)
    assert (stats.conversations, stats.closed, stats.closed_without_human) == (2, 2, 1)
    assert stats.deflection_rate == pytest.approx(0.5)


def test_several_handoffs_count_one_conversation() -> None:
    engine = make_engine()
    ask(engine, "转人工")
    ask(engine, "我要投诉")  # escalation
    stats = engine.stats(SHOP)
    assert stats.handed_off == 1
    assert stats.handoffs_by_reason == {"requested": 1, "complaint": 1}


def test_swapping_a_knowledge_base() -> None:
    engine = make_engine()
    engine.set_knowledge_base(
        SHOP,
        KnowledgeBase.from_yaml("""
keywords:
  - {keywords: [在吗], match: exact, answer: 新知识库在的}
"""),
    )
    decision = ask(engine, "在吗")
    assert decision.reply is not None and decision.reply.text == "新知识库在的"
    assert example_kb().resolve("在吗") is not None  # the old object is untouched


# --------------------------------------------------------------------------- invariants


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_any_text_gets_a_well_formed_decision(text: str) -> None:
    decision = ask(make_engine(), text)
    assert 0.0 <= decision.confidence <= 1.0
    if decision.handoff is not None:
        assert 0 <= decision.handoff.priority <= 9
        assert decision.handoff.skill
        assert decision.reply is not None and decision.reply.text  # the customer is told
    if decision.reply is not None:
        assert decision.reply.text.strip()
        assert "{" not in decision.reply.text  # no unfilled template variables


def test_decisions_and_orders_survive_msgspec_round_trips() -> None:
    decision = ask(make_engine(), "我要投诉")
    wire = msgspec.json.encode(decision)
    assert msgspec.json.decode(wire, type=BotDecision) == decision
    order_wire = msgspec.json.encode(LATEST)
    assert msgspec.json.decode(order_wire, type=OrderInfo) == LATEST


def test_tracked_conversations_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "MAX_TRACKED_CONVERSATIONS", 2)
    engine = make_engine()
    ask(engine, "转人工", conv="a")  # handed off, then evicted by b and c
    ask(engine, "在吗", conv="b")
    ask(engine, "在吗", conv="c")
    again = ask(engine, "在吗", conv="a")
    assert again.reply is not None and again.handoff is None  # context lost, bot answers
    assert engine.stats(SHOP).conversations == 4


@dataclass(frozen=True)
class _Line:
    title: str
    quantity: int = 1


@dataclass(frozen=True)
class _CrmStyleOrder:
    """Any struct with the OrderLike attributes works, e.g. with structured items."""

    order_id: str
    status: str
    carrier: str | None
    tracking_no: str | None
    eta: date | None
    amount_cents: int
    currency: str
    items: tuple[_Line, ...]
    customer: str | None


class _CrmStyleLookup:
    def __init__(self, order: _CrmStyleOrder) -> None:
        self._order = order

    def order(self, shop: str, order_id: str) -> _CrmStyleOrder | None:
        return self._order if order_id == self._order.order_id else None

    def latest_order(self, shop: str, customer: str) -> _CrmStyleOrder | None:
        return self._order if customer == self._order.customer else None


def test_structurally_typed_orders_and_item_lines() -> None:
    order = _CrmStyleOrder(
        "888888",
        "refunding",
        None,
        None,
        None,
        12345,
        "USD",
        (_Line("Knit cardigan", 2), _Line("Scarf")),
        "alice",
    )
    engine = BotEngine({SHOP: example_kb()}, _CrmStyleLookup(order))
    decision = ask(engine, "order status")
    assert decision.reply is not None
    assert decision.reply.text == (
        "Your order 888888 is refund in progress (Knit cardigan×2, Scarf, paid $123.45)."
    )
