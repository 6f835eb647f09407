"""The customer-service bot: pure decision logic, no I/O, no asyncio.

Theory of operation
===================

The worker glue calls three hooks per conversation and forwards the decisions:

* :meth:`BotEngine.on_conversation_opened` -> an optional :class:`BotReply`:
  the shop's welcome with its quick replies (guided flows) and, outside the
  shop's business hours, an away message saying when humans are back
  (``明天 09:00``). Once per conversation until it is closed.
* :meth:`BotEngine.on_customer_message` -> a :class:`BotDecision`: a reply to
  send, a :class:`Handoff` to route the conversation to a human queue, or both
  (the reply then tells the customer a human is coming).
* :meth:`BotEngine.on_conversation_closed` -> feeds :meth:`BotEngine.stats`.

A customer message goes through these steps, first hit wins:

1. **Already with humans.** After a handoff the bot stays quiet (reply
   ``None``); it only re-emits a handoff when a later message raises the
   priority (a complaint after "转人工"), so the glue can bump the queue.
   :meth:`BotEngine.resume_bot` hands the conversation back.
2. **Lexicon** (:mod:`.lexicon`), evaluated on every message before the
   knowledge base so no keyword rule can swallow an angry customer:

   ======================= ============== ======== ==============================
   hit                     reason         priority skill
   ======================= ============== ======== ==============================
   complaint (投诉, 差评)  complaint      9        after-sale (refunds if the
                                                   message also asks for money)
   negative (骗子, scam)   negative       8        after-sale (idem)
   refund (退款, refund)   complaint      8        refunds
   human (转人工, agent)   requested      5        from the message's or the last
                                                   answered intent, else pre-sale
   ======================= ============== ======== ==============================

   The highest priority wins. A refund demand has no reason of its own (the
   four reasons are the contract with the glue): it is filed as a
   ``complaint`` with intent ``refund``, priority 8, skill ``refunds``. "我要投诉" is therefore a ``complaint`` at priority
   9 for the ``after-sale`` skill. Exception: a refund *process* question
   ("退款多久到账", :data:`.lexicon.REFUND_QUESTION_MARKERS`) without complaint
   or negative words is answered from the knowledge base when an entry with a
   :data:`REFUND_FAQ_INTENTS` intent matches with at least
   ``handoff_threshold`` confidence; otherwise it is handed off too. The shop's
   own "talk to a human" quick-reply label and knowledge-base entries with the
   intent :data:`HUMAN_INTENT` also count as requests.
3. **Knowledge base** (:meth:`.knowledge.KnowledgeBase.resolve`): keyword rules
   (exact, then contains) and quick-reply aliases answer with confidence 1.0;
   otherwise the fuzzy matcher's best entry and confidence
   (:mod:`.matching` explains the score). Below ``handoff_threshold``
   (default :data:`DEFAULT_HANDOFF_THRESHOLD`) -> ``low_confidence`` handoff,
   priority 3, skill guessed from the best entry's intent if its confidence
   is at least :data:`SKILL_HINT_MIN_CONFIDENCE`.
4. **Answer.** The template is filled in the customer's language (detected
   per message: any Chinese character -> ``zh``, Latin letters -> ``en``,
   else the previous message's or the shop's). If the answer uses order
   variables, the order is looked up: an id in the message (``订单123``,
   ``order 123``, ``#123``, or 6+ digits), else the order this conversation
   already talked about, else the customer's latest order. Orders of another
   customer (``OrderInfo.customer`` set and different) count as unknown, so
   order ids cannot be used to probe other people's parcels. An unknown order
   gets "no such order" plus a "转人工" quick reply; an order without the
   values the answer needs (not shipped: no carrier) gets ``order_pending``.
   A message that is little more than an order id ("订单号：123456", or "123"
   right after the bot asked for the number) continues the order question the
   conversation was on, or answers the :data:`ORDER_STATUS_INTENT` entry.

Messages with no words at all (emoji, punctuation) get an empty decision.

Handoffs outside business hours still happen (the queue is the record), but
the reply says when humans are back instead of "please hold on".

Statistics per shop: a conversation is *handled* once per open..close cycle;
*handed off* once however many handoffs; ``deflection_rate`` =
closed-without-human / closed (``had_human`` as reported by the glue).

The engine keeps a little state per open conversation (language, last intent,
order talked about, handoff), bounded by :data:`MAX_TRACKED_CONVERSATIONS`
(least recently used evicted). It is not thread-safe: one engine per worker
thread.
"""

