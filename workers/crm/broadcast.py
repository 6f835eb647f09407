"""Targeted broadcasts (定向群发): who gets a marketing message, and when.

Theory of operation
-------------------
A broadcast sends one message to the customers of one RFM segment of a shop, as of
the shop's last ``RfmScorer.score_shop`` run. Planning is separate from sending: the
planner computes a ``BroadcastPlan`` - a list of ``(customer, send_at)`` - and never
writes anything; a sender works through the plan and calls ``mark_sent`` after each
delivered message. The plan is a pure function of the stored rows and ``now``.

Who
    ``customers_in_segment(shop, segment)`` minus customers who opted out (reported
    in ``skipped_opted_out``) minus customers the broadcast log says already got
    ``broadcast_id`` (``skipped_already_sent``). Because of the last rule, planning
    the same ``broadcast_id`` again after a crash, a restart or a partial run only
    covers the customers still owed the message: nobody gets it twice.

When - the customer's local window
    Each customer gets the message inside *their* local sending window,
    ``[start_hour:00, end_hour:00)`` in the customer's timezone (default 09-21;
    ``zoneinfo``, so DST is handled). A customer whose window is open at ``now`` is
    eligible from ``now``; otherwise from the next opening. Windows must not wrap
    midnight (``0 <= start < end <= 24``).

How fast - the rate limit
    Sends go out at most ``rate_per_minute`` per minute, so a broadcast never floods
    the gateway or the agents' queues (replies to a broadcast arrive as live chats).
    The planner places sends on a grid of slots ``now + k * spacing`` with
    ``spacing = ceil(60 s / rate_per_minute)`` (whole microseconds, rounded up), one
    send per slot: any 60-second interval then holds at most ``rate_per_minute``
    sends, and they are spread evenly rather than bursting at the top of a minute.
    Customers are placed greedily in order of eligibility (then customer id): each
    takes the first free slot at or after their eligibility; if that slot falls
    after their window closes they move to their next window. Customers in different
    timezones thus share the rate. Slots are anchored at ``now``, so a send that waits
    for a window to open goes out on the first slot after the opening (at most one
    spacing late: 3 s at the default rate).

Determinism
    Same store contents + same ``now`` + same arguments = same plan.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from workers.crm.models import DEFAULT_TIMEZONE, Segment, parse_segment
from workers.crm.repository import CrmStore, check_id

#: Local sending window (start hour inclusive, end hour exclusive).
DEFAULT_WINDOW: Final = (9, 21)

#: Default sends per minute: slow enough that replies never starve live chats.
DEFAULT_RATE_PER_MINUTE: Final = 20

#: Upper bound of ``rate_per_minute`` accepted (10 per second).
MAX_RATE_PER_MINUTE: Final = 600

_MINUTE_US: Final = 60_000_000
_US: Final = timedelta(microseconds=1)


class PlannedSend(msgspec.Struct, frozen=True, kw_only=True):
    customer: str
    send_at: datetime
    """UTC."""
    timezone: str
    local_send_at: datetime
    """``send_at`` in the customer's timezone (for display)."""


class BroadcastPlan(msgspec.Struct, frozen=True, kw_only=True):
    broadcast_id: str
    shop: str
    segment: Segment
    message: str
    planned_at: datetime
    window: tuple[int, int]
    rate_per_minute: int
    sends: tuple[PlannedSend, ...]
    """Ordered by ``send_at``."""
    skipped_opted_out: tuple[str, ...]
    skipped_already_sent: tuple[str, ...]

    @property
    def recipients(self) -> list[str]:
        return [s.customer for s in self.sends]

    @property
    def finishes_at(self) -> datetime | None:
        return self.sends[-1].send_at if self.sends else None


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo(DEFAULT_TIMEZONE)


def _local_instant(day: date, hour: int, tz: ZoneInfo) -> datetime:
    """``day`` at ``hour``:00 local time (24 = next midnight), as UTC."""
    if hour == 24:
        day, hour = day + timedelta(days=1), 0
    return datetime.combine(day, time(hour), tzinfo=tz).astimezone(UTC)


def next_window_start(t: datetime, tz: ZoneInfo, window: tuple[int, int]) -> datetime:
    """The earliest instant ``>= t`` inside the local window (``t`` itself if open)."""
    start, end = window
    today = t.astimezone(tz).date()
    for offset in range(3):
        day = today + timedelta(days=offset)
        opens, closes = _local_instant(day, start, tz), _local_instant(day, end, tz)
        if t < closes and opens < closes:
            return max(t, opens)
    raise AssertionError("unreachable: a window opens every day")  # pragma: no cover


