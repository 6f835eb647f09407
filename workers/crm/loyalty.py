"""Membership: points earned from paid orders, member levels, VIP.

Membership is merchant-wide (one CRM database per merchant; its shops share one
programme), so points and levels live on the unified customer, not per shop.

Points
    An order earns ``amount * POINTS_PER_MAJOR_UNIT[currency]`` points (rounded down)
    once it reaches a revenue status (paid/shipped/delivered/completed). The grant is
    a ledger entry whose ``ref`` names the order, so accruing again is a no-op. When
    a granted order becomes refunded or cancelled the grant is reversed exactly once
    (an order that is paid again after that does not earn again; later amount edits
    do not change a grant).
    Currencies missing from the table earn nothing (the merchant adds a rate).

Levels
    The level follows *qualifying points*: grants minus reversals, ignoring manual
    bonuses and redemptions (spending points must not demote anyone). Levels only go
    up automatically; a demotion is a deliberate ``set_level`` by staff. A level set by
    hand above the computed one is kept.

VIP
    ``member_level >= VIP_MIN_LEVEL``. Routing uses it for "VIP first".
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Final

import msgspec

from workers.crm.models import REVENUE_STATUSES, REVERSAL_STATUSES, Order

if TYPE_CHECKING:
    from workers.crm.repository import CrmStore

#: Points per major currency unit (per yuan, per dollar). Programme rates chosen by
#: the merchant, deliberately not exchange rates.
POINTS_PER_MAJOR_UNIT: Final[Mapping[str, int]] = {
    "CNY": 1,
    "HKD": 1,
    "USD": 7,
    "EUR": 8,
    "GBP": 9,
}

#: Minor units per major unit, for currencies whose exponent is not 2.
MINOR_UNITS_PER_MAJOR: Final[Mapping[str, int]] = {"JPY": 1, "KRW": 1}
_DEFAULT_MINOR_UNITS: Final = 100

#: Minimum qualifying points for each level; index = level.
LEVEL_THRESHOLDS: Final = (0, 500, 2_000, 5_000, 20_000)

#: Level names as shown to agents and customers; index = level.
LEVEL_NAMES_ZH: Final = ("普通会员", "铜牌会员", "银牌会员", "金牌会员", "钻石会员")

MAX_LEVEL: Final = len(LEVEL_THRESHOLDS) - 1

#: Customers at or above this level are VIPs (routed first, ``vip`` tag).
VIP_MIN_LEVEL: Final = 3

#: Ledger entry kinds. ``earn`` and ``reverse`` are qualifying; the others are not.
POINTS_KIND_EARN: Final = "earn"
POINTS_KIND_REVERSE: Final = "reverse"
POINTS_KIND_MANUAL: Final = "manual"
POINTS_KIND_REDEEM: Final = "redeem"
POINTS_KINDS: Final = frozenset(
    {POINTS_KIND_EARN, POINTS_KIND_REVERSE, POINTS_KIND_MANUAL, POINTS_KIND_REDEEM}
)
QUALIFYING_KINDS: Final = frozenset({POINTS_KIND_EARN, POINTS_KIND_REVERSE})


def points_for(amount_cents: int, currency: str) -> int:
    """Points an order of this amount earns (0 for currencies without a rate)."""
    rate = POINTS_PER_MAJOR_UNIT.get(currency, 0)
    return amount_cents * rate // MINOR_UNITS_PER_MAJOR.get(currency, _DEFAULT_MINOR_UNITS)


def level_for(qualifying_points: int) -> int:
    """Highest level whose threshold ``qualifying_points`` reaches."""
    level = 0
    for candidate, threshold in enumerate(LEVEL_THRESHOLDS):
        if qualifying_points >= threshold:
            level = candidate
    return level


def is_vip(member_level: int) -> bool:
    return member_level >= VIP_MIN_LEVEL


def earn_ref(shop: str, order_id: str) -> str:
    """Idempotency key of the grant for one order (length-prefixed: ids may hold ':')."""
    return f"{POINTS_KIND_EARN}:{len(shop)}:{shop}:{order_id}"


def reverse_ref(shop: str, order_id: str) -> str:
    return f"{POINTS_KIND_REVERSE}:{len(shop)}:{shop}:{order_id}"


class PointsChange(msgspec.Struct, frozen=True, kw_only=True):
    customer: str
    order_id: str
    delta: int


class LevelChange(msgspec.Struct, frozen=True, kw_only=True):
    customer: str
    old_level: int
    new_level: int


class AccrualResult(msgspec.Struct, frozen=True, kw_only=True):
    points: tuple[PointsChange, ...]
    levels: tuple[LevelChange, ...]


class LoyaltyEngine:
    """Applies the points/level policy above to a store; safe to run repeatedly."""

    def __init__(self, store: CrmStore) -> None:
        self._store = store

    def accrue(self, shop: str, now: datetime) -> AccrualResult:
        """Grant points for paid orders of ``shop`` created up to ``now``, reverse points
        of refunded/cancelled ones, then raise levels of the customers touched."""
        changes: list[PointsChange] = []
        touched: set[str] = set()
        for order in self._store.shop_orders(shop):
            if order.created_at > now:
                continue
            change = self._settle(order, now)
            if change is not None:
                changes.append(change)
                touched.add(order.customer)
        levels = [c for c in map(self.update_level, sorted(touched)) if c is not None]
        return AccrualResult(points=tuple(changes), levels=tuple(levels))

    def _settle(self, order: Order, now: datetime) -> PointsChange | None:
        store = self._store
        ref = earn_ref(order.shop, order.order_id)
        if order.status in REVENUE_STATUSES:
            points = points_for(order.amount_cents, order.currency)
            if points > 0 and store.add_points(
                order.customer, points, kind=POINTS_KIND_EARN, ref=ref, at=now
            ):
                return PointsChange(customer=order.customer, order_id=order.order_id, delta=points)
        elif order.status in REVERSAL_STATUSES:
            granted = store.points_entry(ref)
            if granted is not None and store.add_points(
                granted.customer,
                -granted.delta,
                kind=POINTS_KIND_REVERSE,
                ref=reverse_ref(order.shop, order.order_id),
                at=now,
                allow_negative=True,
            ):
                return PointsChange(
                    customer=granted.customer, order_id=order.order_id, delta=-granted.delta
                )
        return None

    def update_level(self, customer: str) -> LevelChange | None:
        """Raise ``customer``'s level to what their qualifying points reach (never lower)."""
        current = self._store.customer(customer)
        if current is None:
            return None
        target = level_for(self._store.qualifying_points(customer))
        if target <= current.member_level:
            return None
        self._store.set_level(customer, target)
        return LevelChange(customer=customer, old_level=current.member_level, new_level=target)
