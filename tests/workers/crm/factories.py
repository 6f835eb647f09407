"""Test data builders. Every time is derived from the explicit ``NOW``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

from workers.crm.models import Order, OrderItem
from workers.crm.repository import CrmRepository

#: Tuesday 2024-03-05 02:00 UTC = 10:00 in Shanghai, 18:00 (Mon) in Los Angeles,
#: 03:00 in Madrid.
NOW = datetime(2024, 3, 5, 2, 0, tzinfo=UTC)

SHOP = "tmall-flagship"
OTHER_SHOP = "aliexpress-store"


def make_order(
    order_id: str,
    customer: str,
    *,
    shop: str = SHOP,
    days_ago: float = 10,
    status: str = "completed",
    amount_cents: int = 10_000,
    currency: str = "CNY",
    channel: str = "tmall",
    items: tuple[OrderItem, ...] = (),
    carrier: str | None = None,
    tracking_no: str | None = None,
    eta: date | None = None,
    updated_days_ago: float | None = None,
) -> Order:
    created = NOW - timedelta(days=days_ago)
    updated = NOW - timedelta(days=updated_days_ago) if updated_days_ago is not None else created
    return Order(
        shop=shop,
        order_id=order_id,
        customer=customer,
        channel=channel,
        status=status,
        amount_cents=amount_cents,
        currency=currency,
        items=items,
        carrier=carrier,
        tracking_no=tracking_no,
        eta=eta,
        created_at=created,
        updated_at=updated,
    )


def add_customer(
    repo: CrmRepository, customer: str, *, timezone: str = "Asia/Shanghai", name: str = ""
) -> str:
    repo.upsert_customer(customer, display_name=name or customer, timezone=timezone)
    return customer


def add_orders(
    repo: CrmRepository,
    customer: str,
    days_ago: Sequence[float],
    *,
    amount_cents: int = 10_000,
    shop: str = SHOP,
    status: str = "completed",
    prefix: str | None = None,
) -> None:
    """One order per entry of ``days_ago``; ids are ``<prefix or customer>-<n>``."""
    stem = prefix or customer
    repo.upsert_orders(
        make_order(
            f"{stem}-{n}", customer, shop=shop, days_ago=d, amount_cents=amount_cents, status=status
        )
        for n, d in enumerate(days_ago)
    )
