from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.workers.crm.factories import NOW, OTHER_SHOP, SHOP, add_customer, add_orders
from workers.crm.broadcast import (
    DEFAULT_RATE_PER_MINUTE,
    DEFAULT_WINDOW,
    BroadcastPlan,
    BroadcastPlanner,
)
from workers.crm.models import Segment
from workers.crm.repository import CrmRepository
from workers.crm.rfm import RfmScorer

SHANGHAI = "Asia/Shanghai"
LOS_ANGELES = "America/Los_Angeles"
MADRID = "Europe/Madrid"

CHAMPION_ORDERS = [5, 40, 80, 120]  # with ¥1,500 each: R5 F4 M5 -> champions


def champion(repo: CrmRepository, customer: str, timezone: str, *, shop: str = SHOP) -> str:
    add_customer(repo, customer, timezone=timezone)
    add_orders(
        repo,
        customer,
        CHAMPION_ORDERS,
        amount_cents=150_000,
        shop=shop,
        prefix=f"{shop}-{customer}",
    )
    return customer


@pytest.fixture
def segment_repo(repo: CrmRepository) -> CrmRepository:
    """Champions in three timezones, one opted out, plus customers who must not be reached."""
    champion(repo, "sh-1", SHANGHAI)
    champion(repo, "sh-2", SHANGHAI)
    champion(repo, "la-1", LOS_ANGELES)
    champion(repo, "md-1", MADRID)
    champion(repo, "sh-optout", SHANGHAI)
    repo.set_opt_out("sh-optout")
    add_customer(repo, "newbie")  # a "new" customer, not a champion
    add_orders(repo, "newbie", [3], amount_cents=10_000)
    champion(repo, "elsewhere", MADRID, shop=OTHER_SHOP)  # a champion of another shop
    RfmScorer(repo).score_shop(SHOP, NOW)
    RfmScorer(repo).score_shop(OTHER_SHOP, NOW)
    return repo


def plan(
    repo: CrmRepository,
    now: datetime = NOW,
    *,
    window: tuple[int, int] = DEFAULT_WINDOW,
    rate_per_minute: int = DEFAULT_RATE_PER_MINUTE,
    broadcast_id: str = "spring-2024",
) -> BroadcastPlan:
    return BroadcastPlanner(repo).plan_broadcast(
        SHOP,
        Segment.CHAMPIONS,
        "春季新品 8 折 / Spring sale",
        now,
        window=window,
        rate_per_minute=rate_per_minute,
        broadcast_id=broadcast_id,
    )


def local_hour(at: datetime, timezone: str) -> float:
    local = at.astimezone(ZoneInfo(timezone))
    return local.hour + local.minute / 60 + local.second / 3600


def max_in_any_minute(times: list[datetime]) -> int:
    """Largest number of ``times`` inside any half-open 60-second interval."""
    ordered = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] >= timedelta(minutes=1):
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def test_reaches_exactly_the_segment_minus_opted_out(segment_repo: CrmRepository) -> None:
    result = plan(segment_repo)
    assert sorted(result.recipients) == ["la-1", "md-1", "sh-1", "sh-2"]
    assert result.skipped_opted_out == ("sh-optout",)
    assert result.skipped_already_sent == ()
    assert result.segment is Segment.CHAMPIONS
    assert (result.window, result.planned_at) == (DEFAULT_WINDOW, NOW)


def test_each_customer_is_reached_in_their_local_window(segment_repo: CrmRepository) -> None:
    result = plan(segment_repo, rate_per_minute=20)
    by_customer = {s.customer: s for s in result.sends}
    for send in result.sends:
        assert 9 <= local_hour(send.send_at, send.timezone) < 21, send
        assert send.send_at >= NOW
        assert send.local_send_at == send.send_at
        assert (
            send.local_send_at.utcoffset()
            == send.send_at.astimezone(ZoneInfo(send.timezone)).utcoffset()
        )
    # 10:00 in Shanghai and 18:00 in Los Angeles: windows open, sent right away
    # (one send every 3 s at 20 per minute; ties in eligibility go by customer id)
    assert by_customer["la-1"].send_at == NOW
    assert by_customer["sh-1"].send_at == NOW + timedelta(seconds=3)
    assert by_customer["sh-2"].send_at == NOW + timedelta(seconds=6)
    # 03:00 in Madrid: waits for 09:00 CET = 08:00 UTC
    assert by_customer["md-1"].send_at == datetime(2024, 3, 5, 8, 0, tzinfo=UTC)
    assert by_customer["md-1"].local_send_at.hour == 9
    assert [s.send_at for s in result.sends] == sorted(s.send_at for s in result.sends)
    assert result.finishes_at == by_customer["md-1"].send_at


