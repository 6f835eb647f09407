"""Customer tags: manual ones set by agents, and rule tags computed from data.

Rules are data (``TagRule``; loadable from JSON with ``load_rules``): a tag and a list
of conditions that must all hold. A condition compares one *metric* of a customer
in a shop with a value:

======================== ======= ==================================================
metric                   ops     value
======================== ======= ==================================================
member_level             numeric membership level (merchant-wide)
points                   numeric points balance (merchant-wide)
lifetime_value_cents     numeric revenue orders in this shop, main currency
order_count              numeric revenue orders in this shop
refunded_orders          numeric refunded orders in this shop
days_since_first_order   numeric days since the first ever-paid order in this shop
days_since_last_order    numeric days since the last revenue order in this shop
channel                  has     a channel the customer has an identity on or
                                 ordered through (taobao, tmall, 1688, ...)
segment                  == !=   stored RFM segment in this shop
======================== ======= ==================================================

numeric ops: ``>= > <= < == !=``. A condition on a metric the customer has no value
for (no orders -> no ``days_since_first_order``; never scored -> no ``segment``) is
false.

``TagEngine.apply_rules(shop, now)`` evaluates every rule for every customer of the
shop (customers with orders there, plus customers already tagged there) and makes
the stored rule tags equal to the result: missing ones are added, rule tags that no
longer match - or that no current rule produces - are removed. Manual tags are never
touched; a rule never downgrades a manual tag. Running it twice changes nothing.

``DEFAULT_RULES`` holds the standard rules with their named thresholds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Final, Literal

import msgspec

from workers.crm.facts import CustomerFacts, days_between, shop_facts
from workers.crm.loyalty import VIP_MIN_LEVEL
from workers.crm.models import CHANNELS, Customer, Segment
from workers.crm.repository import CrmStore, check_tag
from workers.crm.rfm import RFM_WINDOW_DAYS

Metric = Literal[
    "member_level",
    "points",
    "lifetime_value_cents",
    "order_count",
    "refunded_orders",
    "days_since_first_order",
    "days_since_last_order",
    "channel",
    "segment",
]
Op = Literal[">=", ">", "<=", "<", "==", "!=", "has"]

NUMERIC_METRICS: Final = frozenset(
    {
        "member_level",
        "points",
        "lifetime_value_cents",
        "order_count",
        "refunded_orders",
        "days_since_first_order",
        "days_since_last_order",
    }
)
NUMERIC_OPS: Final = frozenset({">=", ">", "<=", "<", "==", "!="})

# ---------------------------------------------------------------- default thresholds

#: Tag names of the default rules.
VIP_TAG: Final = "vip"
BIG_SPENDER_TAG: Final = "big_spender"
RETURNER_TAG: Final = "returner"
NEW_CUSTOMER_TAG: Final = "new"
CHANNEL_TAG_PREFIX: Final = "channel:"

#: ``big_spender``: lifetime value in the shop's main currency reaches ¥5,000.
BIG_SPENDER_MIN_CENTS: Final = 500_000

#: ``returner``: at least this many refunded orders.
RETURNER_MIN_REFUNDS: Final = 2

#: ``new``: first paid order less than this many days ago.
NEW_CUSTOMER_DAYS: Final = 30


class Condition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    metric: Metric
    op: Op
    value: int | str

    def __post_init__(self) -> None:
        if self.metric in NUMERIC_METRICS:
            if self.op not in NUMERIC_OPS or not isinstance(self.value, int):
                raise ValueError(f"{self.metric} needs a numeric op and an integer value")
        elif self.metric == "channel":
            if self.op != "has" or self.value not in CHANNELS:
                raise ValueError(f"channel needs op 'has' and one of {', '.join(CHANNELS)}")
        elif self.op not in ("==", "!=") or self.value not in set(Segment):
            raise ValueError(f"segment needs op '==' or '!=' and one of {', '.join(Segment)}")

    def holds(self, metrics: Mapping[str, int | str | frozenset[str] | None]) -> bool:
        actual = metrics.get(self.metric)
        if actual is None:
            return False
        if isinstance(actual, frozenset):
            return self.value in actual
        if isinstance(actual, str):
            return (actual == self.value) == (self.op == "==")
        assert isinstance(self.value, int)
        return _compare(actual, self.op, self.value)


def _compare(actual: int, op: str, value: int) -> bool:
    match op:
        case ">=":
            return actual >= value
        case ">":
            return actual > value
        case "<=":
            return actual <= value
        case "<":
            return actual < value
        case "==":
            return actual == value
        case _:
            return actual != value


class TagRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``tag`` applies when every condition in ``when`` holds."""

    tag: str
    when: tuple[Condition, ...]
    description: str = ""

    def __post_init__(self) -> None:
        check_tag(self.tag)
        if not self.when:
            raise ValueError(f"rule {self.tag!r} has no conditions")

    def matches(self, metrics: Mapping[str, int | str | frozenset[str] | None]) -> bool:
        return all(c.holds(metrics) for c in self.when)