def in_window(t: datetime, tz: ZoneInfo, window: tuple[int, int]) -> bool:
    return next_window_start(t, tz, window) == t


def check_window(window: tuple[int, int]) -> tuple[int, int]:
    start, end = window
    if not 0 <= start < end <= 24:
        raise ValueError(
            f"window must be (start, end) hours with 0 <= start < end <= 24, got {window!r}"
        )
    return window


class _Slots:
    """Slot ``k`` is ``base + k * spacing``; each slot holds one send."""

    def __init__(self, base: datetime, rate_per_minute: int) -> None:
        self.base = base
        self.spacing_us = -(-_MINUTE_US // rate_per_minute)
        self._next: dict[int, int] = {}  # taken slot -> a later candidate (union-find)

    def first_at_or_after(self, t: datetime) -> int:
        """Index of the first slot not before ``t`` (taken or not)."""
        return max(0, -(-((t - self.base) // _US) // self.spacing_us))

    def free(self, k: int) -> int:
        """The first free slot ``>= k``."""
        root = k
        while root in self._next:
            root = self._next[root]
        while k in self._next and self._next[k] != root:  # path compression
            self._next[k], k = root, self._next[k]
        return root

    def take(self, k: int) -> None:
        self._next[k] = k + 1

    def at(self, k: int) -> datetime:
        return self.base + timedelta(microseconds=k * self.spacing_us)


class BroadcastPlanner:
    def __init__(self, store: CrmStore) -> None:
        self._store = store

    def plan_broadcast(
        self,
        shop: str,
        segment: Segment | str,
        message: str,
        now: datetime,
        *,
        window: tuple[int, int] = DEFAULT_WINDOW,
        rate_per_minute: int = DEFAULT_RATE_PER_MINUTE,
        broadcast_id: str,
    ) -> BroadcastPlan:
        """Plan ``broadcast_id`` (see the module docstring). Writes nothing."""
        seg = parse_segment(segment)
        check_window(window)
        check_id(broadcast_id, "broadcast_id")
        if not message.strip():
            raise ValueError("empty broadcast message")
        if not 1 <= rate_per_minute <= MAX_RATE_PER_MINUTE:
            raise ValueError(f"rate_per_minute must be 1..{MAX_RATE_PER_MINUTE}")
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be timezone-aware")
        now = now.astimezone(UTC)

        store = self._store
        already = store.sent_customers(broadcast_id)
        opted_out: list[str] = []
        skipped_sent: list[str] = []
        pending: list[tuple[datetime, str, ZoneInfo]] = []
        for customer_id in store.customers_in_segment(shop, seg):
            customer = store.customer(customer_id)
            if customer is None:
                continue
            if customer.opt_out:
                opted_out.append(customer_id)
                continue
            if customer_id in already:
                skipped_sent.append(customer_id)
                continue
            tz = _zone(customer.timezone)
            pending.append((next_window_start(now, tz, window), customer_id, tz))
        pending.sort(key=lambda p: (p[0], p[1]))

        slots = _Slots(now, rate_per_minute)
        sends: list[PlannedSend] = []
        for eligible, customer_id, tz in pending:
            while True:
                k = slots.free(slots.first_at_or_after(eligible))
                at = slots.at(k)
                if in_window(at, tz, window):
                    break
                eligible = next_window_start(at, tz, window)
            slots.take(k)
            sends.append(
                PlannedSend(
                    customer=customer_id,
                    send_at=at,
                    timezone=tz.key,
                    local_send_at=at.astimezone(tz),
                )
            )
        sends.sort(key=lambda s: (s.send_at, s.customer))
        return BroadcastPlan(
            broadcast_id=broadcast_id,
            shop=shop,
            segment=seg,
            message=message,
            planned_at=now,
            window=window,
            rate_per_minute=rate_per_minute,
            sends=tuple(sends),
            skipped_opted_out=tuple(opted_out),
            skipped_already_sent=tuple(skipped_sent),
        )

    def mark_sent(self, broadcast_id: str, customer: str, sent_at: datetime) -> bool:
        """Record a delivered message so re-planning skips ``customer``."""
        return self._store.mark_sent(broadcast_id, customer, sent_at)
