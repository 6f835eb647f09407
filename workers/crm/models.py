"""Data types shared by the CRM plugin: customers, orders, tags, RFM scores, profiles.

Every type here is a frozen ``msgspec.Struct`` so it can cross the worker/protocol
boundary as-is (``msgspec.json.encode`` / ``msgspec.msgpack.encode``).

Conventions
-----------
* Money is an integer count of the currency's minor unit (``amount_cents``; fen for
  CNY) next to an ISO-4217 ``currency`` code. Never floats.
* Timestamps are timezone-aware ``datetime`` objects; the repository returns them in
  UTC. Naive datetimes are rejected at the repository boundary.
* Channels, order statuses and segments are plain strings validated against the
  constants below (``CHANNELS``, ``ORDER_STATUSES``, ``Segment``).
"""

from __future__ import annotations

import enum
from datetime import date, datetime
from typing import Final, Literal

import msgspec

# ---------------------------------------------------------------- channels

#: Sales channels a customer identity can come from. One unified customer may hold an
#: identity on each of them (the same buyer on Taobao, Tmall, AliExpress and the app).
CHANNELS: Final = ("taobao", "tmall", "1688", "aliexpress", "jd", "web", "app")

#: Timezone given to customers we know nothing about (most buyers of a Chinese shop).
DEFAULT_TIMEZONE: Final = "Asia/Shanghai"

#: Currency assumed when an import row does not name one.
DEFAULT_CURRENCY: Final = "CNY"

# ---------------------------------------------------------------- order statuses

#: Canonical order statuses (the same codes as the bot's ``ORDER_STATUS_LABELS``; the
#: importer maps platform labels onto them):
#:
#: ================ ==================== =========================================
#: status           Taobao label         meaning
#: ================ ==================== =========================================
#: pending_payment  等待买家付款           created, not paid
#: paid             买家已付款/待发货       paid, not shipped
#: processing       备货中                 paid, being prepared
#: shipped          卖家已发货             handed to the carrier
#: in_transit       运输中                 carrier scan on the way
#: out_for_delivery 派送中                 with the courier
#: delivered        已签收                 carrier reports delivery
#: completed        交易成功               buyer confirmed / auto-confirmed
#: refunding        退款中                 refund requested, undecided
#: refunded         已退款 / 退款成功       money returned
#: cancelled        交易关闭 / 已取消       closed without payment
#: ================ ==================== =========================================
ORDER_STATUSES: Final = (
    "pending_payment",
    "paid",
    "processing",
    "shipped",
    "in_transit",
    "out_for_delivery",
    "delivered",
    "completed",
    "refunding",
    "refunded",
    "cancelled",
)

#: Statuses that count as revenue: RFM monetary/frequency, lifetime value, points.
#: ``refunding`` is excluded on purpose (money in dispute), ``pending_payment`` and
#: ``cancelled`` were never paid and ``refunded`` was paid back.
REVENUE_STATUSES: Final = frozenset(
    {
        "paid",
        "processing",
        "shipped",
        "in_transit",
        "out_for_delivery",
        "delivered",
        "completed",
    }
)

#: Statuses that take back points granted for an order.
REVERSAL_STATUSES: Final = frozenset({"refunded", "cancelled"})

TagSource = Literal["manual", "rule"]


class Segment(enum.StrEnum):
    """Named RFM segments; the mapping from scores is ``workers.crm.rfm.SEGMENT_TABLE``."""

    CHAMPIONS = "champions"
    LOYAL = "loyal"
    POTENTIAL = "potential"
    NEW = "new"
    AT_RISK = "at_risk"
    HIBERNATING = "hibernating"
    LOST = "lost"

    @property
    def label_zh(self) -> str:
        """The label Chinese merchants know the segment by (shown in the agent sidebar)."""
        return SEGMENT_LABELS_ZH[self]


def parse_segment(value: Segment | str) -> Segment:
    """``value`` as a ``Segment``; ``ValueError`` listing the valid names otherwise."""
    try:
        return Segment(value)
    except ValueError:
        raise ValueError(
            f"unknown segment {value!r} (expected one of {', '.join(Segment)})"
        ) from None


