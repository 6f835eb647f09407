"""Export messages from a store database file to JSONL or CSV (used by the CLI).

Synchronous on purpose: it runs in the CLI, outside trio. It opens the file
read-only (``mode=ro``), so it can run while the server is writing (WAL: it
sees one consistent snapshot, taken when the export starts, and never blocks
the server). Rows are streamed from the cursor to ``out``; nothing is
accumulated, so a shop of any size exports in constant memory.

Formats
-------
JSONL: one object per message, keys in this order: conv, seq, ts, time_iso
(UTC, millisecond precision), sender, sender_role, cmid, kind, body (the body
as its wire JSON object, ``"k"`` tag included; ``null`` when the message was
recalled, its body being erased), recalled.

CSV (RFC 4180 via the csv module; open ``out`` with ``newline=""``): a header
row, then conv, seq, ts, time_iso, sender, sender_role, kind, text,
body_json, recalled. ``text`` is the text of text bodies and a one-line
summary of the others (``[image] <url>``...). Cells that a spreadsheet would
run as a formula (starting with = + - @ or a tab/CR) get a leading ``'``:
customers write this text, staff open the file in Excel.
"""

from __future__ import annotations

import csv
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal, TextIO

import msgspec

from protocol import (
    Body,
    FileBody,
    ImageBody,
    OrderCardBody,
    ProductCardBody,
    QuickRepliesBody,
    RecallBody,
    SystemBody,
    TextBody,
    VoiceBody,
)

from ._schema import body_decoder

__all__ = ["CSV_COLUMNS", "ExportFormat", "export_conversation", "export_shop"]

ExportFormat = Literal["jsonl", "csv"]

CSV_COLUMNS: Final = (
    "conv",
    "seq",
    "ts",
    "time_iso",
    "sender",
    "sender_role",
    "kind",
    "text",
    "body_json",
    "recalled",
)

_COLUMNS: Final = "m.conv, m.seq, m.ts, m.sender, m.sender_role, m.cmid, m.kind, m.body, m.recalled"

SQL_EXPORT_CONVERSATION: Final = (
    f"SELECT {_COLUMNS} FROM messages AS m WHERE m.conv = ? ORDER BY m.seq"
)

# INDEXED BY and CROSS JOIN pin the plan that needs no sort: the shop's
# conversations in id order, each one's messages by primary key. A sort would spool the whole
# shop to a temp b-tree before the first row comes out.
SQL_EXPORT_SHOP: Final = f"""
SELECT {_COLUMNS}
FROM conversations AS c INDEXED BY conv_by_shop_id
CROSS JOIN messages AS m ON m.conv = c.id
WHERE c.shop = :shop AND c.updated_at >= :since AND m.ts >= :since
ORDER BY c.id, m.seq
"""
# c.updated_at >= since is implied by m.ts >= since (a message raises its
# conversation's updated_at to its ts) and lets us skip old conversations
# without reading their messages.

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_json: Final = msgspec.json.Encoder()


class _JsonRow(msgspec.Struct):
    conv: str
    seq: int
    ts: int
    time_iso: str
    sender: str
    sender_role: str
    cmid: str
    kind: str
    body: Body | None
    recalled: bool


def export_conversation(db_path: Path | str, conv: str, out: TextIO, fmt: ExportFormat) -> int:
    """Write every message of ``conv`` (by seq) to ``out``; return how many."""
    write = _writer(fmt, out)
    with closing(_connect(db_path)) as conn:
        return write(_snapshot_rows(conn, SQL_EXPORT_CONVERSATION, (conv,)))


def export_shop(
    db_path: Path | str,
    shop: str,
    out: TextIO,
    fmt: ExportFormat,
    since_ms: int | None = None,
) -> int:
    """Write every message of every conversation of ``shop`` (by conversation
    id, then seq), only those with ts >= ``since_ms`` if given; return how many."""
    write = _writer(fmt, out)
    params = {"shop": shop, "since": since_ms if since_ms is not None else 0}
    with closing(_connect(db_path)) as conn:
        return write(_snapshot_rows(conn, SQL_EXPORT_SHOP, params))


