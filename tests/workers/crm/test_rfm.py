from __future__ import annotations

import itertools
from datetime import timedelta

import pytest

from tests.workers.crm.factories import NOW, OTHER_SHOP, SHOP, add_customer, add_orders, make_order
from workers.crm.facts import shop_facts
from workers.crm.models import Segment
from workers.crm.repository import CrmRepository
from workers.crm.rfm import (
    SEGMENT_TABLE,
    RfmPolicy,
    RfmScorer,
    compute_rfm,
    quintile_scores,
    segment_for,
)

# (customer, order ages in days, amount per order in fen, expected (R, F, M), segment)
CRAFTED = [
    ("champ", [5, 40, 80, 120], 150_000, (5, 4, 5), Segment.CHAMPIONS),
    ("loyal", [45, 60, 100, 130], 10_000, (4, 4, 2), Segment.LOYAL),
    ("newbie", [10], 30_000, (5, 1, 2), Segment.NEW),
    ("potential", [90, 150], 50_000, (3, 2, 3), Segment.POTENTIAL),
    ("slipping", [200, 250, 300], 10_000, (2, 3, 2), Segment.AT_RISK),
    ("whale", [300], 600_000, (1, 1, 5), Segment.AT_RISK),
    ("sleeper", [150], 10_000, (2, 1, 1), Segment.HIBERNATING),
    ("gone", [400], 10_000, (1, 1, 1), Segment.LOST),
]


@pytest.fixture
def crafted(repo: CrmRepository) -> CrmRepository:
    for customer, ages, amount, _, _ in CRAFTED:
        add_customer(repo, customer)
        add_orders(repo, customer, ages, amount_cents=amount)
    add_customer(repo, "browser")
    repo.upsert_orders(
        [
            make_order("unpaid", "browser", status="pending_payment"),
            make_order("closed", "browser", status="cancelled"),
        ]
    )
    add_customer(repo, "refunder")
    repo.upsert_orders([make_order("refunded", "refunder", status="refunded")])
    return repo


def test_crafted_customers_land_in_the_documented_segments(crafted: CrmRepository) -> None:
    scores = RfmScorer(crafted).score_shop(SHOP, NOW)

    assert set(scores) == {c[0] for c in CRAFTED}, "only customers with revenue are scored"
    for customer, _, _, rfm, segment in CRAFTED:
        score = scores[customer]
        assert (score.r, score.f, score.m) == rfm, customer
        assert score.segment is segment, customer
        assert score.currency == "CNY"
    assert scores["champ"].recency_days == 5
    assert scores["champ"].frequency == 4
    assert scores["champ"].monetary_cents == 600_000
    assert (
        scores["gone"].recency_days,
        scores["gone"].frequency,
        scores["gone"].monetary_cents,
    ) == (400, 0, 0), "F and M cover the window only"


def test_scores_are_stored_for_segment_queries(crafted: CrmRepository) -> None:
    RfmScorer(crafted).score_shop(SHOP, NOW)
    assert crafted.customers_in_segment(SHOP, Segment.AT_RISK) == ["slipping", "whale"]
    assert crafted.customers_in_segment(SHOP, "champions") == ["champ"]
    assert crafted.customers_in_segment(OTHER_SHOP, Segment.CHAMPIONS) == []
    stored = crafted.rfm_score(SHOP, "loyal")
    assert stored is not None
    assert stored.segment is Segment.LOYAL
    with pytest.raises(ValueError, match="segment"):
        crafted.customers_in_segment(SHOP, "whales")


def test_rescoring_replaces_the_snapshot(crafted: CrmRepository) -> None:
    scorer = RfmScorer(crafted)
    scorer.score_shop(SHOP, NOW)
    later = NOW + timedelta(days=60)
    scores = scorer.score_shop(SHOP, later)
    assert scores["newbie"].segment is Segment.POTENTIAL  # 70 days since the only order
    assert crafted.customers_in_segment(SHOP, Segment.NEW) == []
    assert "newbie" in crafted.customers_in_segment(SHOP, Segment.POTENTIAL)


