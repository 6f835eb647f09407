"""Export of conversations and shops to JSONL and CSV."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from imserver.store import MarkRecalled, SqliteStore, export_conversation, export_shop
from imserver.store._export import CSV_COLUMNS, iso_time, summarize
from protocol import (
    FileBody,
    ImageBody,
    OrderCardBody,
    ProductCardBody,
    QuickRepliesBody,
    RecallBody,
    Role,
    SystemBody,
    TextBody,
    VoiceBody,
)

from .conftest import put_conv, put_msg

T0 = 1_714_552_200_123  # 2024-05-01T08:30:00.123Z
IMAGE = ImageBody(url="https://cdn/x.png", hash="abc", size=1234, mime="image/png", width=640)


@pytest.fixture
async def exported_db(store: SqliteStore, db_path: Path) -> Path:
    await store.write(
        [
            put_conv("c1", shop="s1"),
            put_conv("c2", shop="s1"),
            put_conv("c0", shop="s2"),
            put_msg("c1", 1, ts=T0, body=TextBody(text='你好, "quoted"\nsecond line')),
            put_msg("c1", 2, ts=T0 + 1, body=IMAGE, sender="agent-7", role=Role.AGENT, cmid="x"),
            put_msg("c1", 3, ts=T0 + 2, body=TextBody(text='=HYPERLINK("http://evil")')),
            put_msg("c1", 4, ts=T0 + 3, body=TextBody(text="oops")),
            put_msg("c2", 1, ts=1000, body=TextBody(text="old")),
            put_msg("c2", 2, ts=T0 + 10, body=TextBody(text="new")),
            put_msg("c0", 1, ts=T0, body=TextBody(text="other shop")),
        ]
    )
    await store.write([MarkRecalled(conv="c1", seq=4)])
    return db_path  # the store stays open: export reads beside a live writer


def test_iso_time_is_exact() -> None:
    assert iso_time(T0) == "2024-05-01T08:30:00.123Z"
    assert iso_time(0) == "1970-01-01T00:00:00.000Z"
    assert iso_time(999) == "1970-01-01T00:00:00.999Z"


async def test_export_conversation_jsonl(exported_db: Path) -> None:
    out = io.StringIO()
    assert export_conversation(exported_db, "c1", out, "jsonl") == 4
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["seq"] for r in rows] == [1, 2, 3, 4]
    assert list(rows[0]) == [
        "conv", "seq", "ts", "time_iso", "sender", "sender_role", "cmid", "kind", "body", "recalled",
    ]  # fmt: skip
    assert rows[0] == {
        "conv": "c1",
        "seq": 1,
        "ts": T0,
        "time_iso": "2024-05-01T08:30:00.123Z",
        "sender": "cust-1",
        "sender_role": "customer",
        "cmid": "c1",
        "kind": "text",
        "body": {"k": "text", "text": '你好, "quoted"\nsecond line'},
        "recalled": False,
    }
    assert rows[1]["body"] == {
        "k": "image", "url": "https://cdn/x.png", "hash": "abc", "size": 1234,
        "mime": "image/png", "width": 640,
    }  # fmt: skip
    assert (rows[1]["sender"], rows[1]["sender_role"], rows[1]["kind"]) == (
        "agent-7",
        "agent",
        "image",
    )
    assert rows[3]["recalled"] is True
    assert rows[3]["body"] is None


async def test_export_conversation_csv(exported_db: Path) -> None:
    out = io.StringIO(newline="")
    assert export_conversation(exported_db, "c1", out, "csv") == 4
    out.seek(0)
    reader = csv.DictReader(out)
    assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
    rows = list(reader)
    assert rows[0]["text"] == '你好, "quoted"\nsecond line'  # csv quoting round-trips
    assert json.loads(rows[0]["body_json"]) == {"k": "text", "text": '你好, "quoted"\nsecond line'}
    assert rows[0]["time_iso"] == "2024-05-01T08:30:00.123Z"
    assert rows[1]["text"] == "[image] https://cdn/x.png"
    assert rows[1]["kind"] == "image"
    assert rows[2]["text"] == '\'=HYPERLINK("http://evil")'  # not a live formula
    assert json.loads(rows[2]["body_json"])["text"] == '=HYPERLINK("http://evil")'  # exact
    assert (rows[3]["text"], rows[3]["body_json"], rows[3]["recalled"]) == (
        "[recalled]",
        "",
        "true",
    )
    assert [r["recalled"] for r in rows[:3]] == ["false"] * 3


async def test_export_shop_streams_by_conversation_then_seq(exported_db: Path) -> None:
    out = io.StringIO()
    assert export_shop(exported_db, "s1", out, "jsonl") == 6
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["conv"], r["seq"]) for r in rows] == [
        ("c1", 1), ("c1", 2), ("c1", 3), ("c1", 4), ("c2", 1), ("c2", 2),
    ]  # fmt: skip
    out = io.StringIO()
    assert export_shop(exported_db, "s1", out, "jsonl", since_ms=T0 + 2) == 3
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["conv"], r["seq"]) for r in rows] == [("c1", 3), ("c1", 4), ("c2", 2)]
    out = io.StringIO(newline="")
    assert export_shop(exported_db, "s1", out, "csv", since_ms=T0 + 10) == 1
    assert out.getvalue().splitlines()[1].startswith("c2,2,")
    out = io.StringIO()
    assert export_shop(exported_db, "nobody", out, "jsonl") == 0
    assert out.getvalue() == ""


async def test_export_errors(exported_db: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        export_conversation(tmp_path / "missing.db", "c1", io.StringIO(), "jsonl")
    with pytest.raises(ValueError, match="format"):
        export_conversation(exported_db, "c1", io.StringIO(), "xml")  # type: ignore[arg-type]
    assert not (tmp_path / "missing.db").exists()


def test_summaries() -> None:
    assert summarize(TextBody(text="hi")) == "hi"
    assert summarize(IMAGE) == "[image] https://cdn/x.png"
    voice = VoiceBody(url="u", hash="h", size=1, mime="audio/ogg", duration_ms=2500)
    assert summarize(voice) == "[voice 2.5s] u"
    assert (
        summarize(FileBody(url="u", hash="h", size=1, mime="m", name="a.pdf")) == "[file] a.pdf u"
    )
    product = ProductCardBody(product_id="p1", title="Tea", price_cents=1999)
    assert summarize(product) == "[product] Tea 19.99 CNY"
    order = OrderCardBody(order_id="o1", status="paid", amount_cents=505, currency="USD")
    assert summarize(order) == "[order] o1 paid 5.05 USD"
    assert summarize(QuickRepliesBody(text="Pick", options=["a", "b"])) == "Pick [a | b]"
    assert summarize(SystemBody(event="assigned")) == "[system] assigned"
    assert summarize(RecallBody(seq=4)) == "[recall] #4"
