"""When a shop's human agents are working: per-shop time zone, a weekly schedule,
holidays and special days (e.g. extended hours for 双十一).

Times are minutes since local midnight; an interval ``[start, end)`` may run
past midnight (``22:00-02:00``): the part after midnight belongs to the next
calendar day, even if that day is a holiday (the shift started the night
before). All ``now`` arguments must be timezone-aware.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo

from .matching import Language

__all__ = ["LOOKAHEAD_DAYS", "BusinessHours", "describe_back_at", "require_aware"]

LOOKAHEAD_DAYS = 400
"""How far :meth:`BusinessHours.next_open` searches (a year of holidays and then some)."""

MINUTES_PER_DAY = 24 * 60

Interval = tuple[int, int]
"""``(start, end)`` minutes since local midnight, ``0 <= start < end <= 2 * 1440``."""

_DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RANGE_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_ZH_WEEKDAYS = ("周一", "周二", "周三", "周四", "周五", "周六", "周日")
_EN_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_EN_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_CHINA_OFFSET = timedelta(hours=8)


def require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got naive {now.isoformat()}")


def _parse_ranges(spec: str | Sequence[str], where: str) -> tuple[Interval, ...]:
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[Interval] = []
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part or part.lower() == "closed":
                continue
            m = _RANGE_RE.match(part)
            if m is None:
                raise ValueError(f"{where}: {part!r} is not a range like 09:00-18:00")
            h1, m1, h2, m2 = (int(g) for g in m.groups())
            if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
                raise ValueError(f"{where}: {part!r} is not a valid time range")
            start, end = h1 * 60 + m1, h2 * 60 + m2
            if end <= start:
                end += MINUTES_PER_DAY  # runs past midnight
            out.append((start, end))
    return tuple(sorted(out))


def _parse_days(key: str) -> list[int]:
    key = key.strip().lower()
    if key in ("daily", "everyday", "all"):
        return list(range(7))
    days: list[int] = []
    for part in key.split(","):
        part = part.strip()
        if "-" in part:
            first, last = (p.strip()[:3] for p in part.split("-", 1))
            if first not in _DAY_NAMES or last not in _DAY_NAMES:
                raise ValueError(f"unknown day range {part!r} (use mon..sun)")
            i, j = _DAY_NAMES.index(first), _DAY_NAMES.index(last)
            days.extend(range(i, j + 1) if i <= j else [*range(i, 7), *range(0, j + 1)])
        else:
            if part[:3] not in _DAY_NAMES:
                raise ValueError(f"unknown day {part!r} (use mon..sun)")
            days.append(_DAY_NAMES.index(part[:3]))
    return days


def _as_date(value: date | str) -> date:
    return value if isinstance(value, date) else date.fromisoformat(value)


@dataclass(frozen=True, slots=True)
class BusinessHours:
    zone: tzinfo
    weekly: tuple[tuple[Interval, ...], ...]
    """Seven schedules, Monday first."""
    holidays: frozenset[date] = frozenset()
    special_days: Mapping[date, tuple[Interval, ...]] = field(default_factory=dict)
    """Dates with their own hours; they win over ``weekly`` and ``holidays``."""

    def __post_init__(self) -> None:
        if len(self.weekly) != 7:
            raise ValueError("weekly needs 7 schedules, Monday first")
        for schedule in (*self.weekly, *self.special_days.values()):
            for start, end in schedule:
                if not 0 <= start < end <= 2 * MINUTES_PER_DAY or start >= MINUTES_PER_DAY:
                    raise ValueError(f"bad interval {(start, end)}")

    @classmethod
    def parse(
        cls,
        timezone: str,
        weekly: Mapping[str, str | Sequence[str]],
        *,
        holidays: Iterable[date | str] = (),
        special_days: Mapping[date | str, str | Sequence[str]] | None = None,
    ) -> BusinessHours:
        """From config-style values::

            BusinessHours.parse("Asia/Shanghai",
                                {"mon-fri": "09:00-18:00", "sat": "10:00-16:00"},
                                holidays=["2025-10-01"],
                                special_days={"2025-11-11": "00:00-24:00"})

        Day keys: ``mon``..``sun``, ranges ``mon-fri``, lists ``sat,sun``, ``daily``;
        later keys override earlier ones. Values: ``"09:00-12:00, 13:30-18:00"``
        or a list of ranges; ``""``/``"closed"`` for closed; ``22:00-02:00`` runs past
        midnight; ``24:00`` is midnight at the end of the day.
        """
        zone = ZoneInfo(timezone)
        days: list[tuple[Interval, ...]] = [()] * 7
        for key, spec in weekly.items():
            ranges = _parse_ranges(spec, f"weekly[{key!r}]")
            for day in _parse_days(key):
                days[day] = ranges
        special = {
            _as_date(day): _parse_ranges(spec, f"special_days[{day!r}]")
            for day, spec in (special_days or {}).items()
        }
        return cls(zone, tuple(days), frozenset(_as_date(d) for d in holidays), special)

    def _own(self, day: date) -> tuple[Interval, ...]:
        if day in self.special_days:
            return self.special_days[day]
        if day in self.holidays:
            return ()
        return self.weekly[day.weekday()]

    def intervals(self, day: date) -> list[Interval]:
        """Open intervals on a local calendar day, within ``[0, 1440]``."""
        out = [(s, min(e, MINUTES_PER_DAY)) for s, e in self._own(day)]
        out += [
            (0, e - MINUTES_PER_DAY)
            for _, e in self._own(day - timedelta(days=1))
            if e > MINUTES_PER_DAY
        ]
        return sorted(out)

    def local(self, now: datetime) -> datetime:
        require_aware(now)
        return now.astimezone(self.zone)

    def is_open(self, now: datetime) -> bool:
        local = self.local(now)
        minute = local.hour * 60 + local.minute
        return any(s <= minute < e for s, e in self.intervals(local.date()))

    def next_open(self, now: datetime) -> datetime | None:
        """``now`` (in the shop's zone) if open, else the next opening, else ``None``
        (nothing scheduled within :data:`LOOKAHEAD_DAYS`)."""
        local = self.local(now)
        if self.is_open(now):
            return local
        for offset in range(LOOKAHEAD_DAYS + 1):
            day = local.date() + timedelta(days=offset)
            for start, _ in self.intervals(day):
                at = datetime.combine(day, time(start // 60, start % 60), tzinfo=self.zone)
                if at > local:
                    return at
        return None


def describe_back_at(at: datetime, now: datetime, language: Language) -> str:
    """A short phrase for when humans are back, relative to ``now`` in ``at``'s zone:
    ``今天 18:00`` / ``明天 09:00`` / ``周一 09:00`` / ``10月8日 09:00``, or
    ``today at 18:00 (UTC+08:00)`` / ``on Monday at 09:00 (UTC+08:00)`` ... English
    always names the UTC offset (cross-border customers); Chinese only when it is
    not China time."""
    require_aware(at)
    today = now.astimezone(at.tzinfo).date()
    days = (at.date() - today).days
    clock = f"{at.hour:02d}:{at.minute:02d}"
    offset = at.utcoffset() or timedelta(0)
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    utc = f"UTC{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    if language == "zh":
        if days == 0:
            when = f"今天 {clock}"
        elif days == 1:
            when = f"明天 {clock}"
        elif 1 < days < 7:
            when = f"{_ZH_WEEKDAYS[at.weekday()]} {clock}"
        else:
            when = f"{at.month}月{at.day}日 {clock}"
        return when if offset == _CHINA_OFFSET else f"{when}（{utc}）"
    if days == 0:
        when = f"today at {clock}"
    elif days == 1:
        when = f"tomorrow at {clock}"
    elif 1 < days < 7:
        when = f"on {_EN_WEEKDAYS[at.weekday()]} at {clock}"
    else:
        when = f"on {at.day} {_EN_MONTHS[at.month - 1]} at {clock}"
    return f"{when} ({utc})"
