"""Tenants in the store: the shop registry, a shop's staff and users, open
conversations per customer, and scopes (an empty shop is no shop at all)."""

from __future__ import annotations

from pathlib import Path

from imserver.store import (
    PutAgent,
    PutShop,
    PutStaff,
    Scope,
    ScopeKind,
    SetMembers,
    SqliteStore,
    add_shops,
    read_shops,
)
from protocol import AgentStatus, ConvKind, ConvState, MemberRole, Role

from .conftest import put_conv


async def test_shops_are_registered_once_and_listed(store: SqliteStore, db_path: Path) -> None:
    assert not await store.shop_exists("shop-1")
    await store.write([PutShop(name="shop-1", ts=1), PutShop(name="shop-0", ts=2)])
    await store.write([PutShop(name="shop-1", ts=3)])  # again: no change, no error
    assert await store.shop_exists("shop-1")
    assert not await store.shop_exists("shop-2")
    assert await store.list_shops() == ["shop-0", "shop-1"]
    # from outside (the CLI), while the store is open: the store sees it at once
    assert add_shops(db_path, ["shop-2", "shop-1"]) == 1
    assert await store.shop_exists("shop-2")
    assert read_shops(db_path) == ["shop-0", "shop-1", "shop-2"]


def test_add_shops_creates_and_migrates_a_new_database(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    assert add_shops(db, ["a", "b", "a"]) == 2
    assert read_shops(db) == ["a", "b"]


async def test_the_users_of_a_shop(store: SqliteStore) -> None:
    await store.write(
        [
            put_conv("d1", shop="shop-1", customer="alice"),
            put_conv("d2", shop="shop-2", customer="bob"),
            put_conv("g1", shop="shop-1", kind=ConvKind.GROUP, customer=None),
            SetMembers(conv="g1", add={"carol": MemberRole.MEMBER}),
            PutStaff(shop="shop-1", user="a1", role=Role.AGENT, ts=1),
            PutStaff(shop="shop-1", user="sup", role=Role.SUPERVISOR, ts=1),
            PutAgent(shop="shop-2", agent="a2", status=AgentStatus.ONLINE, ts=1),
        ]
    )
    everyone = ["alice", "bob", "carol", "a1", "sup", "a2", "nobody"]
    # carol is only a member of one of its groups: that makes no one a user of the shop
    assert await store.shop_users("shop-1", everyone) == {"alice", "a1", "sup"}
    assert await store.shop_users("shop-2", everyone) == {"bob", "a2"}
    assert await store.shop_users("shop-3", everyone) == set()
    # agents (assignees): staff who logged in or have a status there, nobody else
    assert await store.is_shop_agent("shop-1", "a1")
    assert await store.is_shop_agent("shop-1", "sup")
    assert await store.is_shop_agent("shop-2", "a2")
    assert not await store.is_shop_agent("shop-1", "a2")  # another shop's agent
    assert not await store.is_shop_agent("shop-1", "alice")  # a customer


async def test_open_direct_conversations_are_counted_per_customer(store: SqliteStore) -> None:
    await store.write(
        [
            put_conv("d1", shop="s1", customer="alice"),
            put_conv("d2", shop="s2", customer="alice", state=ConvState.ASSIGNED, agent="a"),
            put_conv("d3", shop="s3", customer="alice", state=ConvState.CLOSED),
            put_conv("d4", shop="s1", customer="bob"),
        ]
    )
    assert await store.count_open_direct("alice", 10) == 2
    assert await store.count_open_direct("alice", 1) == 1  # counted up to the limit only
    assert await store.count_open_direct("carol", 10) == 0


async def test_an_empty_shop_is_never_all_shops(store: SqliteStore) -> None:
    await store.write([put_conv("d1", shop="s1"), put_conv("d2", shop="s2")])
    for role in (Role.WORKER, Role.SUPERVISOR, Role.ADMIN):
        scope = Scope.for_role(role, "w", "")
        assert scope.kind is ScopeKind.SHOP
        page, _ = await store.list_conversations(scope, state=None, updated_before=None, limit=50)
        assert page == []
    everything = Scope.for_role(Role.WORKER, "w", "*")
    assert everything.kind is ScopeKind.ALL
    page, _ = await store.list_conversations(everything, state=None, updated_before=None, limit=50)
    assert {c.id for c in page} == {"d1", "d2"}