from __future__ import annotations

import re
import unicodedata
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal, Protocol

import msgspec

from .hours import BusinessHours, describe_back_at, require_aware
from .knowledge import KnowledgeBase, Resolution
from .lexicon import Signals, scan
from .matching import (
    SUPPORTED_LANGUAGES,
    Language,
    char_view,
    detect_language,
    find_order_id,
    normalize,
)
from .messages import DEFAULT_MESSAGES
from .templates import ORDER_VARIABLES, render, template_fields

__all__ = [
    "DEFAULT_HANDOFF_THRESHOLD",
    "DEFAULT_SKILL",
    "HUMAN_INTENT",
    "INTENT_SKILLS",
    "MAX_TRACKED_CONVERSATIONS",
    "ORDER_ID_ONLY_MAX_EXTRA_CHARS",
    "ORDER_STATUS_INTENT",
    "ORDER_STATUS_LABELS",
    "PRIORITY_COMPLAINT",
    "PRIORITY_LOW_CONFIDENCE",
    "PRIORITY_NEGATIVE",
    "PRIORITY_REFUND",
    "PRIORITY_REQUESTED",
    "REFUND_FAQ_INTENTS",
    "SKILL_AFTER_SALE",
    "SKILL_HINT_MIN_CONFIDENCE",
    "SKILL_LOGISTICS",
    "SKILL_PRE_SALE",
    "SKILL_REFUNDS",
    "BotDecision",
    "BotEngine",
    "BotReply",
    "BotStats",
    "Handoff",
    "HandoffReason",
    "OrderInfo",
    "OrderItemLike",
    "OrderLike",
    "OrderLookup",
]

# --------------------------------------------------------------------------- constants

DEFAULT_HANDOFF_THRESHOLD = 0.6
"""Below this match confidence the bot hands off instead of guessing. At 0.6 a
paraphrase sharing the key words ("快递到哪了呀" vs "我的快递到哪了": 0.9) is
answered; a message sharing only a generic word with the best variant is not."""
SKILL_HINT_MIN_CONFIDENCE = 0.3
"""A low-confidence match still picks the handoff skill if at least this sure."""

PRIORITY_COMPLAINT = 9
"""投诉/差评/12315: threatens the shop's rating (DSR); first in the queue."""
PRIORITY_NEGATIVE = 8
"""Angry wording (骗子, scam, terrible)."""
PRIORITY_REFUND = 8
"""Money involved; the bot cannot act."""
PRIORITY_REQUESTED = 5
"""The customer asked for a person."""
PRIORITY_LOW_CONFIDENCE = 3
"""The bot did not understand; the customer is not (yet) upset."""

SKILL_AFTER_SALE = "after-sale"
SKILL_REFUNDS = "refunds"
SKILL_PRE_SALE = "pre-sale"
SKILL_LOGISTICS = "logistics"
DEFAULT_SKILL = SKILL_PRE_SALE
"""When nothing hints at a topic: most unclear chats on Taobao-style shops are
pre-purchase questions (stock, price, product details)."""

INTENT_SKILLS: Mapping[str, str] = {
    "order_status": SKILL_LOGISTICS,
    "shipping": SKILL_LOGISTICS,
    "logistics": SKILL_LOGISTICS,
    "delivery": SKILL_LOGISTICS,
    "address": SKILL_LOGISTICS,
    "returns": SKILL_AFTER_SALE,
    "exchange": SKILL_AFTER_SALE,
    "warranty": SKILL_AFTER_SALE,
    "quality": SKILL_AFTER_SALE,
    "invoice": SKILL_AFTER_SALE,
    "refund": SKILL_REFUNDS,
    "size": SKILL_PRE_SALE,
    "product": SKILL_PRE_SALE,
    "stock": SKILL_PRE_SALE,
    "price": SKILL_PRE_SALE,
    "coupon": SKILL_PRE_SALE,
    "promotion": SKILL_PRE_SALE,
    "greeting": SKILL_PRE_SALE,
}
"""Knowledge-base intent -> agent skill group for handoffs."""

