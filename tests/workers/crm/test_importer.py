from __future__ import annotations

import io
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from tests.workers.crm.factories import NOW, SHOP, add_customer
from workers.crm.importer import import_customers, import_orders
from workers.crm.models import OrderItem
from workers.crm.repository import CrmRepository, customer_id_for

ORDERS_CSV = """\
shop,order_id,channel,buyer_id,display_name,timezone,status,amount,currency,items,carrier,tracking_no,eta,created_at,updated_at
s1,T1001,taobao,tb_alice,Alice,Asia/Shanghai,交易成功,199.00,CNY,"Silk scarf x2; Gift box",SF Express,SF123,2024-03-07,2024-03-01 10:00:00,
s1,T1002,taobao,tb_alice,,,paid,abc,CNY,,,,,2024-03-01 11:00:00,
s1,T1003,tmall,tm_bob,Bob,America/Los_Angeles,shipped,"1,299.50",CNY,"Lamp x1
White bulb x3",YTO,YT9,,2024-03-02 09:00:00,2024-03-03 09:00:00
s1,T1004,weibo,wb_x,,,paid,10,CNY,,,,,2024-03-02 10:00:00,
s1,,jd,jd_carol,,,paid,10,CNY,,,,,2024-03-02 10:00:00,
s1,T1005,jd,jd_carol,Carol,Europe/Madrid,WAIT_SELLER_SEND_GOODS,59.9,CNY,,,,,2024-03-02T08:00:00+00:00,

s1,T1006,jd,jd_carol,,,paid,10.001,CNY,,,,,2024-03-02 10:00:00,
s1,T1007,jd,jd_carol,,,paid,10,CNY,,,,,yesterday,
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_import_reports_bad_rows_by_line_and_keeps_the_rest(
    repo: CrmRepository, tmp_path: Path
) -> None:
    report = import_orders(repo, write(tmp_path, "orders.csv", ORDERS_CSV))

    assert (report.imported, report.rejected) == (3, 5)
    assert report.inserted == 3
    assert report.customers_created == 3
    assert [(e.line, e.key) for e in report.errors] == [
        (3, "T1002"),
        (6, "T1004"),
        (7, ""),
        (10, "T1006"),
        (11, "T1007"),
    ]
    messages = [e.message for e in report.errors]
    assert "amount" in messages[0]
    assert "channel" in messages[1]
    assert "order_id" in messages[2]
    assert "decimals" in messages[3]
    assert "created_at" in messages[4]

    alice = repo.resolve("taobao", "tb_alice")
    assert alice == customer_id_for("taobao", "tb_alice")
    t1001 = repo.order("s1", "T1001")
    assert t1001 is not None
    assert t1001.customer == alice
    assert t1001.status == "completed"
    assert t1001.amount_cents == 19_900
    assert t1001.items == (OrderItem(title="Silk scarf", quantity=2), OrderItem(title="Gift box"))
    assert (t1001.carrier, t1001.tracking_no, t1001.eta) == (
        "SF Express",
        "SF123",
        date(2024, 3, 7),
    )
    assert t1001.created_at == datetime(2024, 3, 1, 2, 0, tzinfo=UTC), "naive = Beijing time"

    t1003 = repo.order("s1", "T1003")
    assert t1003 is not None
    assert t1003.amount_cents == 129_950
    assert t1003.items == (OrderItem(title="Lamp"), OrderItem(title="White bulb", quantity=3))
    bob = repo.customer(customer_id_for("tmall", "tm_bob"))
    assert bob is not None
    assert (bob.display_name, bob.timezone) == ("Bob", "America/Los_Angeles")
    t1005 = repo.order("s1", "T1005")
    assert t1005 is not None
    assert (t1005.status, t1005.amount_cents) == ("paid", 5_990)


def test_reimporting_the_same_file_changes_nothing(repo: CrmRepository, tmp_path: Path) -> None:
    path = write(tmp_path, "orders.csv", ORDERS_CSV)
    import_orders(repo, path)
    again = import_orders(repo, path)
    assert (again.inserted, again.updated, again.unchanged, again.customers_created) == (0, 0, 3, 0)
    assert again.rejected == 5


def test_json_array_import_with_a_bad_element(repo: CrmRepository, tmp_path: Path) -> None:
    add_customer(repo, "vip-1")
    text = """[
  {"shop": "s1", "order_id": "J1", "channel": "app", "customer": "vip-1",
   "status": "paid", "amount_cents": 4500, "currency": "usd",
   "items": [{"title": "Tea set", "quantity": 1, "sku": "TS"}, "Tea cup"],
   "created_at": "2024-03-01T12:00:00Z"},
  {"shop": "s1", "order_id": "J2", "channel": "app", "customer": "ghost",
   "status": "paid", "amount_cents": 100, "created_at": "2024-03-01T12:00:00Z"},
  42,
  {"shop": "s1", "order_id": "J3", "channel": "aliexpress", "buyer_id": "ae_1",
   "status": "delivered", "amount": 12.5, "currency": "USD", "created_at": 1709294400}
]"""
    report = import_orders(repo, write(tmp_path, "orders.json", text))

    assert (report.imported, report.rejected) == (3, 1)
    assert [(e.line, e.key) for e in report.errors] == [(8, "")]
    # A customer id the CRM has not seen yet (the buyer never chatted) is created.
    assert repo.customer("ghost") is not None and report.customers_created == 2
    j2 = repo.order("s1", "J2")
    assert j2 is not None and j2.customer == "ghost"
    j1 = repo.order("s1", "J1")
    assert j1 is not None
    assert (j1.currency, j1.amount_cents) == ("USD", 4_500)
    assert j1.items == (OrderItem(title="Tea set", sku="TS"), OrderItem(title="Tea cup"))
    j3 = repo.order("s1", "J3")
    assert j3 is not None
    assert j3.amount_cents == 1_250
    assert j3.created_at == datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def test_json_array_syntax_error_stops_at_its_line(repo: CrmRepository, tmp_path: Path) -> None:
    add_customer(repo, "c1")
    text = (
        '[{"shop": "s1", "order_id": "J1", "channel": "web", "customer": "c1",'
        ' "status": "paid", "amount_cents": 1, "created_at": "2024-03-01T00:00:00Z"},\n'
        ' {"shop": "s1", "order_id": oops},\n'
        ' {"shop": "s1", "order_id": "J3"}]\n'
    )
    report = import_orders(repo, write(tmp_path, "orders.json", text))
    assert (report.imported, report.rejected) == (1, 1)
    assert report.errors[0].line == 2
    assert "rest skipped" in report.errors[0].message


def test_json_lines_import(repo: CrmRepository) -> None:
    add_customer(repo, "c1")
    stream = io.StringIO(
        '{"shop": "s1", "order_id": "L1", "channel": "web", "customer": "c1",'
        ' "status": "paid", "amount_cents": 100, "created_at": "2024-03-01T00:00:00Z"}\n'
        "\n"
        '{"shop": "s1", "order_id": "L2", "channel": "web", "customer": "c1", \n'
        '{"order_id": "L3", "channel": "web", "customer": "c1",'
        ' "status": "paid", "amount_cents": 100, "created_at": "2024-03-01T00:00:00Z"}\n'
        '{"shop": "s1", "order_id": "L4", "channel": "web", "customer": "c1",'
        ' "status": "paid", "amount_cents": -5, "created_at": "2024-03-01T00:00:00Z"}\n'
    )
    report = import_orders(repo, stream, fmt="jsonl")
    assert (report.imported, report.rejected) == (1, 3)
    assert [e.line for e in report.errors] == [3, 4, 5]
    assert "malformed JSON" in report.errors[0].message
    assert "shop" in report.errors[1].message
    assert "negative" in report.errors[2].message


def test_default_shop_and_taobao_export_headers(repo: CrmRepository, tmp_path: Path) -> None:
    text = (
        "订单编号,买家会员名,平台,订单状态,买家实际支付金额,宝贝标题,物流公司,物流单号,订单创建时间\n"
        "888001,小明,天猫,交易成功,88.00,保温杯 x1,中通,ZT001,2024/03/01 20:30:00\n"
        "888002,小明,天猫,TRADE_CLOSED,66.00,雨伞,,,2024/03/02 20:30:00\n"
    )
    report = import_orders(repo, write(tmp_path, "taobao-export.csv", "\ufeff" + text), shop=SHOP)
    assert (report.imported, report.rejected) == (2, 0)
    xiaoming = repo.resolve("tmall", "小明")
    assert xiaoming is not None
    latest = repo.latest_order(SHOP, xiaoming)
    assert latest is not None
    assert (latest.order_id, latest.status) == ("888002", "refunded")
    first = repo.order(SHOP, "888001")
    assert first is not None
    assert (first.status, first.carrier, first.tracking_no) == ("completed", "中通", "ZT001")
    assert first.created_at == datetime(2024, 3, 1, 12, 30, tzinfo=UTC)


def test_an_older_export_does_not_regress_orders(repo: CrmRepository, tmp_path: Path) -> None:
    header = "shop,order_id,channel,buyer_id,status,amount_cents,created_at,updated_at\n"
    newer = header + "s1,O1,web,w1,shipped,100,2024-03-01 10:00,2024-03-03 10:00\n"
    older = header + "s1,O1,web,w1,paid,100,2024-03-01 10:00,2024-03-02 10:00\n"
    import_orders(repo, write(tmp_path, "newer.csv", newer))
    report = import_orders(repo, write(tmp_path, "older.csv", older))
    assert (report.imported, report.stale) == (1, 1)
    stored = repo.order("s1", "O1")
    assert stored is not None
    assert stored.status == "shipped"


def test_customer_import(repo: CrmRepository, tmp_path: Path) -> None:
    add_customer(repo, "someone-else")
    repo.link_identity("jd", "jd_taken", "someone-else")
    text = """\
