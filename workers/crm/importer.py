"""Import orders and customers from CSV, JSON (an array of objects) or JSON Lines.

Every record is validated on its own. A bad record is reported with the line it
starts on (``RowError``) and skipped; the others are imported. ``ImportReport``
counts what happened. Importing the same file twice is harmless: orders are upserted
(last-writer-wins on ``updated_at``), customers are resolved through their channel
identity.

Order records - columns / keys (Chinese Taobao export headers are accepted too,
see ``FIELD_ALIASES``):

=============== ======== ===========================================================
field           required notes
=============== ======== ===========================================================
shop            yes*     \\* or pass ``shop=`` for the whole file
order_id        yes
channel         yes      taobao, tmall, 1688, aliexpress, jd, web, app (or 淘宝, 天猫...)
customer        one of   unified customer id (created if unknown) ...
external_id     one of   ... or the buyer's id on ``channel`` (created if unknown)
user            no       the chat user id the buyer chats as, when it is not
                         ``external_id`` on ``channel`` (linked to the customer)
display_name    no       used when a customer is created
timezone        no       IANA name, used when a customer is created
status          yes      canonical (paid, shipped...) or Taobao (交易成功, TRADE_FINISHED...)
amount_cents    yes*     integer minor units, \\* or ``amount`` in major units ("199.00")
currency        no       ISO-4217, default CNY
items           no       JSON list, or "Title x2; Other title" (CSV)
carrier         no
tracking_no     no
eta             no       ISO date
created_at      yes      ISO 8601 or epoch seconds; naive = ``naive_timezone``
updated_at      no       default ``created_at``
=============== ======== ===========================================================

Customer records: ``customer`` and/or ``channel`` + ``external_id``, and optionally
``user`` (their chat user id), ``display_name``, ``timezone``, ``opt_out`` (1/0,
true/false, yes/no, 是/否), ``member_level``.

How a chat user finds these records, and the formats with examples: docs/CRM.md.

Line numbers: CSV - the physical line a record starts on (the header is line 1);
JSON Lines - the line; JSON array - the line the element starts on. A JSON array
with a syntax error cannot be resynchronised: the error is reported at its line and
the rest of the file is skipped (elements before it are imported). Prefer JSON
Lines for large exports.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Final, Literal, TextIO
from zoneinfo import ZoneInfo

import msgspec

from workers.crm.loyalty import MAX_LEVEL, MINOR_UNITS_PER_MAJOR
from workers.crm.models import DEFAULT_CURRENCY, Order, OrderItem
from workers.crm.repository import (
    CrmError,
    CrmStore,
    check_channel,
    check_id,
    check_order,
    check_timezone,
    customer_id_for,
)

#: Orders written per transaction.
IMPORT_BATCH_SIZE: Final = 500

#: Timezone of timestamps without an offset. Taobao/Tmall/1688/JD exports are in
#: Beijing time and carry no offset.
DEFAULT_NAIVE_TIMEZONE: Final = "Asia/Shanghai"

Format = Literal["csv", "json", "jsonl"]
Source = str | Path | TextIO

#: Header / key aliases -> canonical field names (keys are compared case-insensitively).
FIELD_ALIASES: Final[Mapping[str, str]] = {
    "订单编号": "order_id",
    "订单号": "order_id",
    "order_no": "order_id",
    "tid": "order_id",
    "店铺": "shop",
    "店铺名称": "shop",
    "shop_id": "shop",
    "渠道": "channel",
    "平台": "channel",
    "platform": "channel",
    "客户id": "customer",
    "customer_id": "customer",
    "买家会员名": "external_id",
    "买家": "external_id",
    "buyer_nick": "external_id",
    "buyer_id": "external_id",
    "buyer": "external_id",
    "买家昵称": "display_name",
    "name": "display_name",
    "nickname": "display_name",
    "时区": "timezone",
    "tz": "timezone",
    "chat_user": "user",
    "im_user": "user",
    "聊天账号": "user",
    "订单状态": "status",
    "买家实际支付金额": "amount",
    "实付金额": "amount",
    "payment": "amount",
    "金额": "amount",
    "币种": "currency",
    "宝贝标题": "items",
    "商品": "items",
    "物流公司": "carrier",
    "快递公司": "carrier",
    "物流单号": "tracking_no",
    "运单号": "tracking_no",
    "快递单号": "tracking_no",
    "预计送达": "eta",
    "订单创建时间": "created_at",
    "下单时间": "created_at",
    "created": "created_at",
    "更新时间": "updated_at",
    "modified": "updated_at",
    "退订": "opt_out",
    "会员等级": "member_level",
    "level": "member_level",
}

#: Platform status labels -> canonical statuses. Note 交易关闭 is mapped to
#: ``cancelled``; Taobao's TRADE_CLOSED (closed after a full refund) to ``refunded``.
STATUS_ALIASES: Final[Mapping[str, str]] = {
    "pending": "pending_payment",
    "wait_buyer_pay": "pending_payment",
    "等待买家付款": "pending_payment",
    "待付款": "pending_payment",
    "备货中": "processing",
    "运输中": "in_transit",
    "派送中": "out_for_delivery",
    "wait_seller_send_goods": "paid",
    "买家已付款": "paid",
    "等待卖家发货": "paid",
    "待发货": "paid",
    "wait_buyer_confirm_goods": "shipped",
    "卖家已发货": "shipped",
    "已发货": "shipped",
    "等待买家确认收货": "shipped",
    "trade_buyer_signed": "delivered",
    "已签收": "delivered",
    "trade_finished": "completed",
    "交易成功": "completed",
    "已完成": "completed",
    "退款中": "refunding",
    "trade_closed": "refunded",
    "已退款": "refunded",
    "退款成功": "refunded",
    "trade_closed_by_taobao": "cancelled",
    "交易关闭": "cancelled",
    "已取消": "cancelled",
}

#: Channel labels -> channels.
CHANNEL_ALIASES: Final[Mapping[str, str]] = {
    "淘宝": "taobao",
    "天猫": "tmall",
    "阿里巴巴": "1688",
    "alibaba": "1688",
    "速卖通": "aliexpress",
    "京东": "jd",
    "官网": "web",
    "商城": "web",
    "小程序": "app",
}

_TRUE: Final = frozenset({"1", "true", "yes", "y", "是"})
_FALSE: Final = frozenset({"0", "false", "no", "n", "否"})
_ITEM_QTY: Final = re.compile(r"^(?P<title>.*?)\s*[x×*]\s*(?P<qty>\d+)$")
_ITEMS_DECODER: Final = msgspec.json.Decoder(list[OrderItem | str])


class RowError(msgspec.Struct, frozen=True, kw_only=True):
    line: int
    message: str
    key: str = ""
    """The order id / customer of the record when it could be read."""


class ImportReport(msgspec.Struct, frozen=True, kw_only=True):
    """``imported`` = records accepted (``inserted + updated + unchanged + stale`` for
    orders); ``rejected`` = ``len(errors)``."""

    imported: int = 0
    rejected: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    stale: int = 0
    customers_created: int = 0
    errors: tuple[RowError, ...] = ()


class _Rejected(ValueError):
    pass


Record = dict[str, object]

# ---------------------------------------------------------------- readers


def detect_format(path: str | Path) -> Format:
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    raise ValueError(f"cannot tell the format of {path} (pass fmt='csv'|'json'|'jsonl')")


@contextmanager
def _opened(source: Source, encoding: str) -> Iterator[TextIO]:
    if isinstance(source, str | Path):
        with open(source, encoding=encoding, newline="") as f:
            yield f
    else:
        yield source


def _canonical_key(key: str) -> str:
    k = key.strip().lstrip("\ufeff").strip().lower()
    return FIELD_ALIASES.get(k, k)


def _canonical(record: Mapping[str, object]) -> Record:
    return {_canonical_key(k): v for k, v in record.items()}


def read_records(f: TextIO, fmt: Format) -> Iterator[tuple[int, Record | RowError]]:
    """``(line, record or error)`` for each record of ``f``; keys are canonical."""
    if fmt == "csv":
        yield from _read_csv(f)
        return
    text = f.read()
    if fmt == "json" and text.lstrip().startswith("["):
        yield from _read_json_array(text)
    else:
        yield from _read_json_lines(text)


def _read_csv(f: TextIO) -> Iterator[tuple[int, Record | RowError]]:
    reader = csv.reader(f)
    try:
        header = next(reader, None)
    except csv.Error as e:
        yield 1, RowError(line=1, message=f"unreadable CSV header: {e}")
        return
    if header is None:
        return
    keys = [_canonical_key(h) for h in header]
    end = reader.line_num
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, RowError(line=start, message=f"malformed CSV, rest skipped: {e}")
            return
        end = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(keys):
            yield start, RowError(line=start, message=f"{len(row)} fields, header has {len(keys)}")
            continue
        yield start, dict(zip(keys, row, strict=True))


def _json_loads(text: str) -> object:
    return json.loads(text, parse_float=Decimal)


def _read_json_lines(text: str) -> Iterator[tuple[int, Record | RowError]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = _json_loads(line)
        except ValueError as e:
            yield line_no, RowError(line=line_no, message=f"malformed JSON: {e}")
            continue
        yield line_no, _as_record(value, line_no)


def _read_json_array(text: str) -> Iterator[tuple[int, Record | RowError]]:
    decoder = json.JSONDecoder(parse_float=Decimal)
    pos = text.index("[") + 1

    def skip_blanks(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    pos = skip_blanks(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        pos = skip_blanks(pos)
        line_no = line_of(pos)
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError as e:
            yield line_no, RowError(line=line_no, message=f"malformed JSON, rest skipped: {e}")
            return
        yield line_no, _as_record(value, line_no)
        pos = skip_blanks(pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            return
        line_no = line_of(pos)
        yield (
            line_no,
            RowError(
                line=line_no, message="malformed JSON array (expected ',' or ']'), rest skipped"
            ),
        )
        return


def _as_record(value: object, line_no: int) -> Record | RowError:
    if not isinstance(value, dict):
        return RowError(line=line_no, message=f"expected an object, got {type(value).__name__}")
    return _canonical(value)


# ---------------------------------------------------------------- field parsing


def _text(rec: Record, key: str) -> str | None:
    value = rec.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise _Rejected(f"{key}: expected text, got a boolean")
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int | Decimal):
        return str(value)
    raise _Rejected(f"{key}: expected text, got {type(value).__name__}")


def _required(rec: Record, key: str) -> str:
    value = _text(rec, key)
    if value is None:
        raise _Rejected(f"missing {key}")
    return value


def _channel(rec: Record) -> str | None:
    raw = _text(rec, "channel")
    if raw is None:
        return None
    name = CHANNEL_ALIASES.get(raw.lower(), raw.lower())
    try:
        return check_channel(name)
    except ValueError as e:
        raise _Rejected(str(e)) from None


def _status(rec: Record) -> str:
    raw = _required(rec, "status")
    return STATUS_ALIASES.get(raw.lower(), raw.lower())


def _integer(rec: Record, key: str) -> int | None:
    value = rec.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _Rejected(f"{key}: expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise _Rejected(f"{key}: not an integer: {value!r}") from None
    if number != number.to_integral_value():
        raise _Rejected(f"{key}: not an integer: {value!r}")
    return int(number)


def _amount_cents(rec: Record, currency: str) -> int:
    cents = _integer(rec, "amount_cents")
    if cents is not None:
        return cents
    raw = _text(rec, "amount")
    if raw is None:
        raise _Rejected("missing amount_cents (or amount)")
    cleaned = raw.replace(",", "").lstrip("¥￥$€").strip()
    try:
        amount = Decimal(cleaned)
    except InvalidOperation:
        raise _Rejected(f"amount: not a number: {raw!r}") from None
    minor = amount * MINOR_UNITS_PER_MAJOR.get(currency, 100)
    if not amount.is_finite() or minor != minor.to_integral_value():
        raise _Rejected(f"amount: too many decimals for {currency}: {raw!r}")
    return int(minor)


def _timestamp(rec: Record, key: str, naive_tz: ZoneInfo) -> datetime | None:
    value = rec.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), UTC)
    if not isinstance(value, str):
        raise _Rejected(f"{key}: expected a timestamp, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value.strip().replace("/", "-"))
    except ValueError:
        raise _Rejected(f"{key}: not an ISO 8601 timestamp: {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=naive_tz)
    return parsed.astimezone(UTC)


def _date(rec: Record, key: str) -> date | None:
    raw = _text(rec, key)
    if raw is None:
        return None
    try:
        return date.fromisoformat(raw[:10].replace("/", "-"))
    except ValueError:
        raise _Rejected(f"{key}: not an ISO date: {raw!r}") from None


def parse_items(value: object) -> tuple[OrderItem, ...]:
    """Items from a JSON list (objects or titles) or ``"Title x2; Other"`` text."""
    if value is None or value == "":
        return ()
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = _json_loads(value)
        except ValueError:
            raise _Rejected("items: malformed JSON") from None
    if isinstance(value, list):
        try:
            decoded = _ITEMS_DECODER.decode(
                msgspec.json.encode([float(v) if isinstance(v, Decimal) else v for v in value])
            )
        except msgspec.ValidationError as e:
            raise _Rejected(f"items: {e}") from None
        return tuple(_item_from_text(v) if isinstance(v, str) else v for v in decoded)
    if isinstance(value, str):
        parts = re.split(r"[;；\n]", value)
        return tuple(_item_from_text(p) for p in parts if p.strip())
    raise _Rejected(f"items: expected a list or text, got {type(value).__name__}")


def _item_from_text(text: str) -> OrderItem:
    text = text.strip()
    m = _ITEM_QTY.match(text)
    if m and m["title"]:
        return OrderItem(title=m["title"], quantity=int(m["qty"]))
    return OrderItem(title=text)


def _parse_bool(rec: Record, key: str) -> bool | None:
    value = rec.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text == "":
        return None
    if text in _FALSE:
        return False
    raise _Rejected(f"{key}: expected yes/no, got {value!r}")


def _timezone(rec: Record) -> str | None:
    tz = _text(rec, "timezone")
    if tz is None:
        return None
    try:
        return check_timezone(tz)
    except ValueError as e:
        raise _Rejected(str(e)) from None


def _checked_id(value: str, what: str) -> str:
    try:
        return check_id(value, what)
    except ValueError as e:
        raise _Rejected(str(e)) from None


# ---------------------------------------------------------------- order import


class _Counts:
    def __init__(self) -> None:
        self.inserted = self.updated = self.unchanged = self.stale = self.created = 0
        self.errors: list[RowError] = []

    def report(self) -> ImportReport:
        imported = self.inserted + self.updated + self.unchanged + self.stale
        return ImportReport(
            imported=imported,
            rejected=len(self.errors),
            inserted=self.inserted,
            updated=self.updated,
            unchanged=self.unchanged,
            stale=self.stale,
            customers_created=self.created,
            errors=tuple(sorted(self.errors, key=lambda e: e.line)),
        )


def _parse_order(rec: Record, *, shop: str | None, naive_tz: ZoneInfo) -> Order:
    """Everything but the customer (left as a placeholder), validated."""
    currency = (_text(rec, "currency") or DEFAULT_CURRENCY).upper()
    created = _timestamp(rec, "created_at", naive_tz)
    if created is None:
        raise _Rejected("missing created_at")
    channel = _channel(rec)
    if channel is None:
        raise _Rejected("missing channel")
    order = Order(
        shop=_text(rec, "shop") or shop or "",
        order_id=_required(rec, "order_id"),
        customer="?",
        channel=channel,
        status=_status(rec),
        amount_cents=_amount_cents(rec, currency),
        currency=currency,
        items=parse_items(rec.get("items")),
        carrier=_text(rec, "carrier"),
        tracking_no=_text(rec, "tracking_no"),
        eta=_date(rec, "eta"),
        created_at=created,
        updated_at=_timestamp(rec, "updated_at", naive_tz) or created,
    )
    if not order.shop:
        raise _Rejected("missing shop")
    try:
        check_order(order)
    except ValueError as e:
        raise _Rejected(str(e)) from None
    return order


def _order_customer(store: CrmStore, rec: Record, channel: str, counts: _Counts) -> str:
    """Resolve (or create) the order's customer. Runs only for otherwise valid rows."""
    customer = _text(rec, "customer")
    external = _text(rec, "external_id")
    user = _text(rec, "user")
    timezone = _timezone(rec)
    try:
        if customer is not None:
            customer = _checked_id(customer, "customer")
            if store.customer(customer) is None:  # the shop's own id, before any chat
                store.upsert_customer(
                    customer, display_name=_text(rec, "display_name"), timezone=timezone
                )
                counts.created += 1
            if external is not None:
                _link(store, channel, _checked_id(external, "external_id"), customer)
        elif external is not None:
            customer, created = store.ensure_customer(
                channel,
                _checked_id(external, "external_id"),
                display_name=_text(rec, "display_name"),
                timezone=timezone,
            )
            counts.created += created
        else:
            raise _Rejected("missing customer (or the buyer's external_id)")
        if user is not None:
            store.link_chat_user(_checked_id(user, "user"), customer)
    except CrmError as e:
        raise _Rejected(str(e)) from None
    return customer


