"""Business hours: schedules, time zones, holidays, next opening."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.bot.hours import BusinessHours, describe_back_at

SH = ZoneInfo("Asia/Shanghai")
BERLIN = ZoneInfo("Europe/Berlin")


def shanghai(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=SH)


HOURS = BusinessHours.parse(
    "Asia/Shanghai",
    {"daily": "closed", "mon-fri": "09:00-12:00, 13:30-18:00", "sat": ["10:00-16:00"]},
    holidays=["2025-10-01", date(2025, 10, 2)],
    special_days={"2025-11-11": "00:00-24:00"},
)


@pytest.mark.parametrize(
    ("now", "is_open"),
    [
        (shanghai(2025, 1, 3, 8, 59), False),  # Friday
        (shanghai(2025, 1, 3, 9, 0), True),
        (shanghai(2025, 1, 3, 12, 30), False),  # lunch
        (shanghai(2025, 1, 3, 17, 59, 59), True),
        (shanghai(2025, 1, 3, 18, 0), False),
        (shanghai(2025, 1, 4, 11, 0), True),  # Saturday
        (shanghai(2025, 1, 5, 11, 0), False),  # Sunday
        (shanghai(2025, 10, 1, 10, 0), False),  # National Day (a Wednesday)
        (shanghai(2025, 11, 11, 3, 0), True),  # 双十一, a Tuesday, open all night
        (datetime(2025, 1, 3, 1, 0, tzinfo=UTC), True),  # 09:00 in Shanghai
        (datetime(2025, 1, 3, 10, 0, tzinfo=UTC), False),  # 18:00 in Shanghai
    ],
)
def test_is_open(now: datetime, is_open: bool) -> None:
    assert HOURS.is_open(now) is is_open


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (shanghai(2025, 1, 3, 10, 0), shanghai(2025, 1, 3, 10, 0)),  # open: now
        (shanghai(2025, 1, 3, 12, 15), shanghai(2025, 1, 3, 13, 30)),
        (shanghai(2025, 1, 3, 20, 0), shanghai(2025, 1, 4, 10, 0)),
        (shanghai(2025, 1, 4, 17, 0), shanghai(2025, 1, 6, 9, 0)),  # Sat evening -> Monday
        (shanghai(2025, 9, 30, 19, 0), shanghai(2025, 10, 3, 9, 0)),  # over two holidays
    ],
)
def test_next_open(now: datetime, expected: datetime) -> None:
    assert HOURS.next_open(now) == expected


def test_overnight_shift_spills_into_the_next_day() -> None:
    night = BusinessHours.parse("Asia/Shanghai", {"fri": "20:00-02:00"})
    assert night.is_open(shanghai(2025, 1, 3, 23, 0))  # Friday
    assert night.is_open(shanghai(2025, 1, 4, 1, 59))  # Saturday, same shift
    assert not night.is_open(shanghai(2025, 1, 4, 2, 0))
    assert night.next_open(shanghai(2025, 1, 4, 3, 0)) == shanghai(2025, 1, 10, 20, 0)


def test_never_open() -> None:
    closed = BusinessHours.parse("Asia/Shanghai", {})
    assert not closed.is_open(shanghai(2025, 1, 3, 10, 0))
    assert closed.next_open(shanghai(2025, 1, 3, 10, 0)) is None


def test_dst_zone() -> None:
    berlin = BusinessHours.parse("Europe/Berlin", {"daily": "09:00-17:00"})
    # 2025-03-30 is the spring-forward day: 09:00 local is 07:00 UTC, not 08:00.
    assert berlin.is_open(datetime(2025, 3, 30, 7, 0, tzinfo=UTC))
    assert not berlin.is_open(datetime(2025, 3, 30, 6, 59, tzinfo=UTC))
    assert berlin.next_open(datetime(2025, 3, 30, 6, 0, tzinfo=UTC)) == datetime(
        2025, 3, 30, 9, 0, tzinfo=BERLIN
    )


@pytest.mark.parametrize(
    ("weekly", "fragment"),
    [
        ({"mon": "9-18"}, "not a range like 09:00-18:00"),
        ({"mon": "09:00-25:00"}, "not a valid time range"),
        ({"funday": "09:00-18:00"}, "unknown day"),
        ({"mon-xyz": "09:00-18:00"}, "unknown day range"),
    ],
)
def test_parse_errors(weekly: dict[str, str], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        BusinessHours.parse("Asia/Shanghai", weekly)


def test_naive_now_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        HOURS.is_open(datetime(2025, 1, 3, 10, 0))


@pytest.mark.parametrize(
    ("at", "language", "text"),
    [
        (shanghai(2025, 1, 3, 13, 30), "zh", "今天 13:30"),
        (shanghai(2025, 1, 4, 10, 0), "zh", "明天 10:00"),
        (shanghai(2025, 1, 6, 9, 0), "zh", "周一 09:00"),
        (shanghai(2025, 2, 3, 9, 0), "zh", "2月3日 09:00"),
        (shanghai(2025, 1, 4, 10, 0), "en", "tomorrow at 10:00 (UTC+08:00)"),
        (shanghai(2025, 1, 6, 9, 0), "en", "on Monday at 09:00 (UTC+08:00)"),
        (shanghai(2025, 2, 3, 9, 0), "en", "on 3 Feb at 09:00 (UTC+08:00)"),
        (datetime(2025, 1, 4, 9, 0, tzinfo=BERLIN), "zh", "明天 09:00（UTC+01:00）"),
    ],
)
def test_describe_back_at(at: datetime, language: str, text: str) -> None:
    now = shanghai(2025, 1, 3, 12, 0)
    assert describe_back_at(at, now, language) == text  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    st.datetimes(
        min_value=datetime(2024, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)
    )
)
def test_next_open_is_open_and_not_in_the_past(now: datetime) -> None:
    nxt = HOURS.next_open(now)
    assert nxt is not None
    assert nxt >= now
    assert HOURS.is_open(nxt)
    if nxt > now:
        # Closed just before it opens (it is the *next* opening, not a later one).
        assert not HOURS.is_open(nxt - timedelta(minutes=1))
