"""Classification of a handed-off conversation: which skill group, which language, how urgent.

Pure and deterministic: the same inputs always give the same ``Classification``.

Skill (first rule that applies wins)
------------------------------------
1. ``requested_skill``: the bot (or a guided flow) named the group explicitly
   (e.g. ``"refunds"``). It always wins, so a bot that knows better than these
   heuristics keeps control. Blank or over-long values are ignored.
2. Complaint (intent ``complaint``, handoff reason ``complaint``, or complaint
   words such as 投诉 / 12315 / "complain" in the text): ``"refunds"`` when the
   text also mentions a refund or an order (退款, 退货, 订单, "refund", "order"...),
   since complaints about money or an order end in a refund or compensation
   decision; otherwise ``"after-sale"``.
3. The bot's intent, through ``INTENT_SKILLS`` (refund -> refunds,
   order_status/shipping -> logistics, product/size -> pre-sale...).
4. The handoff reason, through the same table (a bot that hands off with reason
   ``"refund"`` but no intent).
5. Keywords in the text (refund, then logistics, then pre-sale words).
6. ``DEFAULT_SKILL`` (``"pre-sale"``, the general inbox of a shop).

Language
--------
The script of the text decides when it has letters: any kana -> ``lang:ja``,
any hangul -> ``lang:ko``, any Han character -> ``lang:zh`` (Chinese messages
routinely contain Latin product names, the reverse is rare); otherwise the
majority script among Cyrillic (``lang:ru``), Arabic (``lang:ar``), Thai
(``lang:th``) and Latin (``lang:en``: Latin-script languages are not told apart
without a model). Without letters (emoji, an order number), the channel
decides: AliExpress -> ``lang:en``, Chinese marketplaces -> ``lang:zh``, web and
app -> ``None`` (no language requirement).

Priority
--------
``BASE_PRIORITY`` plus ``COMPLAINT_WEIGHT`` (complaint), ``REFUND_WEIGHT``
(refund signal in the intent, handoff reason or text) and ``NEGATIVE_WEIGHT``
(sentiment below ``NEGATIVE_SENTIMENT_THRESHOLD``, or handoff reason
``negative``/``angry``/``negative_sentiment``), raised to at least the
handoff reason's priority in the vocabulary shared with the bot
(``workers.handoff.HANDOFF_PRIORITY``: ``handoff:negative`` is 8) and to the
``floor`` the caller passes (the priority the bot set on the conversation);
then ``VIP_WEIGHT``, capped at ``MAX_PRIORITY``. ``requested_skill`` changes the
skill only, never the priority.

Keyword matching is deliberately simple (substrings for CJK, whole words for
Latin script, no negation handling): the bot's intent is the primary signal and
the text a fallback. Only the first ``MAX_CLASSIFY_CHARS`` characters are read.
"""

from __future__ import annotations

import math
import re
from typing import Final

from msgspec import Struct

from protocol import Channel

from ..handoff import HandoffReason, handoff_priority

# -- skill groups --------------------------------------------------------------

SKILL_PRE_SALE: Final = "pre-sale"
SKILL_AFTER_SALE: Final = "after-sale"
SKILL_REFUNDS: Final = "refunds"
SKILL_LOGISTICS: Final = "logistics"
DEFAULT_SKILL: Final = SKILL_PRE_SALE
"""Skill for conversations nothing else classifies (the shop's general inbox)."""

MAX_SKILL_CHARS: Final = 64
"""Longest skill name (``requested_skill`` longer than this is ignored)."""

# -- languages (skills too: an agent speaking English has skill "lang:en") ---

LANG_PREFIX: Final = "lang:"
LANG_ZH: Final = "lang:zh"
LANG_EN: Final = "lang:en"
LANG_JA: Final = "lang:ja"
LANG_KO: Final = "lang:ko"
LANG_RU: Final = "lang:ru"
LANG_AR: Final = "lang:ar"
LANG_TH: Final = "lang:th"

CHANNEL_LANGUAGES: Final[dict[str, str | None]] = {
    Channel.ALIEXPRESS: LANG_EN,
    Channel.TAOBAO: LANG_ZH,
    Channel.TMALL: LANG_ZH,
    Channel.ALIBABA_1688: LANG_ZH,
    Channel.JD: LANG_ZH,
    Channel.WEB: None,
    Channel.APP: None,
}
"""Language assumed when the text has no letters. Unknown channels: ``None``."""

# -- priority weights ----------------------------------------------------------

