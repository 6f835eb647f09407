"""Who a chat user is in the CRM (docs/CRM.md, "Who is the buyer"): the rules in
order, the same answer whether the import or the first chat came first, explicit
links absorbing placeholders but never a real other customer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.workers.crm.factories import SHOP, add_customer, make_order
from workers.crm.importer import import_customers
from workers.crm.repository import CrmRepository, IdentityConflictError, customer_id_for


def test_the_identity_on_the_chat_channel_is_the_buyer(repo: CrmRepository) -> None:
    imported, _ = repo.ensure_customer("taobao", "tb_nick")  # an order import, before any chat
    assert repo.chat_customer("tb_nick", "taobao") == imported
    # The same id on another channel is somebody else's JD pin ...
    assert repo.chat_customer("tb_nick", "jd") == customer_id_for("jd", "tb_nick") != imported
    assert repo.register_chat_user("tb_nick", "taobao") == imported
    assert repo.chat_users_of(imported) == ["tb_nick"]
    # ... but once the chat user is known, they are who they are on every channel.
    assert repo.chat_customer("tb_nick", "jd") == imported


def test_chat_first_then_import_lands_on_the_same_customer(repo: CrmRepository) -> None:
    chatted = repo.register_chat_user("tb_nick", "taobao")
    imported, created = repo.ensure_customer("taobao", "tb_nick")
    assert (imported, created) == (chatted, False)
    repo.upsert_orders([make_order("o1", imported)])
    assert [
        o.order_id for o in repo.recent_orders(SHOP, repo.chat_customer("tb_nick", "taobao"))
    ] == ["o1"]


def test_a_customer_id_equal_to_the_chat_user_is_theirs(repo: CrmRepository) -> None:
    add_customer(repo, "alice")  # the shop's own ids are its chat ids (own web mall)
    assert repo.chat_customer("alice", "web") == "alice"
    assert repo.register_chat_user("alice", "web") == "alice"
    assert repo.resolve("web", "alice") == "alice"


def test_an_explicit_link_wins_and_absorbs_the_placeholder(repo: CrmRepository) -> None:
    placeholder = repo.register_chat_user("u123", "app")  # chatted before the shop linked them
    repo.add_tag(SHOP, placeholder, "asked-about-sizes")
    add_customer(repo, "member-9")
    assert repo.link_chat_user("u123", "member-9")
    assert repo.chat_customer("u123", "app") == "member-9"
    assert repo.customer(placeholder) is None  # merged in
    assert [t.tag for t in repo.tags(SHOP, "member-9")] == ["asked-about-sizes"]
    assert repo.resolve("app", "u123") == "member-9"
    assert not repo.link_chat_user("u123", "member-9")  # already


def test_an_explicit_link_never_silently_takes_a_real_customer(repo: CrmRepository) -> None:
    add_customer(repo, "member-1")
    add_customer(repo, "member-2")
    repo.link_chat_user("u1", "member-1")
    with pytest.raises(IdentityConflictError):
        repo.link_chat_user("u1", "member-2")
    assert repo.chat_customer("u1", "web") == "member-1"
    repo.link_chat_user("u1", "member-2", merge=True)  # the shop says: the same person
    assert repo.chat_customer("u1", "web") == "member-2" and repo.customer("member-1") is None


def test_customers_file_links_users_and_identities(repo: CrmRepository, tmp_path: Path) -> None:
    placeholder, _ = repo.ensure_customer("taobao", "alice_tb")  # orders came first
    path = tmp_path / "customers.csv"
    path.write_text(
        "customer,channel,external_id,user\nc-alice,taobao,alice_tb,alice\nc-bob,jd,alice_tb,bob\n",
        encoding="utf-8",
    )
    report = import_customers(repo, path)
    assert report.rejected == 0
    assert repo.customer(placeholder) is None
    assert repo.chat_customer("alice", "web") == "c-alice"
    assert repo.chat_customer("alice_tb", "taobao") == "c-alice"
    assert repo.chat_customer("bob", "web") == "c-bob"


def test_a_version_1_database_upgrades_in_place(tmp_path: Path) -> None:
    path = tmp_path / "crm.db"
    CrmRepository(path).close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE chat_users")
        db.execute("PRAGMA user_version = 1")
    db.close()
    with CrmRepository(path) as repo:
        assert repo.register_chat_user("x", "web") == customer_id_for("web", "x")
