"""Word lists that override the knowledge base: requests for a human, complaints,
strongly negative wording, refund demands.

Chinese terms match as substrings, English ones on word boundaries (multi-word
terms allow any whitespace between words), both on :func:`matching.normalize`d
text. The lists err on the side of a human: a false positive costs an agent a
minute, a false negative leaves an angry customer talking to a bot.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .matching import normalize, term_pattern

__all__ = [
    "COMPLAINT_TERMS",
    "HUMAN_REQUEST_EXCEPTIONS",
    "HUMAN_REQUEST_TERMS",
    "NEGATIVE_TERMS",
    "REFUND_QUESTION_MARKERS",
    "REFUND_TERMS",
    "Signals",
    "scan",
]

HUMAN_REQUEST_TERMS: tuple[str, ...] = (
    "转人工",
    "人工客服",
    "人工服务",
    "人工",
    "真人",
    "活人",
    "找客服",
    "客服人员",
    "human",
    "agent",
    "real person",
    "live agent",
    "live person",
    "representative",
    "operator",
    "talk to someone",
    "speak to someone",
    "talk to a person",
    "speak to a person",
    "talk to a human",
    "speak to a human",
)
"""An explicit request for a person (reason ``requested``)."""

HUMAN_REQUEST_EXCEPTIONS: tuple[str, ...] = ("人工智能", "人工费", "human hair", "agent fee")
"""Removed before looking for :data:`HUMAN_REQUEST_TERMS`: product words, not requests
("human hair wig" is a best-selling AliExpress category)."""

COMPLAINT_TERMS: tuple[str, ...] = (
    "投诉",
    "差评",
    "举报",
    "12315",
    "消协",
    "消费者协会",
    "工商局",
    "市场监管",
    "维权",
    "曝光",
    "complaint",
    "complain",
    "bad review",
    "negative review",
    "negative feedback",
    "report you",
    "dispute",
)
"""Complaints and threats to the shop's rating (reason ``complaint``, highest priority)."""

NEGATIVE_TERMS: tuple[str, ...] = (
    "骗子",
    "骗人",
    "垃圾",
    "太差",
    "很差",
    "真差",
    "差劲",
    "坑人",
    "坑爹",
    "黑店",
    "假货",
    "欺诈",
    "恶心",
    "无语",
    "气死",
    "太过分",
    "什么破",
    "terrible",
    "awful",
    "horrible",
    "worst",
    "scam",
    "scammer",
    "fraud",
    "rip off",
    "ripoff",
    "rip-off",
    "disgusting",
    "useless",
    "unacceptable",
    "counterfeit",
    "ridiculous",
    "wtf",
)
"""Strongly negative wording (reason ``negative``)."""

REFUND_TERMS: tuple[str, ...] = (
    "退款",
    "退钱",
    "仅退款",
    "退货退款",
    "refund",
    "money back",
    "chargeback",
    "reimburse",
)
"""Money back: routed to the ``refunds`` skill (the bot cannot move money)."""

REFUND_QUESTION_MARKERS: tuple[str, ...] = (
    "多久",
    "几天",
    "多长时间",
    "什么时候",
    "怎么申请",
    "如何申请",
    "流程",
    "规则",
    "how long",
    "how do i",
    "how can i",
    "how to",
    "when will",
    "when do",
    "policy",
    "process",
)
"""A refund message with one of these is a question about the refund *process*
("退款多久到账"), which the knowledge base may answer (see the engine)."""


def _compile(terms: Sequence[str]) -> re.Pattern[str]:
    return re.compile("|".join(term_pattern(normalize(t)) for t in terms))


_HUMAN = _compile(HUMAN_REQUEST_TERMS)
_HUMAN_EXCEPTIONS = _compile(HUMAN_REQUEST_EXCEPTIONS)
_COMPLAINT = _compile(COMPLAINT_TERMS)
_NEGATIVE = _compile(NEGATIVE_TERMS)
_REFUND = _compile(REFUND_TERMS)
_REFUND_QUESTION = _compile(REFUND_QUESTION_MARKERS)


@dataclass(frozen=True, slots=True)
class Signals:
    """Lexicon hits in one message (the matched words, in order of appearance)."""

    human: tuple[str, ...] = ()
    complaint: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    refund: tuple[str, ...] = ()
    refund_question: bool = False

    @property
    def any(self) -> bool:
        return bool(self.human or self.complaint or self.negative or self.refund)


def _hits(pattern: re.Pattern[str], text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(m.group() for m in pattern.finditer(text)))


def scan(text: str) -> Signals:
    normalized = normalize(text)
    without_exceptions = _HUMAN_EXCEPTIONS.sub(" ", normalized)
    return Signals(
        human=_hits(_HUMAN, without_exceptions),
        complaint=_hits(_COMPLAINT, normalized),
        negative=_hits(_NEGATIVE, normalized),
        refund=_hits(_REFUND, normalized),
        refund_question=_REFUND_QUESTION.search(normalized) is not None,
    )