BASE_PRIORITY: Final = 0
COMPLAINT_WEIGHT: Final = 5
REFUND_WEIGHT: Final = 4
NEGATIVE_WEIGHT: Final = 3
VIP_WEIGHT: Final = 2
MAX_PRIORITY: Final = 9
MIN_PRIORITY: Final = 0
NEGATIVE_SENTIMENT_THRESHOLD: Final = -0.3
"""Sentiment is in [-1, 1]; strictly below this counts as negative."""

MAX_CLASSIFY_CHARS: Final = 2000
"""Only this many leading characters of the text are examined."""

# -- vocabulary ----------------------------------------------------------------

INTENT_SKILLS: Final[dict[str, str]] = {
    "refund": SKILL_REFUNDS,
    "refund_request": SKILL_REFUNDS,
    "return": SKILL_REFUNDS,
    "return_request": SKILL_REFUNDS,
    "chargeback": SKILL_REFUNDS,
    "complaint": SKILL_AFTER_SALE,
    "after_sale": SKILL_AFTER_SALE,
    "aftersale": SKILL_AFTER_SALE,
    "warranty": SKILL_AFTER_SALE,
    "repair": SKILL_AFTER_SALE,
    "exchange": SKILL_AFTER_SALE,
    "invoice": SKILL_AFTER_SALE,
    "order_status": SKILL_LOGISTICS,
    "shipping": SKILL_LOGISTICS,
    "delivery": SKILL_LOGISTICS,
    "logistics": SKILL_LOGISTICS,
    "tracking": SKILL_LOGISTICS,
    "address_change": SKILL_LOGISTICS,
    "product": SKILL_PRE_SALE,
    "product_question": SKILL_PRE_SALE,
    "product_info": SKILL_PRE_SALE,
    "size": SKILL_PRE_SALE,
    "size_question": SKILL_PRE_SALE,
    "stock": SKILL_PRE_SALE,
    "price": SKILL_PRE_SALE,
    "discount": SKILL_PRE_SALE,
    "coupon": SKILL_PRE_SALE,
    "pre_sale": SKILL_PRE_SALE,
    "presale": SKILL_PRE_SALE,
}
"""Normalised intent (lower case, ``-`` and spaces as ``_``) -> skill group."""

COMPLAINT_INTENTS: Final = frozenset({"complaint", "complain"})
REFUND_INTENTS: Final = frozenset(
    name for name, skill in INTENT_SKILLS.items() if skill == SKILL_REFUNDS
)
NEGATIVE_HANDOFF_REASONS: Final = frozenset(
    {HandoffReason.NEGATIVE.value, "angry", "negative_sentiment", "abusive"}
)


class _Words:
    """A keyword list: CJK entries match as substrings, Latin ones as whole words."""

    def __init__(self, cjk: tuple[str, ...], latin: tuple[str, ...]) -> None:
        self.cjk = cjk
        self.latin = re.compile(
            r"\b(?:" + "|".join(re.escape(w) for w in latin) + r")\b", re.IGNORECASE
        )

    def found_in(self, text: str) -> bool:
        return any(w in text for w in self.cjk) or self.latin.search(text) is not None


COMPLAINT_WORDS: Final = _Words(
    ("投诉", "举报", "12315", "消协", "工商", "差评", "维权"),
    ("complain", "complaint", "complaints", "complaining", "scam", "fraud"),
)
REFUND_WORDS: Final = _Words(
    ("退款", "退货", "退钱", "返款", "退回", "仅退款"),
    ("refund", "refunds", "refunded", "return", "returns", "money back", "chargeback"),
)
ORDER_WORDS: Final = _Words(
    ("订单", "单号", "下单", "买的", "购买"),
    ("order", "orders", "purchase", "bought"),
)
LOGISTICS_WORDS: Final = _Words(
    ("物流", "快递", "发货", "到货", "送达", "包裹", "运单", "配送"),
    ("shipping", "shipped", "delivery", "delivered", "tracking", "package", "parcel"),
)
PRE_SALE_WORDS: Final = _Words(
    ("尺码", "尺寸", "有货", "库存", "价格", "优惠", "多少钱", "颜色", "材质"),
    ("size", "stock", "price", "discount", "coupon", "colour", "color", "material"),
)


class Classification(Struct, frozen=True, kw_only=True):
    """Where a conversation should go and how urgently."""

    skill: str
    """Skill group an agent must have (``"refunds"``, ``"pre-sale"``...)."""
    priority: int
    """0 .. 9, higher is served first."""
    language: str | None = None
    """``"lang:xx"`` the agent must speak, or ``None`` for no requirement."""
    signals: tuple[str, ...] = ()
    """Why the priority is what it is (``"complaint"``, ``"vip"``...), for supervisors."""


