from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import msgspec
import pytest

from tests.workers.crm.factories import NOW, OTHER_SHOP, SHOP, add_customer, make_order
from workers.crm.models import Identity, OrderInfo, OrderItem, Segment
from workers.crm.repository import (
    CrmRepository,
    CrmStore,
    IdentityConflictError,
    InsufficientPointsError,
    OrderLookup,
    UnknownCustomerError,
    customer_id_for,
)
from workers.crm.rfm import RfmScorer

# ---------------------------------------------------------------- identities


def test_one_customer_across_channels(repo: CrmRepository) -> None:
    alice, created = repo.ensure_customer("taobao", "tb_alice", display_name="Alice")
    assert created
    assert alice == customer_id_for("taobao", "tb_alice")
    assert repo.ensure_customer("taobao", "tb_alice") == (alice, False)

    for channel, external in [
        ("tmall", "tm_alice"),
        ("1688", "b2b_alice"),
        ("aliexpress", "ae_alice"),
        ("jd", "jd_alice"),
        ("web", "alice@example.com"),
        ("app", "u-1001"),
    ]:
        assert repo.link_identity(channel, external, alice) == alice
    assert repo.resolve("jd", "jd_alice") == alice
    assert repo.resolve("app", "u-1001") == alice
    assert repo.resolve("jd", "somebody-else") is None
    assert {i.channel for i in repo.identities(alice)} == {
        "taobao",
        "tmall",
        "1688",
        "aliexpress",
        "jd",
        "web",
        "app",
    }
    # linking again is a no-op
    assert repo.link_identity("tmall", "tm_alice", alice) == alice
    assert len(repo.identities(alice)) == 7


def test_linking_someone_elses_identity_is_a_conflict_unless_merging(repo: CrmRepository) -> None:
    alice, _ = repo.ensure_customer("taobao", "tb_alice", display_name="Alice")
    twin, _ = repo.ensure_customer("aliexpress", "ae_alice")
    with pytest.raises(IdentityConflictError, match="merge=True"):
        repo.link_identity("aliexpress", "ae_alice", alice)
    assert repo.resolve("aliexpress", "ae_alice") == twin

    assert repo.link_identity("aliexpress", "ae_alice", alice, merge=True) == alice
    assert repo.resolve("aliexpress", "ae_alice") == alice
    assert repo.customer(twin) is None


def test_merge_moves_everything_and_keeps_the_safe_flags(repo: CrmRepository) -> None:
    keep = add_customer(repo, "keep", name="Alice")
    gone = add_customer(repo, "gone", timezone="Europe/Madrid", name="alice_es")
    repo.link_identity("taobao", "tb_alice", keep)
    repo.link_identity("aliexpress", "ae_alice", gone)
    repo.upsert_orders([make_order("T1", keep), make_order("A1", gone, shop=OTHER_SHOP)])
    repo.add_tag(SHOP, keep, "vip", source="rule")
    repo.add_tag(SHOP, gone, "vip", source="manual")
    repo.add_tag(SHOP, gone, "likes-silk")
    repo.add_points(keep, 100)
    repo.add_points(gone, 50)
    repo.set_level(gone, 2)
    repo.set_opt_out(gone)
    repo.mark_sent("spring-sale", gone, NOW)

    repo.merge_customers(keep=keep, absorb=gone)

    merged = repo.customer(keep)
    assert merged is not None
    assert merged.display_name == "Alice"
    assert merged.timezone == "Asia/Shanghai"
    assert merged.points == 150
    assert merged.member_level == 2
    assert merged.opt_out, "an opt-out must survive a merge"
    assert repo.customer(gone) is None
    assert [i.channel for i in repo.identities(keep)] == ["aliexpress", "taobao"]
    order = repo.order(OTHER_SHOP, "A1")
    assert order is not None
    assert order.customer == keep
    assert {(t.tag, t.source) for t in repo.tags(SHOP, keep)} == {
        ("vip", "manual"),
        ("likes-silk", "manual"),
    }
    assert repo.sent_customers("spring-sale") == {keep}


def test_merge_rejects_self_and_unknown(repo: CrmRepository) -> None:
    add_customer(repo, "a")
    with pytest.raises(ValueError, match="itself"):
        repo.merge_customers("a", "a")
    with pytest.raises(UnknownCustomerError):
        repo.merge_customers("a", "nobody")


def test_customer_validation(repo: CrmRepository) -> None:
    with pytest.raises(ValueError, match="timezone"):
        repo.upsert_customer("c1", timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="non-empty"):
        repo.upsert_customer(" c1")
    with pytest.raises(ValueError, match="channel"):
        repo.ensure_customer("weibo", "x")
    created = repo.upsert_customer("c1")
    assert created.timezone == "Asia/Shanghai"
    assert created.created_at == NOW
    updated = repo.upsert_customer("c1", display_name="Chen")
    assert (updated.display_name, updated.timezone) == ("Chen", "Asia/Shanghai")


# ---------------------------------------------------------------- orders