def _link(store: CrmStore, channel: str, external: str, customer: str) -> None:
    """Attach an identity to the customer a file names. The placeholder customer an
    earlier order import or chat created for that identity alone (its id derives from
    it) is merged in: the file is the shop's word on who that buyer is. Any other
    owner is a conflict (``IdentityConflictError``)."""
    owner = store.resolve(channel, external)
    store.link_identity(
        channel, external, customer, merge=owner == customer_id_for(channel, external)
    )


def import_orders(
    store: CrmStore,
    source: Source,
    *,
    fmt: Format | None = None,
    shop: str | None = None,
    naive_timezone: str = DEFAULT_NAIVE_TIMEZONE,
    encoding: str = "utf-8-sig",
    batch_size: int = IMPORT_BATCH_SIZE,
) -> ImportReport:
    """Import orders; see the module docstring for fields. ``shop`` is the default shop
    for records without one. Exports from Excel in GBK need ``encoding="gbk"``."""
    fmt = fmt or _format_of(source)
    naive_tz = ZoneInfo(check_timezone(naive_timezone))
    counts = _Counts()
    batch: list[tuple[int, Order]] = []
    with _opened(source, encoding) as f:
        for line, rec in read_records(f, fmt):
            if isinstance(rec, RowError):
                counts.errors.append(rec)
                continue
            key = str(rec.get("order_id") or "")
            try:
                order = _parse_order(rec, shop=shop, naive_tz=naive_tz)
                customer = _order_customer(store, rec, order.channel, counts)
            except _Rejected as e:
                counts.errors.append(RowError(line=line, message=str(e), key=key))
                continue
            batch.append((line, msgspec.structs.replace(order, customer=customer)))
            if len(batch) >= batch_size:
                _flush(store, batch, counts)
    _flush(store, batch, counts)
    return counts.report()