def _norm(value: str | None) -> str:
    if not value:
        return ""
    return value.strip().lower().replace("-", "_").replace(" ", "_")


def _valid_skill(skill: str | None) -> str | None:
    if skill is None:
        return None
    skill = skill.strip()
    if not skill or len(skill) > MAX_SKILL_CHARS or not skill.isprintable():
        return None
    return skill


def detect_language(text: str, channel: str) -> str | None:
    """The ``lang:`` skill for ``text`` (its script), else the channel's default."""
    counts = {LANG_JA: 0, LANG_KO: 0, LANG_ZH: 0, LANG_RU: 0, LANG_AR: 0, LANG_TH: 0, LANG_EN: 0}
    for ch in text[:MAX_CLASSIFY_CHARS]:
        o = ord(ch)
        if 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9F:
            counts[LANG_JA] += 1
        elif 0xAC00 <= o <= 0xD7AF or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F:
            counts[LANG_KO] += 1
        elif (
            0x4E00 <= o <= 0x9FFF
            or 0x3400 <= o <= 0x4DBF
            or 0xF900 <= o <= 0xFAFF
            or 0x20000 <= o <= 0x2FA1F
        ):
            counts[LANG_ZH] += 1
        elif 0x0400 <= o <= 0x04FF:
            counts[LANG_RU] += 1
        elif 0x0600 <= o <= 0x06FF:
            counts[LANG_AR] += 1
        elif 0x0E00 <= o <= 0x0E7F:
            counts[LANG_TH] += 1
        elif ch.isalpha() and o <= 0x024F:
            counts[LANG_EN] += 1
    for cjk in (LANG_JA, LANG_KO, LANG_ZH):
        if counts[cjk]:
            return cjk
    best = max((LANG_RU, LANG_AR, LANG_TH, LANG_EN), key=lambda lang: counts[lang])
    if counts[best]:
        return best
    return CHANNEL_LANGUAGES.get(channel)


def classify(
    *,
    intent: str | None,
    channel: str,
    text: str,
    vip: bool,
    sentiment: float | None,
    handoff_reason: str | None,
    requested_skill: str | None,
    floor: int = 0,
) -> Classification:
    """Skill group, priority and language for a conversation the bot hands off.

    See the module docstring for the rules; they are applied in that order.
    """
    text = text[:MAX_CLASSIFY_CHARS]
    intent_n = _norm(intent)
    reason_n = _norm(handoff_reason)

    complaint = (
        intent_n in COMPLAINT_INTENTS
        or reason_n in COMPLAINT_INTENTS
        or COMPLAINT_WORDS.found_in(text)
    )
    refund_words = REFUND_WORDS.found_in(text)
    refund = intent_n in REFUND_INTENTS or reason_n in REFUND_INTENTS or refund_words
    negative = reason_n in NEGATIVE_HANDOFF_REASONS or (
        sentiment is not None
        and math.isfinite(sentiment)
        and sentiment < NEGATIVE_SENTIMENT_THRESHOLD
    )

    skill = _valid_skill(requested_skill)
    if skill is None and complaint:
        skill = SKILL_REFUNDS if (refund or ORDER_WORDS.found_in(text)) else SKILL_AFTER_SALE
    if skill is None:
        skill = INTENT_SKILLS.get(intent_n) or INTENT_SKILLS.get(reason_n)
    if skill is None:
        if refund_words:
            skill = SKILL_REFUNDS
        elif LOGISTICS_WORDS.found_in(text):
            skill = SKILL_LOGISTICS
        elif PRE_SALE_WORDS.found_in(text):
            skill = SKILL_PRE_SALE
        else:
            skill = DEFAULT_SKILL

    priority = BASE_PRIORITY
    signals: list[str] = []
    for present, weight, name in (
        (complaint, COMPLAINT_WEIGHT, "complaint"),
        (refund, REFUND_WEIGHT, "refund"),
        (negative, NEGATIVE_WEIGHT, "negative"),
    ):
        if present:
            priority += weight
            signals.append(name)
    priority = max(priority, handoff_priority(reason_n), floor)
    if vip:
        priority += VIP_WEIGHT
        signals.append("vip")
    priority = max(MIN_PRIORITY, min(MAX_PRIORITY, priority))

    return Classification(
        skill=skill,
        priority=priority,
        language=detect_language(text, channel),
        signals=tuple(signals),
    )