def test_a_closed_window_waits_for_the_next_local_morning(segment_repo: CrmRepository) -> None:
    late = datetime(2024, 3, 5, 14, 30, tzinfo=UTC)  # 22:30 Shanghai, 06:30 LA, 15:30 Madrid
    sends = {s.customer: s.send_at for s in plan(segment_repo, late).sends}
    assert sends["md-1"] == late
    assert sends["la-1"] == datetime(2024, 3, 5, 17, 0, tzinfo=UTC)  # 09:00 PST
    assert sends["sh-1"] == datetime(2024, 3, 6, 1, 0, tzinfo=UTC)  # 09:00 CST next day
    assert sends["sh-2"] == datetime(2024, 3, 6, 1, 0, 3, tzinfo=UTC)


def test_windows_follow_daylight_saving_time(segment_repo: CrmRepository) -> None:
    # Saturday 2024-03-09 22:00 PST; Los Angeles springs forward on Sunday 02:00
    before_dst = datetime(2024, 3, 10, 6, 0, tzinfo=UTC)
    sends = {s.customer: s for s in plan(segment_repo, before_dst).sends}
    assert sends["la-1"].send_at == datetime(2024, 3, 10, 16, 0, tzinfo=UTC)  # 09:00 PDT
    assert sends["la-1"].local_send_at.hour == 9
    # Madrid springs forward on 2024-03-31: 09:00 CEST is 07:00 UTC
    madrid_dst = datetime(2024, 3, 31, 0, 0, tzinfo=UTC)
    sends = {s.customer: s for s in plan(segment_repo, madrid_dst).sends}
    assert sends["md-1"].send_at == datetime(2024, 3, 31, 7, 0, tzinfo=UTC)


def test_a_custom_window(segment_repo: CrmRepository) -> None:
    result = plan(segment_repo, window=(19, 20))
    for send in result.sends:
        assert 19 <= local_hour(send.send_at, send.timezone) < 20
    sends = {s.customer: s.send_at for s in result.sends}
    assert sends["sh-1"] == datetime(2024, 3, 5, 11, 0, tzinfo=UTC)
    assert sends["la-1"] == datetime(2024, 3, 5, 3, 0, tzinfo=UTC)  # 19:00 PST, still Mar 4
    assert sends["md-1"] == datetime(2024, 3, 5, 18, 0, tzinfo=UTC)


def test_the_rate_limit_spreads_sends(repo: CrmRepository) -> None:
    for n in range(40):
        champion(repo, f"sh-{n:02}", SHANGHAI)
    RfmScorer(repo).score_shop(SHOP, NOW)
    result = plan(repo, rate_per_minute=7)

    times = [s.send_at for s in result.sends]
    assert len(times) == 40
    assert max_in_any_minute(times) == 7
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= timedelta(minutes=1) / 7
    assert times[-1] - times[0] < timedelta(minutes=6), "but not slower than needed"


def test_sends_that_would_overrun_the_window_move_to_the_next_day(repo: CrmRepository) -> None:
    for n in range(3):
        champion(repo, f"la-{n}", LOS_ANGELES)
    RfmScorer(repo).score_shop(SHOP, NOW)
    almost_closing = datetime(2024, 3, 6, 4, 58, 30, tzinfo=UTC)  # 20:58:30 PST
    sends = plan(repo, almost_closing, rate_per_minute=1).sends
    assert [s.send_at for s in sends] == [
        almost_closing,
        almost_closing + timedelta(minutes=1),
        # 09:00 PST the next morning, on the first slot of the one-per-minute grid
        datetime(2024, 3, 6, 17, 0, 30, tzinfo=UTC),
    ]


