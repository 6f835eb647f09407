"""Handoff lexicons."""

from __future__ import annotations

import pytest

from workers.bot.lexicon import scan
from workers.bot.messages import DEFAULT_MESSAGES


@pytest.mark.parametrize(
    "text",
    [
        "转人工",
        "人工",
        "我要人工客服",
        "有没有真人",
        "HUMAN",
        "agent pls",
        "real person please",
        "I want to speak to a human",
        "can I talk to someone",
    ],
)
def test_human_requests(text: str) -> None:
    assert scan(text).human


@pytest.mark.parametrize(
    "text",
    [
        "is this human hair?",
        "人工智能音箱",
        "reagent",
        "management",
        "在吗",
        "where is my parcel",
    ],
)
def test_not_human_requests(text: str) -> None:
    assert not scan(text).human


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("我要投诉", "complaint"),
        ("差评！", "complaint"),
        ("打12315", "complaint"),
        ("I'll open a dispute", "complaint"),
        ("complaint", "complaint"),
        ("骗子", "negative"),
        ("垃圾东西", "negative"),
        ("质量太差", "negative"),
        ("Terrible!!", "negative"),
        ("what a SCAM", "negative"),
        ("rip-off", "negative"),
        ("退款", "refund"),
        ("给我退钱", "refund"),
        ("refund me", "refund"),
        ("I want my money back", "refund"),
        ("refunds", "refund"),
    ],
)
def test_lexicon_hits(text: str, field: str) -> None:
    signals = scan(text)
    assert getattr(signals, field), signals
    assert signals.any


def test_clean_message_has_no_signals() -> None:
    signals = scan("你好，我的快递到哪了？")
    assert not signals.any
    assert not signals.refund_question


@pytest.mark.parametrize(
    ("text", "question"),
    [
        ("退款多久到账", True),
        ("how long does a refund take", True),
        ("我要退款", False),
        ("refund now", False),
    ],
)
def test_refund_question_marker(text: str, question: bool) -> None:
    assert scan(text).refund_question is question


def test_hits_are_reported_once_in_order() -> None:
    assert scan("差评差评，我要投诉").complaint == ("差评", "投诉")


def test_default_human_option_labels_are_requests() -> None:
    for label in DEFAULT_MESSAGES["human_option"].values():
        assert scan(label).human, label