def test_order_lookup_and_latest_order(repo: CrmRepository) -> None:
    add_customer(repo, "c1")
    add_customer(repo, "c2")
    repo.upsert_orders(
        [
            make_order("O-old", "c1", days_ago=30),
            make_order(
                "O-new",
                "c1",
                days_ago=1,
                status="shipped",
                carrier="SF Express",
                tracking_no="SF1234567890",
                eta=date(2024, 3, 7),
                amount_cents=25_900,
                items=(OrderItem(title="Silk scarf", quantity=2, sku="SC-01"),),
            ),
            make_order("O-mid", "c1", days_ago=5),
            make_order("O-c2", "c2", days_ago=0.5),
            make_order("O-other-shop", "c1", shop=OTHER_SHOP, days_ago=0.1),
        ]
    )

    info = repo.order(SHOP, "O-new")
    assert info == OrderInfo(
        order_id="O-new",
        status="shipped",
        carrier="SF Express",
        tracking_no="SF1234567890",
        eta=date(2024, 3, 7),
        amount_cents=25_900,
        currency="CNY",
        items=(OrderItem(title="Silk scarf", quantity=2, sku="SC-01"),),
        channel="tmall",
        created_at=NOW - timedelta(days=1),
        customer="c1",
    )
    assert info.created_at.tzinfo is not None
    assert repo.order(SHOP, "nope") is None
    assert repo.order(OTHER_SHOP, "O-new") is None, "order ids are per shop"

    latest = repo.latest_order(SHOP, "c1")
    assert latest is not None
    assert latest.order_id == "O-new"
    assert repo.latest_order(OTHER_SHOP, "c1") is not None
    assert repo.latest_order(SHOP, "nobody") is None
    assert [o.order_id for o in repo.recent_orders(SHOP, "c1", 2)] == ["O-new", "O-mid"]
    assert [o.order_id for o in repo.recent_orders(SHOP, "c1")] == ["O-new", "O-mid", "O-old"]

    assert repo.order_of(SHOP, "c2", "O-new") is None, "someone else's order"
    assert repo.order_of(SHOP, "c1", "O-new") == info


def test_repository_satisfies_the_protocols(repo: CrmRepository) -> None:
    lookup: OrderLookup = repo
    store: CrmStore = repo
    assert lookup.order(SHOP, "x") is None
    assert store.latest_order(SHOP, "x") is None


def test_upsert_is_last_writer_wins_on_updated_at(repo: CrmRepository) -> None:
    add_customer(repo, "c1")
    paid = make_order("O1", "c1", days_ago=3, status="paid", updated_days_ago=3)
    shipped = make_order(
        "O1", "c1", days_ago=3, status="shipped", tracking_no="YT1", updated_days_ago=1
    )
    first = repo.upsert_orders([paid])
    assert (first.inserted, first.updated) == (1, 0)
    second = repo.upsert_orders([shipped, shipped])
    assert (second.updated, second.unchanged) == (1, 1)
    replay = repo.upsert_orders([paid])
    assert replay.stale == 1
    stored = repo.order(SHOP, "O1")
    assert stored is not None
    assert (stored.status, stored.tracking_no) == ("shipped", "YT1")


def test_a_bad_order_rolls_back_its_whole_batch(repo: CrmRepository) -> None:
    add_customer(repo, "c1")
    with pytest.raises(UnknownCustomerError):
        repo.upsert_orders([make_order("O1", "c1"), make_order("O2", "ghost")])
    with pytest.raises(ValueError, match="status"):
        repo.upsert_orders([make_order("O1", "c1"), make_order("O3", "c1", status="lost")])
    good = make_order("O1", "c1")
    naive = msgspec.structs.replace(good, created_at=good.created_at.replace(tzinfo=None))
    with pytest.raises(ValueError, match="naive"):
        repo.upsert_orders([good, naive])
    assert repo.order(SHOP, "O1") is None


# ---------------------------------------------------------------- tags


def test_manual_tags_win_over_rule_tags(repo: CrmRepository) -> None:
    add_customer(repo, "c1")
    assert repo.add_tag(SHOP, "c1", "vip", source="rule")
    assert not repo.add_tag(SHOP, "c1", "vip", source="rule")
    assert repo.add_tag(SHOP, "c1", "vip"), "manual over rule turns it manual"
    assert not repo.add_tag(SHOP, "c1", "vip", source="rule"), "rule never downgrades"
    assert [(t.tag, t.source) for t in repo.tags(SHOP, "c1")] == [("vip", "manual")]
    assert not repo.remove_tag(SHOP, "c1", "vip", source="rule")
    assert repo.tags(OTHER_SHOP, "c1") == [], "tags are per shop"
    assert repo.remove_tag(SHOP, "c1", "vip")
    assert repo.tags(SHOP, "c1") == []
    with pytest.raises(ValueError, match="tag"):
        repo.add_tag(SHOP, "c1", " padded ")
    with pytest.raises(UnknownCustomerError):
        repo.add_tag(SHOP, "ghost", "x")


# ---------------------------------------------------------------- membership


