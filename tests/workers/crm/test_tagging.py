from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

from tests.workers.crm.factories import NOW, OTHER_SHOP, SHOP, add_customer, add_orders, make_order
from workers.crm.repository import CrmRepository
from workers.crm.rfm import RfmScorer
from workers.crm.tagging import (
    DEFAULT_RULES,
    Condition,
    TagChange,
    TagEngine,
    TagRule,
    load_rules,
)


def rule_tags(repo: CrmRepository, customer: str, shop: str = SHOP) -> set[str]:
    return {t.tag for t in repo.tags(shop, customer) if t.source == "rule"}


@pytest.fixture
def shop(repo: CrmRepository) -> CrmRepository:
    # vip: member level 3, one ordinary order long ago
    add_customer(repo, "vip")
    repo.set_level("vip", 3)
    add_orders(repo, "vip", [200])
    # big spender: ¥5,000 over two orders, a Taobao identity besides Tmall orders
    add_customer(repo, "big")
    repo.link_identity("taobao", "tb_big", "big")
    add_orders(repo, "big", [100, 200], amount_cents=250_000)
    # returner: two refunded orders and one kept
    add_customer(repo, "returner")
    repo.upsert_orders(
        [
            make_order("r1", "returner", days_ago=50, status="refunded"),
            make_order("r2", "returner", days_ago=60, status="refunded"),
            make_order("r3", "returner", days_ago=70),
        ]
    )
    # new: first paid order 10 days ago; "old" first ordered 40 days ago
    add_customer(repo, "new")
    add_orders(repo, "new", [10])
    add_customer(repo, "old")
    add_orders(repo, "old", [40, 5])
    # an unpaid order does not make anyone "new"
    add_customer(repo, "browser")
    repo.upsert_orders([make_order("p1", "browser", days_ago=1, status="pending_payment")])
    return repo


def test_default_rules(shop: CrmRepository) -> None:
    changes = TagEngine(shop).apply_rules(SHOP, NOW)

    assert rule_tags(shop, "vip") == {"vip", "channel:tmall"}
    assert rule_tags(shop, "big") == {"big_spender", "channel:taobao", "channel:tmall"}
    assert rule_tags(shop, "returner") == {"returner", "channel:tmall"}
    assert rule_tags(shop, "new") == {"new", "channel:tmall"}
    assert rule_tags(shop, "old") == {"channel:tmall"}
    assert rule_tags(shop, "browser") == {"channel:tmall"}
    assert TagChange(customer="new", tag="new", action="added") in changes
    assert all(c.action == "added" for c in changes)
    assert shop.tags(OTHER_SHOP, "big") == []


def test_applying_twice_changes_nothing(shop: CrmRepository) -> None:
    engine = TagEngine(shop)
    assert engine.apply_rules(SHOP, NOW)
    assert engine.apply_rules(SHOP, NOW) == []


def test_rule_tags_follow_the_data_and_manual_tags_stay(shop: CrmRepository) -> None:
    engine = TagEngine(shop)
    shop.add_tag(SHOP, "new", "gift-wrap-fan")  # manual
    shop.add_tag(SHOP, "old", "vip")  # a manual VIP tag on a non-VIP customer
    engine.apply_rules(SHOP, NOW)

    later = NOW + timedelta(days=25)  # "new" is now 35 days past the first order
    changes = engine.apply_rules(SHOP, later)

    assert TagChange(customer="new", tag="new", action="removed") in changes
    assert rule_tags(shop, "new") == {"channel:tmall"}
    assert {t.tag for t in shop.tags(SHOP, "new")} == {"channel:tmall", "gift-wrap-fan"}
    assert [(t.tag, t.source) for t in shop.tags(SHOP, "old") if t.tag == "vip"] == [
        ("vip", "manual")
    ]


def test_rule_tags_of_dropped_rules_are_removed(shop: CrmRepository) -> None:
    TagEngine(shop).apply_rules(SHOP, NOW)
    only_vip = TagEngine(shop, [r for r in DEFAULT_RULES if r.tag == "vip"])
    only_vip.apply_rules(SHOP, NOW)
    assert rule_tags(shop, "vip") == {"vip"}
    assert rule_tags(shop, "big") == set()


def test_custom_rules_from_json(shop: CrmRepository) -> None:
    RfmScorer(shop).score_shop(SHOP, NOW)
    rules = load_rules("""[
        {"tag": "sleeping_vip", "description": "VIP gone quiet",
         "when": [{"metric": "member_level", "op": ">=", "value": 3},
                  {"metric": "segment", "op": "==", "value": "hibernating"}]},
        {"tag": "repeat", "when": [{"metric": "order_count", "op": ">=", "value": 2}]},
        {"tag": "quiet", "when": [{"metric": "days_since_last_order", "op": ">", "value": 90}]}
    ]""")
    TagEngine(shop, rules).apply_rules(SHOP, NOW)
    assert shop.customers_with_tag(SHOP, "sleeping_vip") == ["vip"]
    assert shop.customers_with_tag(SHOP, "repeat") == ["big", "old"]
    assert shop.customers_with_tag(SHOP, "quiet") == ["big", "vip"]


@pytest.mark.parametrize(
    "bad",
    [
        '[{"tag": "x", "when": [{"metric": "member_level", "op": "has", "value": 3}]}]',
        '[{"tag": "x", "when": [{"metric": "channel", "op": "has", "value": "weibo"}]}]',
        '[{"tag": "x", "when": [{"metric": "segment", "op": ">=", "value": "lost"}]}]',
        '[{"tag": "x", "when": [{"metric": "height", "op": ">=", "value": 3}]}]',
        '[{"tag": "x", "when": []}]',
        '[{"tag": "x", "when": [{"metric": "points", "op": ">=", "value": 3}], "oops": 1}]',
    ],
)
def test_invalid_rules_are_rejected(bad: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        load_rules(bad)


def test_conditions_on_missing_metrics_are_false() -> None:
    rule = TagRule(tag="t", when=(Condition("days_since_first_order", "<", 30),))
    assert not rule.matches({"days_since_first_order": None})
    assert rule.matches({"days_since_first_order": 29})
    with pytest.raises(ValueError, match="integer"):
        Condition("points", ">=", "many")