ORDER_STATUS_INTENT = "order_status"
"""When a message is little more than an order id and the conversation was not
already about an order, the first entry with this intent (that uses order
variables) answers it."""
ORDER_ID_ONLY_MAX_EXTRA_CHARS = 4
"""A message is "just an order id" if, without the id and words like 订单号 /
order number, at most this many characters remain."""

HUMAN_INTENT = "human"
"""A knowledge-base entry with this intent, when matched, is a handoff request."""
REFUND_FAQ_INTENTS = frozenset({"refund", "returns"})
"""Entries that may answer refund *process* questions instead of a handoff."""

MAX_TRACKED_CONVERSATIONS = 100_000
"""Open conversations remembered (LRU); evicted ones just lose their context."""
RECENTLY_CLOSED_MEMORY = 10_000
"""Closed conversation ids remembered so a repeated close is not counted twice."""

ORDER_STATUS_LABELS: Mapping[str, Mapping[Language, str]] = {
    "pending_payment": {"zh": "待付款", "en": "awaiting payment"},
    "paid": {"zh": "已付款，待发货", "en": "paid, awaiting shipment"},
    "processing": {"zh": "备货中", "en": "being prepared"},
    "shipped": {"zh": "已发货", "en": "shipped"},
    "in_transit": {"zh": "运输中", "en": "in transit"},
    "out_for_delivery": {"zh": "派送中", "en": "out for delivery"},
    "delivered": {"zh": "已签收", "en": "delivered"},
    "completed": {"zh": "交易成功", "en": "completed"},
    "cancelled": {"zh": "已取消", "en": "cancelled"},
    "refunding": {"zh": "退款中", "en": "refund in progress"},
    "refunded": {"zh": "已退款", "en": "refunded"},
}
"""Display text for status codes; any other status is shown as given."""

_CURRENCY_SYMBOLS: Mapping[str, str] = {
    "CNY": "¥",
    "USD": "$",
    "EUR": "€",
    "GBP": "£",
    "JPY": "JP¥",
    "HKD": "HK$",
    "RUB": "₽",
}
_CUSTOMER_FALLBACK: Mapping[Language, str] = {"zh": "亲", "en": "there"}
_LONE_ID_RE = re.compile(r"#?\s*(?P<id>[A-Za-z0-9](?:[A-Za-z0-9-]{1,38}[A-Za-z0-9]))")
_ORDER_FILLER_RE = re.compile(
    r"订单编号|订单号码|订单号|订单|单号|是|为|我的|\b(?:my|order|number|no|id|is|the)\b"
)
_EN_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

HandoffReason = Literal["requested", "low_confidence", "complaint", "negative"]


# --------------------------------------------------------------------------- data types