def test_replanning_after_partial_sends_does_not_resend(segment_repo: CrmRepository) -> None:
    planner = BroadcastPlanner(segment_repo)
    first = plan(segment_repo)
    delivered = first.sends[:2]
    for send in delivered:
        assert planner.mark_sent("spring-2024", send.customer, send.send_at)
    assert not planner.mark_sent("spring-2024", delivered[0].customer, NOW), "recorded once"

    resumed_at = NOW + timedelta(minutes=5)
    second = plan(segment_repo, resumed_at)
    assert set(second.skipped_already_sent) == {s.customer for s in delivered}
    assert set(second.recipients).isdisjoint(second.skipped_already_sent)
    assert set(second.recipients) | {s.customer for s in delivered} == set(first.recipients)
    assert all(s.send_at >= resumed_at for s in second.sends)

    for send in second.sends:
        planner.mark_sent("spring-2024", send.customer, send.send_at)
    assert plan(segment_repo, resumed_at + timedelta(days=1)).sends == ()
    # another broadcast id is a different campaign
    assert len(plan(segment_repo, broadcast_id="summer-2024").sends) == 4


def test_planning_is_deterministic_and_writes_nothing(segment_repo: CrmRepository) -> None:
    assert plan(segment_repo) == plan(segment_repo)
    assert segment_repo.sent_customers("spring-2024") == set()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": (21, 9)}, "window"),
        ({"window": (9, 25)}, "window"),
        ({"rate_per_minute": 0}, "rate"),
        ({"broadcast_id": ""}, "broadcast_id"),
    ],
)
def test_bad_arguments(segment_repo: CrmRepository, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan(segment_repo, **kwargs)


def test_naive_now_and_unknown_segment_are_rejected(segment_repo: CrmRepository) -> None:
    planner = BroadcastPlanner(segment_repo)
    with pytest.raises(ValueError, match="aware"):
        planner.plan_broadcast(SHOP, "champions", "hi", NOW.replace(tzinfo=None), broadcast_id="b")
    with pytest.raises(ValueError, match="segment"):
        planner.plan_broadcast(SHOP, "vips", "hi", NOW, broadcast_id="b")


def test_invariants_hold_for_any_time_rate_and_window(tmp_path: Path) -> None:
    """Across DST changes and midnights: every send in its local window, never before
    ``now``, never more than the rate in any minute, everyone exactly once."""
    with CrmRepository(tmp_path / "crm.db", clock=lambda: NOW) as repo:
        zones = [SHANGHAI, LOS_ANGELES, MADRID]
        for n in range(12):
            champion(repo, f"c{n:02}", zones[n % 3])
        RfmScorer(repo).score_shop(SHOP, NOW)
        expected = set(repo.customers_in_segment(SHOP, Segment.CHAMPIONS))

        @settings(max_examples=150, deadline=None, database=None)
        @given(
            now=st.datetimes(
                min_value=datetime(2024, 1, 1),
                max_value=datetime(2025, 12, 31),
                timezones=st.just(UTC),
            ),
            rate=st.integers(min_value=1, max_value=120),
            start=st.integers(min_value=0, max_value=23),
            length=st.integers(min_value=1, max_value=24),
        )
        def check(now: datetime, rate: int, start: int, length: int) -> None:
            window = (start, min(24, start + length))
            result = plan(repo, now, rate_per_minute=rate, window=window)
            assert {s.customer for s in result.sends} == expected
            assert len(result.sends) == len(expected)
            for send in result.sends:
                assert send.send_at >= now
                hour = local_hour(send.send_at, send.timezone)
                assert window[0] <= hour < window[1], (send, window)
                assert send.send_at - now < timedelta(days=2)
            assert max_in_any_minute([s.send_at for s in result.sends]) <= rate

        check()
