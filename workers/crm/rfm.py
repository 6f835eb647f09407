"""RFM scoring (最近一次消费 Recency, 消费频率 Frequency, 消费金额 Monetary) per shop.

Inputs (from ``facts.shop_facts``), for every customer with at least one revenue
order in the shop up to ``now``:

* recency   - whole days since the last revenue order (ever, not just in the window);
* frequency - revenue orders in the window (``RFM_WINDOW_DAYS``, default 365 days);
* monetary  - their total in the shop's main currency (minor units).

Each dimension is scored 1 (worst) .. 5 (best), in one of two ways:

* **threshold** (small shops; fixed, documented cut-offs):

  ===== ================= ================== ==========================
  score recency (days)    frequency (orders) monetary (major units)
  ===== ================= ================== ==========================
  5     <= 30             >= 6               >= 5,000
  4     31 .. 60          4 .. 5             2,000 .. 4,999.99
  3     61 .. 120         3                  800 .. 1,999.99
  2     121 .. 240        2                  200 .. 799.99
  1     > 240             0 .. 1             < 200
  ===== ================= ================== ==========================

* **quintile** (shops with at least ``RFM_QUINTILE_MIN_CUSTOMERS`` scored customers):
  ``score = 1 + floor(5 * worse / n)`` where ``worse`` is the number of customers with
  a strictly worse value - the customer's quintile, with ties sharing a score.

``RfmPolicy.mode`` picks: ``"auto"`` (default) uses quintiles once a shop is large
enough for them to mean something, thresholds before that.

Segments - ``SEGMENT_TABLE``, first matching row wins; every (R, F, M) maps to
exactly one segment:

=========== ============= ====== ====== ====== =====================================
segment     中文           R      F      M      meaning
=========== ============= ====== ====== ====== =====================================
champions   重要价值客户   4-5    4-5    4-5    recent, frequent, big spenders
loyal       忠诚客户       3-5    4-5    any    buy often, still active
new         新客户         5      1      any    first purchase in the last month
potential   潜力客户       3-5    1-3    any    active, not yet frequent: grow them
at_risk     重要挽留客户   1-2    3-5    any    used to buy often, slipping away
at_risk     重要挽留客户   1-2    1-2    4-5    spent a lot, slipping away
hibernating 沉睡客户       2      1-2    1-3    low value, quiet for 4-8 months
lost        流失客户       1      1-2    1-3    low value, quiet for 8+ months
=========== ============= ====== ====== ====== =====================================

``RfmScorer.score_shop`` stores the result (replacing the shop's previous snapshot)
so ``CrmStore.customers_in_segment`` and the agent sidebar can use it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from datetime import datetime
from typing import Final, Literal

import msgspec

from workers.crm.facts import ShopFacts, days_between, shop_facts
from workers.crm.models import RfmScore, Segment
from workers.crm.repository import CrmStore

#: Frequency and monetary look this far back.
RFM_WINDOW_DAYS: Final = 365

#: Below this many scored customers a shop is scored with fixed thresholds.
RFM_QUINTILE_MIN_CUSTOMERS: Final = 50

#: Upper bounds (inclusive, days) of recency scores 5, 4, 3, 2; older scores 1.
RECENCY_THRESHOLDS_DAYS: Final = (30, 60, 120, 240)

#: Minimum orders for frequency scores 2, 3, 4, 5.
FREQUENCY_THRESHOLDS: Final = (2, 3, 4, 6)

#: Minimum spend (minor units; ¥200, ¥800, ¥2,000, ¥5,000) for monetary scores 2..5.
MONETARY_THRESHOLDS_CENTS: Final = (20_000, 80_000, 200_000, 500_000)

ScoringMode = Literal["auto", "threshold", "quintile"]

Range = tuple[int, int]


class SegmentRule(msgspec.Struct, frozen=True):
    segment: Segment
    r: Range
    f: Range
    m: Range

    def matches(self, r: int, f: int, m: int) -> bool:
        return (
            self.r[0] <= r <= self.r[1]
            and self.f[0] <= f <= self.f[1]
            and self.m[0] <= m <= self.m[1]
        )


#: The segment mapping documented in the module docstring; first match wins.
SEGMENT_TABLE: Final = (
    SegmentRule(Segment.CHAMPIONS, (4, 5), (4, 5), (4, 5)),
    SegmentRule(Segment.LOYAL, (3, 5), (4, 5), (1, 5)),
    SegmentRule(Segment.NEW, (5, 5), (1, 1), (1, 5)),
    SegmentRule(Segment.POTENTIAL, (3, 5), (1, 3), (1, 5)),
    SegmentRule(Segment.AT_RISK, (1, 2), (3, 5), (1, 5)),
    SegmentRule(Segment.AT_RISK, (1, 2), (1, 2), (4, 5)),
    SegmentRule(Segment.HIBERNATING, (2, 2), (1, 2), (1, 3)),
    SegmentRule(Segment.LOST, (1, 1), (1, 2), (1, 3)),
)


class RfmPolicy(msgspec.Struct, frozen=True, kw_only=True):
    window_days: int = RFM_WINDOW_DAYS
    mode: ScoringMode = "auto"
    quintile_min_customers: int = RFM_QUINTILE_MIN_CUSTOMERS
    recency_thresholds_days: tuple[int, int, int, int] = RECENCY_THRESHOLDS_DAYS
    frequency_thresholds: tuple[int, int, int, int] = FREQUENCY_THRESHOLDS
    monetary_thresholds_cents: tuple[int, int, int, int] = MONETARY_THRESHOLDS_CENTS


DEFAULT_POLICY: Final = RfmPolicy()


def segment_for(r: int, f: int, m: int) -> Segment:
    for rule in SEGMENT_TABLE:
        if rule.matches(r, f, m):
            return rule.segment
    raise ValueError(f"scores out of range: R={r} F={f} M={m}")


def threshold_score(value: int, thresholds: Sequence[int]) -> int:
    """1 + how many ``thresholds`` (ascending minimums) ``value`` reaches."""
    return 1 + sum(value >= t for t in thresholds)


def recency_threshold_score(days: int, thresholds: Sequence[int]) -> int:
    """5 - how many ``thresholds`` (ascending maximums) ``days`` exceeds."""
    return 5 - sum(days > t for t in thresholds)


def quintile_scores(values: Sequence[int], *, higher_is_better: bool) -> list[int]:
    """Score each value 1..5 by the share of values strictly worse than it."""
    n = len(values)
    ordered = sorted(values)
    if higher_is_better:
        worse = [bisect_left(ordered, v) for v in values]
    else:
        worse = [n - bisect_left(ordered, v + 1) for v in values]
    return [1 + 5 * w // n for w in worse]


def compute_rfm(facts: ShopFacts, policy: RfmPolicy = DEFAULT_POLICY) -> dict[str, RfmScore]:
    """Pure RFM scoring of one shop's aggregates."""
    rows: list[tuple[str, int, int, int]] = []
    for customer, cf in facts.customers.items():
        if cf.last_revenue_at is None:
            continue
        rows.append(
            (
                customer,
                days_between(cf.last_revenue_at, facts.now),
                cf.window_orders,
                cf.window_revenue_cents,
            )
        )
    if not rows:
        return {}
    use_quintiles = policy.mode == "quintile" or (
        policy.mode == "auto" and len(rows) >= policy.quintile_min_customers
    )
    if use_quintiles:
        r_scores = quintile_scores([row[1] for row in rows], higher_is_better=False)
        f_scores = quintile_scores([row[2] for row in rows], higher_is_better=True)
        m_scores = quintile_scores([row[3] for row in rows], higher_is_better=True)
    else:
        r_scores = [recency_threshold_score(row[1], policy.recency_thresholds_days) for row in rows]
        f_scores = [threshold_score(row[2], policy.frequency_thresholds) for row in rows]
        m_scores = [threshold_score(row[3], policy.monetary_thresholds_cents) for row in rows]
    result: dict[str, RfmScore] = {}
    for (customer, days, freq, money), r, f, m in zip(
        rows, r_scores, f_scores, m_scores, strict=True
    ):
        result[customer] = RfmScore(
            customer=customer,
            recency_days=days,
            frequency=freq,
            monetary_cents=money,
            currency=facts.currency,
            r=r,
            f=f,
            m=m,
            segment=segment_for(r, f, m),
        )
    return result


class RfmScorer:
    """Scores a shop from the store and stores the snapshot."""

    def __init__(self, store: CrmStore, policy: RfmPolicy = DEFAULT_POLICY) -> None:
        self._store = store
        self._policy = policy

    @property
    def policy(self) -> RfmPolicy:
        return self._policy

    def score_shop(self, shop: str, now: datetime) -> dict[str, RfmScore]:
        """Score every customer of ``shop`` as of ``now``; replaces the stored snapshot."""
        facts = shop_facts(shop, self._store.shop_orders(shop), now, self._policy.window_days)
        scores = compute_rfm(facts, self._policy)
        self._store.save_rfm_scores(shop, scores.values(), now)
        return scores