def test_points_ledger_is_idempotent_by_ref_and_guards_the_balance(repo: CrmRepository) -> None:
    add_customer(repo, "c1")
    assert repo.add_points("c1", 300, ref="bonus:birthday-2024")
    assert not repo.add_points("c1", 300, ref="bonus:birthday-2024")
    with pytest.raises(InsufficientPointsError):
        repo.add_points("c1", -301, kind="redeem")
    assert repo.add_points("c1", -300, kind="redeem")
    assert repo.add_points("c1", -10, kind="manual", allow_negative=True)
    customer = repo.customer("c1")
    assert customer is not None
    assert customer.points == -10
    with pytest.raises(ValueError, match="kind"):
        repo.add_points("c1", 1, kind="gift")
    with pytest.raises(ValueError, match="level"):
        repo.set_level("c1", 9)


def test_vip_is_level_three_or_more(repo: CrmRepository) -> None:
    add_customer(repo, "c1")
    assert not repo.is_vip("c1")
    repo.set_level("c1", 3)
    assert repo.is_vip("c1")
    assert not repo.is_vip("nobody")


# ---------------------------------------------------------------- profile


def test_profile_is_the_agent_sidebar(repo: CrmRepository) -> None:
    alice, _ = repo.ensure_customer(
        "taobao", "tb_alice", display_name="Alice", timezone="Europe/Madrid"
    )
    repo.link_identity("aliexpress", "ae_alice", alice)
    repo.upsert_orders(
        [
            make_order(f"T{n}", alice, days_ago=d, amount_cents=150_000)
            for n, d in enumerate([5, 40, 80, 120, 150, 200])
        ]
        + [
            make_order("T-refund", alice, days_ago=3, status="refunded", amount_cents=9_900),
            make_order(
                "T-usd", alice, days_ago=2, amount_cents=5_000, currency="USD", channel="aliexpress"
            ),
            make_order("X1", alice, shop=OTHER_SHOP, days_ago=1, amount_cents=1),
        ]
    )
    repo.add_tag(SHOP, alice, "likes-silk")
    repo.add_tag(OTHER_SHOP, alice, "other-shop-tag")
    repo.set_level(alice, 3)
    repo.add_points(alice, 900)
    RfmScorer(repo).score_shop(SHOP, NOW)

    profile = repo.profile(SHOP, alice)
    assert profile is not None
    assert profile.display_name == "Alice"
    assert profile.timezone == "Europe/Madrid"
    assert (profile.member_level, profile.is_vip, profile.points) == (3, True, 900)
    assert [t.tag for t in profile.tags] == ["likes-silk"]
    assert profile.segment is Segment.CHAMPIONS
    assert profile.rfm is not None
    assert (profile.rfm.r, profile.rfm.f, profile.rfm.m) == (5, 5, 5)
    assert [o.order_id for o in profile.recent_orders] == ["T-usd", "T-refund", "T0", "T1", "T2"]
    assert profile.order_count == 8
    assert profile.lifetime_value == {"CNY": 900_000, "USD": 5_000}
    assert profile.channels == (
        Identity(channel="aliexpress", external_id="ae_alice", customer=alice),
        Identity(channel="taobao", external_id="tb_alice", customer=alice),
    )
    assert not profile.opt_out
    assert repo.profile(SHOP, "nobody") is None

    elsewhere = repo.profile(OTHER_SHOP, alice)
    assert elsewhere is not None
    assert elsewhere.segment is None
    assert elsewhere.lifetime_value == {"CNY": 1}
    assert [t.tag for t in elsewhere.tags] == ["other-shop-tag"]


# ---------------------------------------------------------------- storage


def test_data_survives_reopening_and_the_file_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "crm.db"
    with CrmRepository(path, clock=lambda: NOW) as first:
        add_customer(first, "c1")
        first.upsert_orders([make_order("O1", "c1")])
    with CrmRepository(path, clock=lambda: NOW) as second:
        assert second.order(SHOP, "O1") is not None
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_calls_from_many_threads_are_serialized(repo: CrmRepository) -> None:
    add_customer(repo, "c1")
    start = threading.Barrier(8)

    def work(worker: int) -> int:
        start.wait()
        for n in range(25):
            repo.upsert_orders([make_order(f"W{worker}-{n}", "c1")])
            repo.add_points("c1", 1, ref=f"w{worker}-{n}")
            assert repo.profile(SHOP, "c1") is not None
        return worker

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert sorted(pool.map(work, range(8))) == list(range(8))
    customer = repo.customer("c1")
    assert customer is not None
    assert customer.points == 200
    assert len(repo.shop_orders(SHOP)) == 200


def test_timestamps_come_back_as_the_same_instant_in_utc(repo: CrmRepository) -> None:
    add_customer(repo, "c1")
    shanghai_noon = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=8)))
    order = msgspec.structs.replace(
        make_order("O1", "c1"), created_at=shanghai_noon, updated_at=shanghai_noon
    )
    repo.upsert_orders([order])
    stored = repo.order(SHOP, "O1")
    assert stored is not None
    assert stored.created_at == shanghai_noon
    assert stored.created_at.tzinfo is UTC