SEGMENT_LABELS_ZH: Final[dict[Segment, str]] = {
    Segment.CHAMPIONS: "重要价值客户",
    Segment.LOYAL: "忠诚客户",
    Segment.POTENTIAL: "潜力客户",
    Segment.NEW: "新客户",
    Segment.AT_RISK: "重要挽留客户",
    Segment.HIBERNATING: "沉睡客户",
    Segment.LOST: "流失客户",
}

# ---------------------------------------------------------------- records


class Customer(msgspec.Struct, frozen=True, kw_only=True):
    """A unified customer: one person across every channel identity they use."""

    id: str
    display_name: str = ""
    timezone: str = DEFAULT_TIMEZONE
    opt_out: bool = False
    member_level: int = 0
    points: int = 0
    created_at: datetime


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """A buyer account on one channel (e.g. a Taobao nick), linked to a unified customer."""

    channel: str
    external_id: str
    customer: str


class OrderItem(msgspec.Struct, frozen=True, kw_only=True):
    title: str
    quantity: int = 1
    sku: str = ""


class OrderInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the bot needs to answer "where is my order?".

    ``customer`` is the unified id the order belongs to: before disclosing anything the
    bot must check it against the customer it is talking to (``CrmRepository.order``
    looks orders up by id alone).
    """

    order_id: str
    status: str
    carrier: str | None
    tracking_no: str | None
    eta: date | None
    amount_cents: int
    currency: str
    items: tuple[OrderItem, ...]
    channel: str
    created_at: datetime
    customer: str | None = None
    """Owner (always set by ``CrmRepository``); same meaning as in the bot."""


class Order(msgspec.Struct, frozen=True, kw_only=True):
    """A full order row as stored (``OrderInfo`` plus shop, customer and ``updated_at``)."""

    shop: str
    order_id: str
    customer: str
    channel: str
    status: str
    amount_cents: int
    currency: str = DEFAULT_CURRENCY
    items: tuple[OrderItem, ...] = ()
    carrier: str | None = None
    tracking_no: str | None = None
    eta: date | None = None
    created_at: datetime
    updated_at: datetime

    def info(self) -> OrderInfo:
        return OrderInfo(
            order_id=self.order_id,
            status=self.status,
            carrier=self.carrier,
            tracking_no=self.tracking_no,
            eta=self.eta,
            amount_cents=self.amount_cents,
            currency=self.currency,
            items=self.items,
            channel=self.channel,
            created_at=self.created_at,
            customer=self.customer,
        )


class UpsertResult(msgspec.Struct, frozen=True, kw_only=True):
    """Outcome of ``upsert_orders``: stale rows (older ``updated_at``) are left alone,
    ``unchanged`` rows were identical to the stored ones."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    stale: int = 0


class Tag(msgspec.Struct, frozen=True, kw_only=True):
    tag: str
    source: TagSource
    created_at: datetime


class PointsEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One line of the points ledger; ``ref`` makes a grant idempotent."""

    customer: str
    delta: int
    kind: str
    ref: str | None
    at: datetime


class RfmScore(msgspec.Struct, frozen=True, kw_only=True):
    """RFM result for one customer in one shop.

    ``recency_days`` counts from the last revenue order ever; ``frequency`` and
    ``monetary_cents`` cover the scoring window only; money is in ``currency`` (the
    shop's main currency).
    """

    customer: str
    recency_days: int
    frequency: int
    monetary_cents: int
    currency: str
    r: int
    f: int
    m: int
    segment: Segment


class CustomerProfile(msgspec.Struct, frozen=True, kw_only=True):
    """The agent's sidebar for one customer in one shop.

    Membership (level, points, VIP), opt-out and channels are merchant-wide; tags,
    segment, orders and lifetime value are scoped to ``shop``.
    ``lifetime_value`` maps currency -> minor units of revenue orders in this shop.
    """

    customer: str
    shop: str
    display_name: str
    timezone: str
    opt_out: bool
    member_level: int
    is_vip: bool
    points: int
    tags: tuple[Tag, ...]
    segment: Segment | None
    rfm: RfmScore | None
    recent_orders: tuple[OrderInfo, ...]
    order_count: int
    lifetime_value: dict[str, int]
    channels: tuple[Identity, ...]