customer,channel,external_id,display_name,timezone,opt_out,member_level
crm-1,taobao,tb_1,Lin,Asia/Shanghai,no,3
,aliexpress,ae_2,Maria,Europe/Madrid,yes,
crm-3,,,Jo,America/Los_Angeles,,
crm-4,jd,jd_taken,X,,,
crm-5,taobao,,X,,,
crm-6,,,X,Moon/Base,,
crm-7,,,X,,maybe,
crm-8,,,X,,,9
"""
    report = import_customers(repo, write(tmp_path, "customers.csv", text))
    assert (report.imported, report.rejected, report.customers_created) == (3, 5, 3)
    assert [e.line for e in report.errors] == [5, 6, 7, 8, 9]

    lin = repo.customer("crm-1")
    assert lin is not None
    assert (lin.display_name, lin.member_level, lin.opt_out) == ("Lin", 3, False)
    assert repo.resolve("taobao", "tb_1") == "crm-1"
    maria_id = repo.resolve("aliexpress", "ae_2")
    assert maria_id is not None
    maria = repo.customer(maria_id)
    assert maria is not None
    assert (maria.timezone, maria.opt_out) == ("Europe/Madrid", True)
    assert repo.resolve("jd", "jd_taken") == "someone-else"
    assert repo.customer("crm-4") is None, "a rejected row writes nothing"

    again = import_customers(repo, write(tmp_path, "customers.csv", text))
    assert (again.imported, again.customers_created) == (3, 0)


def test_unknown_format_needs_fmt(repo: CrmRepository, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fmt"):
        import_orders(repo, write(tmp_path, "orders.xlsx", ""))
    with pytest.raises(ValueError, match="fmt"):
        import_orders(repo, io.StringIO(""))
    assert import_orders(repo, io.StringIO(""), fmt="csv").imported == 0
    assert NOW.tzinfo is UTC