def test_scoring_the_past_ignores_later_orders(crafted: CrmRepository) -> None:
    scores = RfmScorer(crafted).score_shop(SHOP, NOW - timedelta(days=100))
    # then, only champ's oldest order (120 days before NOW) had been placed
    assert scores["champ"].frequency == 1
    assert scores["champ"].recency_days == 20
    assert "newbie" not in scores


def test_every_score_combination_has_exactly_the_first_matching_segment() -> None:
    for r, f, m in itertools.product(range(1, 6), repeat=3):
        matching = [rule.segment for rule in SEGMENT_TABLE if rule.matches(r, f, m)]
        assert matching, (r, f, m)
        assert segment_for(r, f, m) is matching[0]
    assert segment_for(5, 5, 5) is Segment.CHAMPIONS
    assert segment_for(1, 1, 1) is Segment.LOST
    with pytest.raises(ValueError, match="out of range"):
        segment_for(0, 1, 1)


def test_quintiles_split_a_large_shop_into_fifths(repo: CrmRepository) -> None:
    # 100 customers, customer i spent (i + 1) * ¥10 in one order i days ago
    for i in range(100):
        customer = add_customer(repo, f"c{i:03}")
        repo.upsert_orders(
            [make_order(f"o{i}", customer, days_ago=i + 0.5, amount_cents=(i + 1) * 1_000)]
        )
    scores = RfmScorer(repo).score_shop(SHOP, NOW)  # "auto": 100 >= 50 -> quintiles
    for i in range(100):
        score = scores[f"c{i:03}"]
        assert score.m == 1 + i // 20, i
        assert score.r == 5 - i // 20, i
        assert score.f == 1, "everyone has one order: ties share the lowest score"


def test_quintile_ties_share_a_score() -> None:
    assert quintile_scores([10, 10, 10, 10, 10], higher_is_better=True) == [1] * 5
    assert quintile_scores([1, 2, 3, 4, 5], higher_is_better=True) == [1, 2, 3, 4, 5]
    assert quintile_scores([1, 2, 3, 4, 5], higher_is_better=False) == [5, 4, 3, 2, 1]
    assert quintile_scores([1, 1, 9, 9], higher_is_better=True) == [1, 1, 3, 3]


def test_policy_can_force_a_mode(crafted: CrmRepository) -> None:
    facts = shop_facts(SHOP, crafted.shop_orders(SHOP), NOW, 365)
    by_threshold = compute_rfm(facts, RfmPolicy(mode="threshold"))
    by_quintile = compute_rfm(facts, RfmPolicy(mode="quintile"))
    assert by_threshold["whale"].m == 5
    # quintiles: champ and whale tie at the top; 6 of 8 customers spent less -> 1 + 30 // 8
    assert by_quintile["whale"].m == by_quintile["champ"].m == 4
    assert by_quintile["gone"].m == 1
    # 6 of 8 customers have fewer than loyal's 4 orders
    assert by_threshold["loyal"].f == by_quintile["loyal"].f == 4


def test_money_is_summed_in_the_shops_main_currency_only(repo: CrmRepository) -> None:
    add_customer(repo, "us")
    add_customer(repo, "cn")
    repo.upsert_orders(
        [
            make_order("u1", "us", currency="USD", amount_cents=90_000, shop=OTHER_SHOP),
            make_order("u2", "us", currency="USD", amount_cents=90_000, shop=OTHER_SHOP),
            make_order("c1", "cn", currency="CNY", amount_cents=99_999_00, shop=OTHER_SHOP),
        ]
    )
    scores = RfmScorer(repo).score_shop(OTHER_SHOP, NOW)
    assert scores["us"].currency == "USD"
    assert scores["us"].monetary_cents == 180_000
    assert scores["cn"].monetary_cents == 0, "CNY is not added to USD"
    assert scores["cn"].frequency == 1