def _flush(store: CrmStore, batch: list[tuple[int, Order]], counts: _Counts) -> None:
    if not batch:
        return
    try:
        results = [store.upsert_orders([o for _, o in batch])]
    except (ValueError, CrmError):
        # Something in the batch slipped past validation: isolate it row by row.
        results = []
        for line, order in batch:
            try:
                results.append(store.upsert_orders([order]))
            except (ValueError, CrmError) as e:
                counts.errors.append(RowError(line=line, message=str(e), key=order.order_id))
    for r in results:
        counts.inserted += r.inserted
        counts.updated += r.updated
        counts.unchanged += r.unchanged
        counts.stale += r.stale
    batch.clear()


def _format_of(source: Source) -> Format:
    if isinstance(source, str | Path):
        return detect_format(source)
    raise ValueError("pass fmt= when importing from a stream")


# ---------------------------------------------------------------- customer import


def import_customers(
    store: CrmStore, source: Source, *, fmt: Format | None = None, encoding: str = "utf-8-sig"
) -> ImportReport:
    """Import customers and their channel identities; see the module docstring."""
    fmt = fmt or _format_of(source)
    counts = _Counts()
    with _opened(source, encoding) as f:
        for line, rec in read_records(f, fmt):
            if isinstance(rec, RowError):
                counts.errors.append(rec)
                continue
            key = str(rec.get("customer") or rec.get("external_id") or "")
            try:
                created = _import_customer(store, rec)
            except _Rejected as e:
                counts.errors.append(RowError(line=line, message=str(e), key=key))
                continue
            counts.created += created
            counts.inserted += created
            counts.updated += not created
    return counts.report()