def _connect(db_path: Path | str) -> sqlite3.Connection:
    path = Path(db_path)
    if not path.is_file():
        # mode=ro would say "unable to open database file"; be specific.
        raise FileNotFoundError(f"no such database: {path}")
    return sqlite3.connect(
        path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None, timeout=5.0
    )


def _snapshot_rows(
    conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] | dict[str, Any]
) -> Iterator[tuple[Any, ...]]:
    # One read transaction: the export is one consistent snapshot.
    conn.execute("BEGIN")
    try:
        yield from conn.execute(sql, params)
    finally:
        conn.execute("ROLLBACK")


_RowWriter = Callable[[Iterable[tuple[Any, ...]]], int]


def _writer(fmt: str, out: TextIO) -> _RowWriter:
    if fmt == "jsonl":
        return lambda rows: _write_jsonl(rows, out)
    if fmt == "csv":
        return lambda rows: _write_csv(rows, out)
    raise ValueError(f"unknown export format {fmt!r} (expected 'jsonl' or 'csv')")


def _write_jsonl(rows: Iterable[tuple[Any, ...]], out: TextIO) -> int:
    count = 0
    for conv, seq, ts, sender, sender_role, cmid, kind, body, recalled in rows:
        row = _JsonRow(
            conv=conv,
            seq=seq,
            ts=ts,
            time_iso=iso_time(ts),
            sender=sender,
            sender_role=sender_role,
            cmid=cmid,
            kind=kind,
            body=None if recalled else body_decoder.decode(body),
            recalled=bool(recalled),
        )
        out.write(_json.encode(row).decode())
        out.write("\n")
        count += 1
    return count


def _write_csv(rows: Iterable[tuple[Any, ...]], out: TextIO) -> int:
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    count = 0
    for conv, seq, ts, sender, sender_role, _cmid, kind, body, recalled in rows:
        if recalled:
            text, body_json = "[recalled]", ""
        else:
            decoded = body_decoder.decode(body)
            text, body_json = summarize(decoded), _json.encode(decoded).decode()
        writer.writerow(
            (
                _cell(conv),
                seq,
                ts,
                iso_time(ts),
                _cell(sender),
                sender_role,
                kind,
                _cell(text),
                body_json,
                "true" if recalled else "false",
            )
        )
        count += 1
    return count


def iso_time(ts_ms: int) -> str:
    """UTC ISO 8601 with milliseconds, e.g. 2024-05-01T08:30:00.123Z (exact:
    integer arithmetic, no float rounding)."""
    return (_EPOCH + timedelta(milliseconds=ts_ms)).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{ts_ms % 1000:03d}Z"
    )


def summarize(body: Body) -> str:
    """One line of text for a body (the CSV ``text`` column)."""
    if isinstance(body, TextBody):
        return body.text
    if isinstance(body, ImageBody):
        return f"[image] {body.url}"
    if isinstance(body, VoiceBody):
        return f"[voice {body.duration_ms / 1000:.1f}s] {body.url}"
    if isinstance(body, FileBody):
        return f"[file] {body.name} {body.url}"
    if isinstance(body, ProductCardBody):
        return (
            f"[product] {body.title} {_money(body.price_cents, body.currency)} {body.url}".rstrip()
        )
    if isinstance(body, OrderCardBody):
        return f"[order] {body.order_id} {body.status} {_money(body.amount_cents, body.currency)}"
    if isinstance(body, QuickRepliesBody):
        return f"{body.text} [{' | '.join(body.options)}]"
    if isinstance(body, SystemBody):
        return f"[system] {body.event}"
    if isinstance(body, RecallBody):
        return f"[recall] #{body.seq}"
    return f"[{type(body).__name__}]"


def _money(cents: int, currency: str) -> str:
    return f"{cents // 100}.{cents % 100:02d} {currency}"


_FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_STARTS) else value
