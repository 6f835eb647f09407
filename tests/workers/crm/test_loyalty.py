from __future__ import annotations

import msgspec
import pytest

from tests.workers.crm.factories import NOW, SHOP, add_customer, make_order
from workers.crm.loyalty import (
    LEVEL_THRESHOLDS,
    VIP_MIN_LEVEL,
    LoyaltyEngine,
    earn_ref,
    is_vip,
    level_for,
    points_for,
)
from workers.crm.repository import CrmRepository


def test_points_rate_per_currency() -> None:
    assert points_for(299_90, "CNY") == 299  # 1 point per yuan, rounded down
    assert points_for(100_00, "USD") == 700
    assert points_for(5_000, "JPY") == 0, "no programme rate -> no points"


def test_level_thresholds_and_vip() -> None:
    assert LEVEL_THRESHOLDS == (0, 500, 2_000, 5_000, 20_000)
    assert [level_for(p) for p in (0, 499, 500, 1_999, 2_000, 4_999, 5_000, 10**9)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        4,
    ]
    assert VIP_MIN_LEVEL == 3
    assert not is_vip(2)
    assert is_vip(3)


def test_paid_orders_earn_points_once_and_raise_the_level(repo: CrmRepository) -> None:
    add_customer(repo, "c1")
    repo.upsert_orders(
        [
            make_order("A", "c1", amount_cents=3_000_00, status="completed"),
            make_order("B", "c1", amount_cents=2_500_00, status="paid"),
            make_order("C", "c1", amount_cents=9_999_00, status="pending_payment"),
            make_order("D", "c1", amount_cents=9_999_00, status="refunding"),
            make_order("E", "c1", amount_cents=100_00, status="shipped", currency="USD"),
        ]
    )
    engine = LoyaltyEngine(repo)
    result = engine.accrue(SHOP, NOW)

    assert sorted((c.order_id, c.delta) for c in result.points) == [
        ("A", 3_000),
        ("B", 2_500),
        ("E", 700),
    ]
    assert [(c.old_level, c.new_level) for c in result.levels] == [(0, 3)]
    customer = repo.customer("c1")
    assert customer is not None
    assert (customer.points, customer.member_level) == (6_200, 3)
    assert repo.is_vip("c1")

    again = engine.accrue(SHOP, NOW)
    assert again.points == () and again.levels == ()
    entry = repo.points_entry(earn_ref(SHOP, "A"))
    assert entry is not None
    assert (entry.customer, entry.delta, entry.kind, entry.at) == ("c1", 3_000, "earn", NOW)


def test_refunds_take_points_back_but_never_demote(repo: CrmRepository) -> None:
    add_customer(repo, "c1")
    repo.upsert_orders(
        [make_order("A", "c1", amount_cents=3_000_00), make_order("B", "c1", amount_cents=2_500_00)]
    )
    engine = LoyaltyEngine(repo)
    engine.accrue(SHOP, NOW)
    repo.add_points("c1", -5_000, kind="redeem")  # spending points is not a demotion

    refunded = msgspec.structs.replace(
        make_order("B", "c1", amount_cents=2_500_00), status="refunded", updated_at=NOW
    )
    repo.upsert_orders([refunded])
    result = engine.accrue(SHOP, NOW)

    assert [(c.order_id, c.delta) for c in result.points] == [("B", -2_500)]
    assert result.levels == ()
    customer = repo.customer("c1")
    assert customer is not None
    assert customer.points == 500 - 2_500, "a reversal may take the balance below zero"
    assert customer.member_level == 3, "levels only go up automatically"
    assert repo.qualifying_points("c1") == 3_000
    assert engine.accrue(SHOP, NOW).points == (), "reversed exactly once"


def test_a_level_set_by_staff_is_not_lowered(repo: CrmRepository) -> None:
    add_customer(repo, "c1")
    repo.set_level("c1", 4)
    repo.upsert_orders([make_order("A", "c1", amount_cents=600_00)])
    result = LoyaltyEngine(repo).accrue(SHOP, NOW)
    assert result.levels == ()
    customer = repo.customer("c1")
    assert customer is not None
    assert (customer.member_level, customer.points) == (4, 600)


def test_orders_after_now_are_not_accrued(repo: CrmRepository) -> None:
    add_customer(repo, "c1")
    repo.upsert_orders([make_order("future", "c1", days_ago=-1)])
    assert LoyaltyEngine(repo).accrue(SHOP, NOW).points == ()


@pytest.mark.parametrize("level", [-1, 5])
def test_levels_out_of_range_are_rejected(repo: CrmRepository, level: int) -> None:
    add_customer(repo, "c1")
    with pytest.raises(ValueError, match="level"):
        repo.set_level("c1", level)
