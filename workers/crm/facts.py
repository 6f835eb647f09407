"""Per-shop order aggregates, the common input of RFM scoring and tag rules.

One pass over a shop's orders (``CrmStore.shop_orders``); pure given the orders and
``now``. Orders created after ``now`` are ignored, so re-running with an old ``now``
reproduces an old result.

Currency: a shop settles in one currency in practice (CNY on Tmall, USD on
AliExpress). Money aggregates here are in the shop's *main currency*: the currency of
most of its revenue orders (ties broken alphabetically). Revenue orders in another
currency still count for recency and frequency, never for money - amounts in
different currencies are not added up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta

import msgspec

from workers.crm.models import DEFAULT_CURRENCY, REVENUE_STATUSES, Order

#: Statuses of orders that were paid at some point (first-order date, refunds).
EVER_PAID_STATUSES = REVENUE_STATUSES | {"refunding", "refunded"}


class CustomerFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What one customer did in one shop, up to ``now``."""

    customer: str
    order_count: int
    """Orders of any status."""
    revenue_orders: int
    """Orders in a revenue status, all time."""
    window_orders: int
    """Revenue orders created inside the scoring window."""
    window_revenue_cents: int
    """Their amounts, main currency only."""
    lifetime_value_cents: int
    """Revenue orders, all time, main currency only."""
    refunded_orders: int
    first_paid_at: datetime | None
    """Earliest order that was ever paid (revenue, refunding or refunded)."""
    last_revenue_at: datetime | None
    channels: frozenset[str]
    """Channels the customer ordered through in this shop."""


class ShopFacts(msgspec.Struct, frozen=True, kw_only=True):
    shop: str
    now: datetime
    window_start: datetime
    currency: str
    customers: dict[str, CustomerFacts]


class _Acc:
    __slots__ = (
        "channels",
        "first_paid",
        "last_revenue",
        "orders",
        "refunded",
        "revenue",
        "revenue_orders",
        "window_orders",
        "window_revenue",
    )

    def __init__(self) -> None:
        self.orders = 0
        self.revenue_orders = 0
        self.window_orders = 0
        self.refunded = 0
        self.first_paid: datetime | None = None
        self.last_revenue: datetime | None = None
        self.channels: set[str] = set()
        self.revenue: Counter[str] = Counter()
        self.window_revenue: Counter[str] = Counter()


def shop_facts(shop: str, orders: Iterable[Order], now: datetime, window_days: int) -> ShopFacts:
    """Aggregate ``orders`` of ``shop`` per customer (orders of other shops are skipped)."""
    if window_days < 1:
        raise ValueError("window_days must be >= 1")
    window_start = now - timedelta(days=window_days)
    accs: dict[str, _Acc] = {}
    currencies: Counter[str] = Counter()
    for order in orders:
        if order.shop != shop or order.created_at > now:
            continue
        acc = accs.get(order.customer)
        if acc is None:
            acc = accs[order.customer] = _Acc()
        acc.orders += 1
        acc.channels.add(order.channel)
        if order.status in EVER_PAID_STATUSES and (
            acc.first_paid is None or order.created_at < acc.first_paid
        ):
            acc.first_paid = order.created_at
        if order.status == "refunded":
            acc.refunded += 1
        if order.status not in REVENUE_STATUSES:
            continue
        currencies[order.currency] += 1
        acc.revenue_orders += 1
        acc.revenue[order.currency] += order.amount_cents
        if acc.last_revenue is None or order.created_at > acc.last_revenue:
            acc.last_revenue = order.created_at
        if order.created_at >= window_start:
            acc.window_orders += 1
            acc.window_revenue[order.currency] += order.amount_cents
    currency = main_currency(currencies)
    customers = {
        customer: CustomerFacts(
            customer=customer,
            order_count=acc.orders,
            revenue_orders=acc.revenue_orders,
            window_orders=acc.window_orders,
            window_revenue_cents=acc.window_revenue[currency],
            lifetime_value_cents=acc.revenue[currency],
            refunded_orders=acc.refunded,
            first_paid_at=acc.first_paid,
            last_revenue_at=acc.last_revenue,
            channels=frozenset(acc.channels),
        )
        for customer, acc in sorted(accs.items())
    }
    return ShopFacts(
        shop=shop, now=now, window_start=window_start, currency=currency, customers=customers
    )


def main_currency(order_counts: Counter[str]) -> str:
    """The currency with the most revenue orders (alphabetical on ties; CNY if none)."""
    if not order_counts:
        return DEFAULT_CURRENCY
    return min(order_counts, key=lambda c: (-order_counts[c], c))


def days_between(earlier: datetime, later: datetime) -> int:
    """Whole days from ``earlier`` to ``later`` (floor; 0 if ``later`` is earlier)."""
    return max(0, (later - earlier) // timedelta(days=1))