def _import_customer(store: CrmStore, rec: Record) -> bool:
    customer = _text(rec, "customer")
    channel = _channel(rec)
    external = _text(rec, "external_id")
    display_name = _text(rec, "display_name")
    timezone = _timezone(rec)
    opt_out = _parse_bool(rec, "opt_out")
    level = _integer(rec, "member_level")
    if level is not None and not 0 <= level <= MAX_LEVEL:
        raise _Rejected(f"member_level must be 0..{MAX_LEVEL}, got {level}")
    if (channel is None) != (external is None):
        raise _Rejected("channel and external_id go together")
    if customer is None and external is None:
        raise _Rejected("missing customer (or channel + external_id)")
    if customer is not None:
        customer = _checked_id(customer, "customer")
    if external is not None:
        external = _checked_id(external, "external_id")

    if customer is not None:
        created = store.customer(customer) is None
        if channel is not None and external is not None:
            owner = store.resolve(channel, external)
            if owner not in (None, customer, customer_id_for(channel, external)):
                raise _Rejected(f"{channel}:{external} belongs to {owner!r}, not {customer!r}")
        store.upsert_customer(customer, display_name=display_name, timezone=timezone)
        if channel is not None and external is not None:
            try:
                _link(store, channel, external, customer)
            except CrmError as e:
                raise _Rejected(str(e)) from None
    else:
        assert channel is not None and external is not None
        customer, created = store.ensure_customer(
            channel, external, display_name=display_name, timezone=timezone
        )
        if not created:
            store.upsert_customer(customer, display_name=display_name, timezone=timezone)
    user = _text(rec, "user")
    if user is not None:
        try:
            store.link_chat_user(_checked_id(user, "user"), customer)
        except CrmError as e:
            raise _Rejected(str(e)) from None
    if opt_out is not None:
        store.set_opt_out(customer, opt_out)
    if level is not None:
        store.set_level(customer, level)
    return created