class OrderInfo(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    status: str
    """A code from :data:`ORDER_STATUS_LABELS` (shown localised) or display text."""
    carrier: str | None = None
    tracking_no: str | None = None
    eta: date | None = None
    amount_cents: int = 0
    currency: str = "CNY"
    items: tuple[str, ...] = ()
    customer: str | None = None
    """Owner. When set, the bot refuses to discuss the order with anyone else;
    lookups should always set it."""


class OrderItemLike(Protocol):
    """A structured order line (e.g. the CRM's ``OrderItem``)."""

    @property
    def title(self) -> str: ...

    @property
    def quantity(self) -> int: ...


class OrderLike(Protocol):
    """What the engine reads from an order. :class:`OrderInfo` is one; so is any
    struct with these attributes (the CRM's ``OrderInfo``, whose items are
    structured), so a CRM store can be passed as the :class:`OrderLookup` as is."""

    @property
    def order_id(self) -> str: ...

    @property
    def status(self) -> str: ...

    @property
    def carrier(self) -> str | None: ...

    @property
    def tracking_no(self) -> str | None: ...

    @property
    def eta(self) -> date | None: ...

    @property
    def amount_cents(self) -> int: ...

    @property
    def currency(self) -> str: ...

    @property
    def items(self) -> Sequence[str | OrderItemLike]: ...

    @property
    def customer(self) -> str | None: ...


class OrderLookup(Protocol):
    """The CRM side. Must not block for long; exceptions propagate to the caller.
    ``order`` may return anybody's order: the engine checks ``customer``."""

    def order(self, shop: str, order_id: str) -> OrderLike | None: ...

    def latest_order(self, shop: str, customer: str) -> OrderLike | None: ...


class BotReply(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    quick_replies: list[str] = []
    """Button labels; a tap sends the label as the customer's next message."""


class Handoff(msgspec.Struct, frozen=True, kw_only=True):
    reason: HandoffReason
    priority: int
    """0..9, higher is more urgent (the protocol's ``Priority``)."""
    skill: str
    note: str = ""
    """For the agent: why, and what the customer said."""


class BotDecision(msgspec.Struct, frozen=True, kw_only=True):
    reply: BotReply | None = None
    handoff: Handoff | None = None
    intent: str | None = None
    """The knowledge-base intent answered, or ``human``/``complaint``/``negative``/
    ``refund`` for lexicon hits, or the best guess on a low-confidence handoff."""
    confidence: float = 0.0
    """1.0 for lexicon hits, keyword rules and quick-reply aliases; the matcher's
    confidence otherwise; 0.0 when there was nothing to match."""
    entry_id: str | None = None
    """Knowledge-base entry or keyword rule behind ``intent``."""
    order_id: str | None = None
    """The order the reply talks about."""
    language: Language | None = None


class BotStats(msgspec.Struct, frozen=True, kw_only=True):
    conversations: int = 0
    """Conversations the bot handled (once per open..close cycle)."""
    handed_off: int = 0
    """Conversations the bot handed to humans (at least once)."""
    closed: int = 0
    closed_without_human: int = 0
    abandoned_after_handoff: int = 0
    """Closed without a human although the bot had handed off (the customer gave
    up waiting). Included in ``closed_without_human``, per the definition."""
    messages: int = 0
    answered: int = 0
    """Customer messages the bot replied to without handing off."""
    handoffs_by_reason: dict[str, int] = {}

    @property
    def deflection_rate(self) -> float:
        """closed-without-human / closed; 0.0 before anything closed."""
        return self.closed_without_human / self.closed if self.closed else 0.0


# --------------------------------------------------------------------------- engine


@dataclass(slots=True)
class _Conversation:
    customer: str
    customer_name: str | None
    language: Language | None = None
    last_intent: str | None = None
    last_resolution: Resolution | None = None
    order_id: str | None = None
    handoff: Handoff | None = None


@dataclass(slots=True)
class _Counters:
    conversations: int = 0
    handed_off: int = 0
    closed: int = 0
    closed_without_human: int = 0
    abandoned_after_handoff: int = 0
    messages: int = 0
    answered: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _HandoffPlan:
    reason: HandoffReason
    priority: int
    skill: str
    message: str
    """Key of the (online) reply message."""
    intent: str
    terms: tuple[str, ...] = ()


class BotEngine:
    def __init__(
        self,
        kb_by_shop: Mapping[str, KnowledgeBase],
        orders: OrderLookup,
        *,
        handoff_threshold: float = DEFAULT_HANDOFF_THRESHOLD,
        business_hours: Mapping[str, BusinessHours] | None = None,
    ) -> None:
        if not 0.0 <= handoff_threshold <= 1.0:
            raise ValueError(f"handoff_threshold must be in [0, 1], got {handoff_threshold}")
        self._kbs = dict(kb_by_shop)
        self._orders = orders
        self._threshold = handoff_threshold
        self._hours = dict(business_hours or {})
        self._convs: OrderedDict[tuple[str, str], _Conversation] = OrderedDict()
        self._closed: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._counters: dict[str, _Counters] = {}

    @property
    def handoff_threshold(self) -> float:
        return self._threshold

    def set_knowledge_base(self, shop: str, kb: KnowledgeBase) -> None:
        """Swap a shop's knowledge base (hot reload); open conversations keep their state."""
        self._kbs[shop] = kb

    # -- hooks -------------------------------------------------------------------

    def on_conversation_opened(
        self,
        shop: str,
        conv: str,
        customer: str,
        now: datetime,
        *,
        customer_name: str | None = None,
    ) -> BotReply | None:
        """Welcome (unless the shop disabled it) plus, outside business hours, the
        away message. ``None`` if there is nothing to say or the conversation is
        already open (a reconnect must not re-welcome)."""
        require_aware(now)
        if (shop, conv) in self._convs:
            self._convs.move_to_end((shop, conv))
            return None
        self._track(shop, conv, customer, customer_name)
        kb = self._kbs.get(shop)
        lang: Language = kb.settings.language if kb else "zh"
        values = self._context_values(shop, kb, customer_name, lang)
        parts: list[str] = []
        quick: list[str] = []
        if kb is None or kb.settings.welcome_enabled:
            parts.append(render(self._message(kb, "welcome", lang), values))
            if kb is not None:
                quick = [qr.text.get(lang) for qr in kb.settings.welcome_quick_replies]
        away = self._away_text(shop, kb, now, lang, values)
        if away:
            parts.append(away)
        if not parts:
            return None
        return BotReply(text="\n".join(parts), quick_replies=quick)

    def on_customer_message(
        self,
        shop: str,
        conv: str,
        customer: str,
        text: str,
        now: datetime,
        *,
        customer_name: str | None = None,
    ) -> BotDecision:
        require_aware(now)
        state = self._track(shop, conv, customer, customer_name)
        counters = self._counter(shop)
        counters.messages += 1
        kb = self._kbs.get(shop)
        lang: Language = (
            detect_language(text) or state.language or (kb.settings.language if kb else "zh")
        )
        state.language = lang
        if not char_view(normalize(text)):
            # Emoji, stickers rendered as text, punctuation: nothing to act on.
            return BotDecision(language=lang)

        signals = scan(text)
        resolution = kb.resolve(text) if kb is not None else None
        plan = self._plan_handoff(kb, state, signals, resolution, text)

        if state.handoff is not None:
            if plan is not None and plan.priority > state.handoff.priority:
                handoff = self._make_handoff(state, plan, text, counters)
                return BotDecision(
                    handoff=handoff, intent=plan.intent, confidence=1.0, language=lang
                )
            return BotDecision(
                intent=resolution.intent if resolution else None,
                confidence=resolution.confidence if resolution else 0.0,
                language=lang,
            )

        if plan is not None:
            return self._handoff_decision(
                shop, kb, state, plan, text, now, lang, 1.0, None, counters
            )

        order_ref = self._order_reference(state, text)
        if (
            kb is not None
            and order_ref is not None
            and (resolution is None or resolution.confidence < self._threshold)
        ):
            resolution = self._order_follow_up(kb, state, text) or resolution
        if resolution is None or resolution.confidence < self._threshold:
            guess = resolution.intent if resolution is not None else None
            hinted = (
                guess
                if resolution is not None and resolution.confidence >= SKILL_HINT_MIN_CONFIDENCE
                else None
            )
            plan = _HandoffPlan(
                "low_confidence",
                PRIORITY_LOW_CONFIDENCE,
                self._skill(hinted, state),
                "handoff_low_confidence",
                guess or "unknown",
            )
            return self._handoff_decision(
                shop,
                kb,
                state,
                plan,
                text,
                now,
                lang,
                resolution.confidence if resolution else 0.0,
                resolution.id if resolution else None,
                counters,
            )

        assert kb is not None
        counters.answered += 1
        state.last_intent = resolution.intent
        state.last_resolution = resolution
        return self._answer(shop, kb, state, resolution, order_ref, lang)

    def on_conversation_closed(self, shop: str, conv: str, had_human: bool) -> None:
        """Count the close (once, even if repeated) and forget the conversation."""
        key = (shop, conv)
        if key in self._closed:
            return
        state = self._convs.pop(key, None)
        counters = self._counter(shop)
        counters.closed += 1
        if not had_human:
            counters.closed_without_human += 1
            if state is not None and state.handoff is not None:
                counters.abandoned_after_handoff += 1
        self._closed[key] = None
        while len(self._closed) > RECENTLY_CLOSED_MEMORY:
            self._closed.popitem(last=False)

    def resume_bot(self, shop: str, conv: str) -> None:
        """The conversation is back with the bot (agent released it, queue gave up):
        answer again instead of staying quiet."""
        state = self._convs.get((shop, conv))
        if state is not None:
            state.handoff = None

    def stats(self, shop: str) -> BotStats:
        c = self._counters.get(shop) or _Counters()
        return BotStats(
            conversations=c.conversations,
            handed_off=c.handed_off,
            closed=c.closed,
            closed_without_human=c.closed_without_human,
            abandoned_after_handoff=c.abandoned_after_handoff,
            messages=c.messages,
            answered=c.answered,
            handoffs_by_reason=dict(c.by_reason),
        )

    # -- conversation state ---------------------------------------------------------

    def _counter(self, shop: str) -> _Counters:
        counters = self._counters.get(shop)
        if counters is None:
            counters = self._counters[shop] = _Counters()
        return counters

    def _track(
        self, shop: str, conv: str, customer: str, customer_name: str | None
    ) -> _Conversation:
        key = (shop, conv)
        state = self._convs.get(key)
        if state is not None:
            self._convs.move_to_end(key)
            if customer_name:
                state.customer_name = customer_name
            return state
        self._closed.pop(key, None)  # reopened: a new cycle, its close counts again
        state = self._convs[key] = _Conversation(customer, customer_name)
        self._counter(shop).conversations += 1
        while len(self._convs) > MAX_TRACKED_CONVERSATIONS:
            self._convs.popitem(last=False)
        return state

    # -- handoffs ---------------------------------------------------------------------

    def _skill(self, intent: str | None, state: _Conversation) -> str:
        for candidate in (intent, state.last_intent):
            if candidate is not None and candidate in INTENT_SKILLS:
                return INTENT_SKILLS[candidate]
        return DEFAULT_SKILL

    def _is_human_option(self, kb: KnowledgeBase | None, text: str) -> bool:
        key = char_view(normalize(text))
        return any(
            key == char_view(normalize(self._message(kb, "human_option", lang)))
            for lang in SUPPORTED_LANGUAGES
        )

    @staticmethod
    def _order_reference(state: _Conversation, text: str) -> str | None:
        """The order id in the message; right after the bot asked about an order,
        a lone short token with a digit ("123", "#A-17") counts too."""
        found = find_order_id(text)
        if found is not None:
            return found.value
        last = state.last_resolution
        if last is not None and last.needs_order:
            lone = _LONE_ID_RE.fullmatch(unicodedata.normalize("NFKC", text).strip())
            if lone is not None and any(c.isdigit() for c in lone.group("id")):
                return lone.group("id")
        return None

    def _order_follow_up(
        self, kb: KnowledgeBase, state: _Conversation, text: str
    ) -> Resolution | None:
        """The message is basically an order id ("123456789012", "订单号：123456"):
        answer the order question this conversation was on, or order status."""
        found = find_order_id(text)
        if found is not None:
            rest = char_view(_ORDER_FILLER_RE.sub(" ", normalize(found.remainder)))
            if len(rest) > ORDER_ID_ONLY_MAX_EXTRA_CHARS:
                return None
        last = state.last_resolution
        if last is not None and last.needs_order:
            return last
        entry = next(
            (e for e in kb.entries if e.intent == ORDER_STATUS_INTENT and e.needs_order), None
        )
        return kb.resolution_for(entry) if entry is not None else None

    def _plan_handoff(
        self,
        kb: KnowledgeBase | None,
        state: _Conversation,
        signals: Signals,
        resolution: Resolution | None,
        text: str,
    ) -> _HandoffPlan | None:
        money = bool(signals.refund)
        if signals.complaint:
            return _HandoffPlan(
                "complaint",
                PRIORITY_COMPLAINT,
                SKILL_REFUNDS if money else SKILL_AFTER_SALE,
                "handoff_complaint",
                "complaint",
                signals.complaint,
            )
        if signals.negative:
            return _HandoffPlan(
                "negative",
                PRIORITY_NEGATIVE,
                SKILL_REFUNDS if money else SKILL_AFTER_SALE,
                "handoff_negative",
                "negative",
                signals.negative,
            )
        if money:
            faq = (
                signals.refund_question
                and resolution is not None
                and resolution.intent in REFUND_FAQ_INTENTS
                and resolution.confidence >= self._threshold
            )
            if not faq:
                return _HandoffPlan(
                    "complaint",
                    PRIORITY_REFUND,
                    SKILL_REFUNDS,
                    "handoff_refund",
                    "refund",
                    signals.refund,
                )
        human_entry = (
            resolution is not None
            and resolution.intent == HUMAN_INTENT
            and resolution.confidence >= self._threshold
        )
        if signals.human or human_entry or self._is_human_option(kb, text):
            hint = (
                resolution.intent
                if (resolution is not None and resolution.confidence >= SKILL_HINT_MIN_CONFIDENCE)
                else None
            )
            return _HandoffPlan(
                "requested",
                PRIORITY_REQUESTED,
                self._skill(hint, state),
                "handoff_requested",
                HUMAN_INTENT,
                signals.human,
            )
        return None

    @staticmethod
    def _make_handoff(
        state: _Conversation, plan: _HandoffPlan, text: str, counters: _Counters
    ) -> Handoff:
        why = {
            "requested": "customer asked for a human",
            "low_confidence": "bot could not answer",
            "complaint": "complaint" if plan.intent != "refund" else "refund request",
            "negative": "strongly negative wording",
        }[plan.reason]
        if plan.terms:
            why += f" ({', '.join(plan.terms)})"
        snippet = text.strip().replace("\n", " ")
        if len(snippet) > 200:
            snippet = snippet[:199] + "…"
        handoff = Handoff(
            reason=plan.reason, priority=plan.priority, skill=plan.skill, note=f"{why}: “{snippet}”"
        )
        if state.handoff is None:
            counters.handed_off += 1
        counters.by_reason[plan.reason] = counters.by_reason.get(plan.reason, 0) + 1
        state.handoff = handoff
        return handoff

    def _handoff_decision(
        self,
        shop: str,
        kb: KnowledgeBase | None,
        state: _Conversation,
        plan: _HandoffPlan,
        text: str,
        now: datetime,
        lang: Language,
        confidence: float,
        entry_id: str | None,
        counters: _Counters,
    ) -> BotDecision:
        handoff = self._make_handoff(state, plan, text, counters)
        values = self._context_values(shop, kb, state.customer_name, lang)
        reply_text = render(self._message(kb, plan.message, lang), values)
        hours = self._hours.get(shop)
        if hours is not None and not hours.is_open(now):
            back = hours.next_open(now)
            if back is None:
                reply_text = render(self._message(kb, "handoff_offline_no_schedule", lang), values)
            else:
                reply_text = render(
                    self._message(kb, "handoff_offline", lang),
                    {**values, "back_at": describe_back_at(back, now, lang)},
                )
            if plan.intent in ("complaint", "negative"):
                apology = render(self._message(kb, "apology", lang), values)
                reply_text = apology + ("" if lang == "zh" else " ") + reply_text
        return BotDecision(
            reply=BotReply(text=reply_text),
            handoff=handoff,
            intent=plan.intent,
            confidence=confidence,
            entry_id=entry_id,
            language=lang,
        )

    # -- answers ------------------------------------------------------------------------

    def _answer(
        self,
        shop: str,
        kb: KnowledgeBase,
        state: _Conversation,
        resolution: Resolution,
        order_ref: str | None,
        lang: Language,
    ) -> BotDecision:
        values = self._context_values(shop, kb, state.customer_name, lang)
        template = resolution.answer.get(lang)
        quick = [qr.text.get(lang) for qr in resolution.quick_replies]
        order_id: str | None = None
        if resolution.needs_order:
            order, asked = self._find_order(shop, state, order_ref)
            if order is None:
                human = self._message(kb, "human_option", lang)
                if asked is not None:
                    message = render(
                        self._message(kb, "order_not_found", lang), {**values, "order_id": asked}
                    )
                else:
                    message = render(self._message(kb, "no_orders", lang), values)
                state.last_resolution = resolution  # the next message may be the id
                return BotDecision(
                    reply=BotReply(text=message, quick_replies=[human]),
                    intent=resolution.intent,
                    confidence=resolution.confidence,
                    entry_id=resolution.id,
                    order_id=asked,
                    language=lang,
                )
            order_id = order.order_id
            values.update(_order_values(order, lang))
            missing = {
                name for name in template_fields(template) & ORDER_VARIABLES if not values.get(name)
            }
            if missing:
                template = self._message(kb, "order_pending", lang)
        return BotDecision(
            reply=BotReply(text=render(template, values), quick_replies=quick),
            intent=resolution.intent,
            confidence=resolution.confidence,
            entry_id=resolution.id,
            order_id=order_id,
            language=lang,
        )

    def _find_order(
        self, shop: str, state: _Conversation, order_ref: str | None
    ) -> tuple[OrderLike | None, str | None]:
        """(order, the id the customer asked about if any)."""
        if order_ref is not None:
            order = self._owned(self._orders.order(shop, order_ref), state)
            if order is not None:
                state.order_id = order.order_id
            return order, order_ref
        if state.order_id is not None:
            order = self._owned(self._orders.order(shop, state.order_id), state)
            if order is not None:
                return order, None
        return self._owned(self._orders.latest_order(shop, state.customer), state), None

    @staticmethod
    def _owned(order: OrderLike | None, state: _Conversation) -> OrderLike | None:
        if order is None or (order.customer is not None and order.customer != state.customer):
            return None
        return order

    # -- text helpers -------------------------------------------------------------------

    @staticmethod
    def _message(kb: KnowledgeBase | None, key: str, lang: Language) -> str:
        if kb is None:
            return DEFAULT_MESSAGES[key][lang]
        return kb.message(key, lang)

    @staticmethod
    def _context_values(
        shop: str, kb: KnowledgeBase | None, customer_name: str | None, lang: Language
    ) -> dict[str, str]:
        return {
            "shop_name": (kb.settings.name if kb is not None else None) or shop,
            "customer_name": customer_name or _CUSTOMER_FALLBACK[lang],
        }

    def _away_text(
        self,
        shop: str,
        kb: KnowledgeBase | None,
        now: datetime,
        lang: Language,
        values: dict[str, str],
    ) -> str | None:
        hours = self._hours.get(shop)
        if hours is None or hours.is_open(now):
            return None
        back = hours.next_open(now)
        if back is None:
            return render(self._message(kb, "away_no_schedule", lang), values)
        return render(
            self._message(kb, "away", lang),
            {**values, "back_at": describe_back_at(back, now, lang)},
        )


def _item_text(item: str | OrderItemLike) -> str:
    if isinstance(item, str):
        return item
    return item.title if item.quantity == 1 else f"{item.title}×{item.quantity}"


def _order_values(order: OrderLike, lang: Language) -> dict[str, str]:
    label = ORDER_STATUS_LABELS.get(order.status)
    status = label[lang] if label is not None else order.status
    if order.eta is None:
        eta = ""
    elif lang == "zh":
        eta = f"{order.eta.month}月{order.eta.day}日"
    else:
        eta = f"{_EN_MONTHS[order.eta.month - 1]} {order.eta.day}"
    symbol = _CURRENCY_SYMBOLS.get(order.currency)
    major = f"{order.amount_cents // 100}.{order.amount_cents % 100:02d}"
    amount = f"{symbol}{major}" if symbol else f"{major} {order.currency}"
    return {
        "order_id": order.order_id,
        "order_status": status,
        "carrier": order.carrier or "",
        "tracking_no": order.tracking_no or "",
        "eta": eta,
        "amount": amount,
        "items": ("、" if lang == "zh" else ", ").join(_item_text(i) for i in order.items),
    }