def _channel_rules() -> tuple[TagRule, ...]:
    return tuple(
        TagRule(
            tag=f"{CHANNEL_TAG_PREFIX}{c}",
            when=(Condition("channel", "has", c),),
            description=f"has an identity on or ordered through {c}",
        )
        for c in CHANNELS
    )


DEFAULT_RULES: Final = (
    TagRule(
        tag=VIP_TAG,
        when=(Condition("member_level", ">=", VIP_MIN_LEVEL),),
        description="member level is VIP",
    ),
    TagRule(
        tag=BIG_SPENDER_TAG,
        when=(Condition("lifetime_value_cents", ">=", BIG_SPENDER_MIN_CENTS),),
        description="lifetime value in this shop >= ¥5,000",
    ),
    TagRule(
        tag=RETURNER_TAG,
        when=(Condition("refunded_orders", ">=", RETURNER_MIN_REFUNDS),),
        description="two or more refunded orders",
    ),
    TagRule(
        tag=NEW_CUSTOMER_TAG,
        when=(Condition("days_since_first_order", "<", NEW_CUSTOMER_DAYS),),
        description="first paid order within 30 days",
    ),
    *_channel_rules(),
)


def load_rules(data: bytes | str) -> tuple[TagRule, ...]:
    """Rules from JSON: ``[{"tag": "vip", "when": [{"metric": ..., "op": ..., "value": ...}]}]``.

    Raises ``msgspec.ValidationError`` naming the offending rule or condition.
    """
    return msgspec.json.decode(data, type=tuple[TagRule, ...])


def customer_metrics(
    customer: Customer,
    facts: CustomerFacts | None,
    *,
    now: datetime,
    channels: Iterable[str],
    segment: Segment | None,
) -> dict[str, int | str | frozenset[str] | None]:
    """The metric values rules are evaluated against (see the module table)."""
    return {
        "member_level": customer.member_level,
        "points": customer.points,
        "lifetime_value_cents": facts.lifetime_value_cents if facts else 0,
        "order_count": facts.revenue_orders if facts else 0,
        "refunded_orders": facts.refunded_orders if facts else 0,
        "days_since_first_order": (
            days_between(facts.first_paid_at, now) if facts and facts.first_paid_at else None
        ),
        "days_since_last_order": (
            days_between(facts.last_revenue_at, now) if facts and facts.last_revenue_at else None
        ),
        "channel": frozenset(channels) | (facts.channels if facts else frozenset()),
        "segment": str(segment) if segment is not None else None,
    }


class TagChange(msgspec.Struct, frozen=True, kw_only=True):
    customer: str
    tag: str
    action: Literal["added", "removed"]


class TagEngine:
    def __init__(
        self,
        store: CrmStore,
        rules: Sequence[TagRule] = DEFAULT_RULES,
        *,
        window_days: int = RFM_WINDOW_DAYS,
    ) -> None:
        self._store = store
        self._rules = tuple(rules)
        self._window_days = window_days

    @property
    def rules(self) -> tuple[TagRule, ...]:
        return self._rules

    def desired_tags(self, metrics: Mapping[str, int | str | frozenset[str] | None]) -> set[str]:
        return {rule.tag for rule in self._rules if rule.matches(metrics)}

    def apply_rules(self, shop: str, now: datetime) -> list[TagChange]:
        """Bring the stored rule tags of ``shop`` in line with the rules as of ``now``."""
        store = self._store
        facts = shop_facts(shop, store.shop_orders(shop), now, self._window_days)
        existing = store.shop_tags(shop)
        changes: list[TagChange] = []
        for customer_id in sorted(set(facts.customers) | set(existing)):
            customer = store.customer(customer_id)
            if customer is None:
                continue
            score = store.rfm_score(shop, customer_id)
            metrics = customer_metrics(
                customer,
                facts.customers.get(customer_id),
                now=now,
                channels=(i.channel for i in store.identities(customer_id)),
                segment=score.segment if score is not None else None,
            )
            desired = self.desired_tags(metrics)
            have = existing.get(customer_id, [])
            rule_tags = {t.tag for t in have if t.source == "rule"}
            manual_tags = {t.tag for t in have if t.source == "manual"}
            for tag in sorted(desired - rule_tags - manual_tags):
                if store.add_tag(shop, customer_id, tag, source="rule"):
                    changes.append(TagChange(customer=customer_id, tag=tag, action="added"))
            for tag in sorted(rule_tags - desired):
                if store.remove_tag(shop, customer_id, tag, source="rule"):
                    changes.append(TagChange(customer=customer_id, tag=tag, action="removed"))
        return changes
