"""Shared test helpers: a fake order store and an engine over the example KB."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from workers.bot.engine import BotEngine, OrderInfo
from workers.bot.hours import BusinessHours
from workers.bot.knowledge import KnowledgeBase, load

EXAMPLES = Path(__file__).resolve().parents[3] / "workers" / "bot" / "examples"
SHANGHAI = ZoneInfo("Asia/Shanghai")
SHOP = "deer"

# Friday 2025-01-03 10:00 in Shanghai: inside the example business hours.
OPEN_NOW = datetime(2025, 1, 3, 10, 0, tzinfo=SHANGHAI)
# Friday 2025-01-03 22:00 in Shanghai: closed until Saturday 10:00.
CLOSED_NOW = datetime(2025, 1, 3, 22, 0, tzinfo=SHANGHAI)

SHIPPED = OrderInfo(
    order_id="123",
    status="shipped",
    carrier="中通快递",
    tracking_no="ZT998877",
    eta=date(2025, 1, 6),
    amount_cents=19900,
    items=("碎花连衣裙",),
    customer="alice",
)
LATEST = OrderInfo(
    order_id="240101000000000001",
    status="in_transit",
    carrier="顺丰速运",
    tracking_no="SF1234567890",
    eta=date(2025, 1, 4),
    amount_cents=8800,
    items=("针织开衫",),
    customer="alice",
)
UNSHIPPED = OrderInfo(order_id="555555", status="paid", amount_cents=5000, customer="alice")
BOBS = OrderInfo(
    order_id="777777", status="shipped", carrier="韵达", tracking_no="YD1", customer="bob"
)


class FakeOrders:
    """In-memory OrderLookup that records the calls it gets."""

    def __init__(
        self, orders: list[OrderInfo] | None = None, latest: dict[str, OrderInfo] | None = None
    ) -> None:
        self.orders = {o.order_id: o for o in (orders or [SHIPPED, LATEST, UNSHIPPED, BOBS])}
        self.latest = latest if latest is not None else {"alice": LATEST}
        self.calls: list[tuple[str, str, str]] = []

    def order(self, shop: str, order_id: str) -> OrderInfo | None:
        self.calls.append(("order", shop, order_id))
        return self.orders.get(order_id)

    def latest_order(self, shop: str, customer: str) -> OrderInfo | None:
        self.calls.append(("latest_order", shop, customer))
        return self.latest.get(customer)


_EXAMPLE: KnowledgeBase | None = None


def example_kb() -> KnowledgeBase:
    """The example YAML knowledge base (parsed once per test session)."""
    global _EXAMPLE
    if _EXAMPLE is None:
        _EXAMPLE = load(EXAMPLES / "kb.yaml")
    return _EXAMPLE


def shop_hours() -> BusinessHours:
    return BusinessHours.parse(
        "Asia/Shanghai",
        {"mon-fri": "09:00-18:00", "sat": "10:00-16:00"},
        holidays=["2025-01-01"],
    )


def make_engine(
    orders: FakeOrders | None = None,
    *,
    hours: bool = True,
    kb: KnowledgeBase | None = None,
    threshold: float = 0.6,
) -> BotEngine:
    return BotEngine(
        {SHOP: kb or example_kb()},
        orders or FakeOrders(),
        handoff_threshold=threshold,
        business_hours={SHOP: shop_hours()} if hours else None,
    )
