"""The CRM plugin's data layer: customers, channel identities, orders, tags, points,
RFM scores and the broadcast log, in one SQLite file.

Theory of operation
-------------------
Scope
    One CRM database belongs to one merchant. A merchant runs several shops
    (``shop`` ids, e.g. its Tmall store and its AliExpress store). Customers are
    merchant-wide *unified* customers; orders, tags and RFM scores are per shop;
    membership (level, points), opt-out and channel identities are merchant-wide.

Identity unification
    A buyer shows up as ``(channel, external_id)`` - a Taobao nick, a JD pin, an app
    user id. ``identities`` maps each such pair to exactly one unified customer id.
    ``ensure_customer`` resolves a pair or creates a customer for it (the new id is a
    hash of the pair, so re-importing is deterministic). ``link_identity`` attaches a
    pair to a chosen customer; if the pair already belongs to someone else that is a
    conflict, unless ``merge=True`` says they are the same person, in which case
    ``merge_customers`` folds the other customer into the chosen one: identities,
    orders, tags (manual wins over rule), points ledger, RFM rows and broadcast log
    move over; opt-out is OR-ed (never re-subscribe anyone by merging), the level
    is the max, points are the sum, and the absorbed customer row is deleted.

Chat users
    A buyer chats as an IM user id (the token's subject) through a channel (the
    conversation's ``channel``). ``chat_customer(user, channel)`` is the customer
    behind them, first hit wins: an explicit link in ``chat_users`` (``link_chat_user``:
    the ``user`` column of an import, ``imserver crm link``), else the identity
    ``(channel, user)`` (the chat user id *is* the buyer's id on that channel, e.g. a
    Taobao nick), else a customer whose id is ``user`` (a shop whose own customer ids
    are its chat ids), else ``customer_id_for(channel, user)`` - the id the first
    import or chat of that identity creates, so the answer never depends on which
    came first. ``register_chat_user`` (the CRM plugin, when a conversation opens)
    makes that customer exist and records the link. An explicit link replaces a
    placeholder customer created by an earlier chat by merging it in.

Orders
    Keyed by ``(shop, order_id)``. ``upsert_orders`` is last-writer-wins on
    ``updated_at``: a row older than the stored one is counted ``stale`` and ignored,
    so replaying an old export never moves a shipped order back to "paid". A batch is
    one transaction: all or nothing. Money is integer minor units + currency.

Time
    Timestamps are stored as integer microseconds since the Unix epoch (UTC) and
    returned as aware UTC datetimes; naive datetimes are rejected. Record-keeping
    stamps (customer created, tag added, ledger entry) come from the ``clock`` given
    to the constructor; business computations (RFM, rules, broadcast) take an
    explicit ``now`` from their caller and are pure given the stored rows.

Concurrency
    The API is synchronous; the worker calls it from a thread (``trio.to_thread``).
    One connection is shared by all threads (``check_same_thread=False``) behind a
    re-entrant lock, so calls are serialized within the process. The file is in WAL
    mode, so other processes (an import job, a report) can read while we write.
    Writes use ``BEGIN IMMEDIATE`` so a writer never deadlocks on lock upgrade.

Replaceability
    Business logic (``rfm``, ``tagging``, ``loyalty``, ``broadcast``, ``importer``)
    is written against the ``CrmStore`` protocol, never against this class. The bot
    only needs ``OrderLookup``.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from workers.crm.loyalty import MAX_LEVEL, POINTS_KINDS, QUALIFYING_KINDS, is_vip
from workers.crm.models import (
    CHANNELS,
    DEFAULT_TIMEZONE,
    ORDER_STATUSES,
    REVENUE_STATUSES,
    Customer,
    CustomerProfile,
    Identity,
    Order,
    OrderInfo,
    OrderItem,
    PointsEntry,
    RfmScore,
    Segment,
    Tag,
    TagSource,
    UpsertResult,
    parse_segment,
)

#: Orders shown in the agent sidebar (``CustomerProfile.recent_orders``).
PROFILE_RECENT_ORDERS: Final = 5

#: Default ``limit`` of ``recent_orders``.
DEFAULT_RECENT_ORDERS: Final = 10

#: How long a call waits for another process's write lock before failing.
BUSY_TIMEOUT_MS: Final = 5_000

#: Length limits for ids and tags (bytes of UTF-8 would be stricter; chars suffice).
MAX_ID_LENGTH: Final = 128
MAX_TAG_LENGTH: Final = 64

SCHEMA_VERSION: Final = 2
"""v2 added ``chat_users`` (created on open; v1 files upgrade in place)."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)
_ITEMS_DECODER: Final = msgspec.json.Decoder(tuple[OrderItem, ...])

# ---------------------------------------------------------------- errors


class CrmError(Exception):
    """Base class of the errors this module raises (besides ``ValueError`` for bad input)."""


class UnknownCustomerError(CrmError):
    def __init__(self, customer: str) -> None:
        super().__init__(f"unknown customer {customer!r}")
        self.customer = customer


class IdentityConflictError(CrmError):
    def __init__(self, channel: str, external_id: str, owner: str, wanted: str) -> None:
        super().__init__(
            f"{channel}:{external_id} belongs to {owner!r}, not {wanted!r};"
            " pass merge=True if they are the same person"
        )
        self.owner = owner
        self.wanted = wanted


class InsufficientPointsError(CrmError):
    pass


# ---------------------------------------------------------------- protocols


class OrderLookup(Protocol):
    """What the bot engine needs."""

    def order(self, shop: str, order_id: str) -> OrderInfo | None: ...

    def latest_order(self, shop: str, customer: str) -> OrderInfo | None: ...


class CrmStore(OrderLookup, Protocol):
    """Everything the CRM business logic needs from storage."""

    # customers and identities
    def upsert_customer(
        self, customer: str, *, display_name: str | None = None, timezone: str | None = None
    ) -> Customer: ...

    def customer(self, customer: str) -> Customer | None: ...

    def ensure_customer(
        self,
        channel: str,
        external_id: str,
        *,
        display_name: str | None = None,
        timezone: str | None = None,
    ) -> tuple[str, bool]: ...

    def link_identity(
        self, channel: str, external_id: str, customer: str, *, merge: bool = False
    ) -> str: ...

    def resolve(self, channel: str, external_id: str) -> str | None: ...

    def identities(self, customer: str) -> list[Identity]: ...

    def chat_customer(self, user: str, channel: str) -> str: ...

    def link_chat_user(self, user: str, customer: str, *, merge: bool = False) -> bool: ...

    def merge_customers(self, keep: str, absorb: str) -> None: ...

    def set_opt_out(self, customer: str, opt_out: bool = True) -> None: ...

    def is_vip(self, customer: str) -> bool: ...

    # orders
    def upsert_orders(self, batch: Iterable[Order]) -> UpsertResult: ...

    def recent_orders(
        self, shop: str, customer: str, limit: int = DEFAULT_RECENT_ORDERS
    ) -> list[OrderInfo]: ...

    def shop_orders(self, shop: str) -> list[Order]: ...

    # tags
    def add_tag(
        self, shop: str, customer: str, tag: str, *, source: TagSource = "manual"
    ) -> bool: ...

    def remove_tag(
        self, shop: str, customer: str, tag: str, *, source: TagSource | None = None
    ) -> bool: ...

    def tags(self, shop: str, customer: str) -> list[Tag]: ...

    def shop_tags(self, shop: str) -> dict[str, list[Tag]]: ...

    # membership
    def set_level(self, customer: str, level: int) -> None: ...

    def add_points(
        self,
        customer: str,
        delta: int,
        *,
        kind: str = "manual",
        ref: str | None = None,
        at: datetime | None = None,
        allow_negative: bool = False,
    ) -> bool: ...

    def points_entry(self, ref: str) -> PointsEntry | None: ...

    def qualifying_points(self, customer: str) -> int: ...

    # RFM
    def save_rfm_scores(
        self, shop: str, scores: Iterable[RfmScore], scored_at: datetime
    ) -> None: ...

    def rfm_score(self, shop: str, customer: str) -> RfmScore | None: ...

    def customers_in_segment(self, shop: str, segment: Segment | str) -> list[str]: ...

    # broadcast log
    def sent_customers(self, broadcast_id: str) -> set[str]: ...

    def mark_sent(self, broadcast_id: str, customer: str, sent_at: datetime) -> bool: ...

    # sidebar
    def profile(self, shop: str, customer: str) -> CustomerProfile | None: ...


# ---------------------------------------------------------------- validation helpers


def to_us(dt: datetime) -> int:
    """Aware datetime -> integer microseconds since the epoch."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"naive datetime {dt.isoformat()} (attach a timezone)")
    return (dt - _EPOCH) // _US


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise ValueError(f"{what} must be a non-empty string without surrounding blanks: {value!r}")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"{what} longer than {MAX_ID_LENGTH} characters")
    return value


def check_channel(channel: str) -> str:
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r} (expected one of {', '.join(CHANNELS)})")
    return channel


def check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r}") from None
    return name


def check_tag(tag: str) -> str:
    if not tag or tag != tag.strip() or len(tag) > MAX_TAG_LENGTH:
        raise ValueError(
            f"tag must be 1..{MAX_TAG_LENGTH} characters without surrounding blanks: {tag!r}"
        )
    return tag


def check_order(order: Order) -> None:
    """Raise ``ValueError`` naming the first problem with ``order``."""
    check_id(order.shop, "shop")
    check_id(order.order_id, "order_id")
    check_id(order.customer, "customer")
    check_channel(order.channel)
    if order.status not in ORDER_STATUSES:
        raise ValueError(f"unknown status {order.status!r}")
    if order.amount_cents < 0:
        raise ValueError(f"negative amount {order.amount_cents}")
    if len(order.currency) != 3 or not order.currency.isascii() or not order.currency.isupper():
        raise ValueError(f"currency must be an ISO-4217 code like CNY: {order.currency!r}")
    for item in order.items:
        if not item.title or item.quantity < 1:
            raise ValueError(f"bad item {item!r} (needs a title and quantity >= 1)")
    to_us(order.created_at)
    if to_us(order.updated_at) < to_us(order.created_at):
        raise ValueError("updated_at is before created_at")


def customer_id_for(channel: str, external_id: str) -> str:
    """Deterministic unified id for a customer first seen as ``(channel, external_id)``."""
    digest = hashlib.blake2b(f"{channel}\x1f{external_id}".encode(), digest_size=10)
    return f"cu_{digest.hexdigest()}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------- schema

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS customers (
    id            TEXT PRIMARY KEY,
    display_name  TEXT NOT NULL DEFAULT '',
    timezone      TEXT NOT NULL,
    opt_out       INTEGER NOT NULL DEFAULT 0 CHECK (opt_out IN (0, 1)),
    member_level  INTEGER NOT NULL DEFAULT 0 CHECK (member_level >= 0),
    points        INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS identities (
    channel      TEXT NOT NULL,
    external_id  TEXT NOT NULL,
    customer     TEXT NOT NULL REFERENCES customers(id),
    linked_at    INTEGER NOT NULL,
    PRIMARY KEY (channel, external_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS identities_by_customer ON identities(customer);
CREATE TABLE IF NOT EXISTS orders (
    shop          TEXT NOT NULL,
    order_id      TEXT NOT NULL,
    customer      TEXT NOT NULL REFERENCES customers(id),
    channel       TEXT NOT NULL,
    status        TEXT NOT NULL,
    amount_cents  INTEGER NOT NULL CHECK (amount_cents >= 0),
    currency      TEXT NOT NULL,
    items         TEXT NOT NULL DEFAULT '[]',
    carrier       TEXT,
    tracking_no   TEXT,
    eta           TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (shop, order_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS orders_by_customer ON orders(shop, customer, created_at);
CREATE INDEX IF NOT EXISTS orders_by_owner ON orders(customer);
CREATE TABLE IF NOT EXISTS tags (
    shop        TEXT NOT NULL,
    customer    TEXT NOT NULL REFERENCES customers(id),
    tag         TEXT NOT NULL,
    source      TEXT NOT NULL CHECK (source IN ('manual', 'rule')),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (shop, customer, tag)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_by_owner ON tags(customer);
CREATE TABLE IF NOT EXISTS points_ledger (
    id        INTEGER PRIMARY KEY,
    customer  TEXT NOT NULL REFERENCES customers(id),
    delta     INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    ref       TEXT UNIQUE,
    at        INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS points_by_customer ON points_ledger(customer);
CREATE TABLE IF NOT EXISTS rfm_scores (
    shop            TEXT NOT NULL,
    customer        TEXT NOT NULL REFERENCES customers(id),
    recency_days    INTEGER NOT NULL,
    frequency       INTEGER NOT NULL,
    monetary_cents  INTEGER NOT NULL,
    currency        TEXT NOT NULL,
    r               INTEGER NOT NULL CHECK (r BETWEEN 1 AND 5),
    f               INTEGER NOT NULL CHECK (f BETWEEN 1 AND 5),
    m               INTEGER NOT NULL CHECK (m BETWEEN 1 AND 5),
    segment         TEXT NOT NULL,
    scored_at       INTEGER NOT NULL,
    PRIMARY KEY (shop, customer)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rfm_by_segment ON rfm_scores(shop, segment);
CREATE INDEX IF NOT EXISTS rfm_by_owner ON rfm_scores(customer);
CREATE TABLE IF NOT EXISTS broadcast_log (
    broadcast_id  TEXT NOT NULL,
    customer      TEXT NOT NULL REFERENCES customers(id),
    sent_at       INTEGER NOT NULL,
    PRIMARY KEY (broadcast_id, customer)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS broadcast_by_owner ON broadcast_log(customer);
CREATE TABLE IF NOT EXISTS chat_users (
    user       TEXT PRIMARY KEY,
    customer   TEXT NOT NULL REFERENCES customers(id),
    linked_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chat_users_by_customer ON chat_users(customer);
"""

_ORDER_COLUMNS: Final = (
    "shop, order_id, customer, channel, status, amount_cents, currency,"
    " items, carrier, tracking_no, eta, created_at, updated_at"
)


def _order_from_row(row: sqlite3.Row) -> Order:
    eta: str | None = row["eta"]
    return Order(
        shop=row["shop"],
        order_id=row["order_id"],
        customer=row["customer"],
        channel=row["channel"],
        status=row["status"],
        amount_cents=row["amount_cents"],
        currency=row["currency"],
        items=_ITEMS_DECODER.decode(row["items"]),
        carrier=row["carrier"],
        tracking_no=row["tracking_no"],
        eta=date.fromisoformat(eta) if eta is not None else None,
        created_at=from_us(row["created_at"]),
        updated_at=from_us(row["updated_at"]),
    )


def _order_params(order: Order) -> tuple[Any, ...]:
    return (
        order.shop,
        order.order_id,
        order.customer,
        order.channel,
        order.status,
        order.amount_cents,
        order.currency,
        msgspec.json.encode(order.items).decode(),
        order.carrier,
        order.tracking_no,
        order.eta.isoformat() if order.eta is not None else None,
        to_us(order.created_at),
        to_us(order.updated_at),
    )


def _customer_from_row(row: sqlite3.Row) -> Customer:
    return Customer(
        id=row["id"],
        display_name=row["display_name"],
        timezone=row["timezone"],
        opt_out=bool(row["opt_out"]),
        member_level=row["member_level"],
        points=row["points"],
        created_at=from_us(row["created_at"]),
    )


def _tag_from_row(row: sqlite3.Row) -> Tag:
    return Tag(tag=row["tag"], source=row["source"], created_at=from_us(row["created_at"]))


def _rfm_from_row(row: sqlite3.Row) -> RfmScore:
    return RfmScore(
        customer=row["customer"],
        recency_days=row["recency_days"],
        frequency=row["frequency"],
        monetary_cents=row["monetary_cents"],
        currency=row["currency"],
        r=row["r"],
        f=row["f"],
        m=row["m"],
        segment=Segment(row["segment"]),
    )


# ---------------------------------------------------------------- the SQLite engine


class CrmRepository:
    """``CrmStore`` on one SQLite file. See the module docstring."""

    def __init__(self, path: str | Path, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            with self._tx() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise CrmError(
                        f"{self._path} has schema v{version}; this code knows v{SCHEMA_VERSION}"
                    )
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

    # -------------------------------------------------------------- lifecycle

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> CrmRepository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """A transaction; nested calls join the outer one."""
        with self._lock:
            if self._db.in_transaction:
                yield self._db
                return
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _now_us(self, at: datetime | None = None) -> int:
        return to_us(at if at is not None else self._clock())

    @staticmethod
    def _require_customer(db: sqlite3.Connection, customer: str) -> sqlite3.Row:
        row: sqlite3.Row | None = db.execute(
            "SELECT * FROM customers WHERE id = ?", (customer,)
        ).fetchone()
        if row is None:
            raise UnknownCustomerError(customer)
        return row

    # -------------------------------------------------------------- customers

    def upsert_customer(
        self, customer: str, *, display_name: str | None = None, timezone: str | None = None
    ) -> Customer:
        """Create ``customer`` or update the fields given (``None`` leaves a field alone)."""
        check_id(customer, "customer")
        if timezone is not None:
            check_timezone(timezone)
        with self._tx() as db:
            db.execute(
                "INSERT INTO customers (id, display_name, timezone, created_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                (customer, display_name or "", timezone or DEFAULT_TIMEZONE, self._now_us()),
            )
            if display_name is not None:
                db.execute(
                    "UPDATE customers SET display_name = ? WHERE id = ?", (display_name, customer)
                )
            if timezone is not None:
                db.execute("UPDATE customers SET timezone = ? WHERE id = ?", (timezone, customer))
            return _customer_from_row(self._require_customer(db, customer))

    def customer(self, customer: str) -> Customer | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM customers WHERE id = ?", (customer,)).fetchone()
        return _customer_from_row(row) if row is not None else None

    def set_opt_out(self, customer: str, opt_out: bool = True) -> None:
        """Stop (or resume) marketing broadcasts to ``customer``; chats are unaffected."""
        with self._tx() as db:
            self._require_customer(db, customer)
            db.execute("UPDATE customers SET opt_out = ? WHERE id = ?", (int(opt_out), customer))

    def is_vip(self, customer: str) -> bool:
        """``member_level >= VIP_MIN_LEVEL``; unknown customers are not VIPs."""
        found = self.customer(customer)
        return found is not None and is_vip(found.member_level)

    # -------------------------------------------------------------- identities

    def resolve(self, channel: str, external_id: str) -> str | None:
        """The unified customer behind a channel identity, if known."""
        with self._lock:
            row = self._db.execute(
                "SELECT customer FROM identities WHERE channel = ? AND external_id = ?",
                (channel, external_id),
            ).fetchone()
        return row["customer"] if row is not None else None

    def identities(self, customer: str) -> list[Identity]:
        with self._lock:
            rows = self._db.execute(
                "SELECT channel, external_id, customer FROM identities WHERE customer = ?"
                " ORDER BY channel, external_id",
                (customer,),
            ).fetchall()
        return [
            Identity(channel=r["channel"], external_id=r["external_id"], customer=r["customer"])
            for r in rows
        ]

    def ensure_customer(
        self,
        channel: str,
        external_id: str,
        *,
        display_name: str | None = None,
        timezone: str | None = None,
    ) -> tuple[str, bool]:
        """Resolve ``(channel, external_id)``, creating and linking a customer if unknown.

        Returns ``(customer id, created)``. An existing customer is not modified.
        """
        check_channel(channel)
        check_id(external_id, "external_id")
        with self._tx() as db:
            existing = self.resolve(channel, external_id)
            if existing is not None:
                return existing, False
            customer = customer_id_for(channel, external_id)
            created = (
                db.execute("SELECT 1 FROM customers WHERE id = ?", (customer,)).fetchone() is None
            )
            if created:
                self.upsert_customer(customer, display_name=display_name, timezone=timezone)
            self.link_identity(channel, external_id, customer)
            return customer, created

    def link_identity(
        self, channel: str, external_id: str, customer: str, *, merge: bool = False
    ) -> str:
        """Attach ``(channel, external_id)`` to ``customer`` and return ``customer``.

        If the identity already belongs to another customer: with ``merge=True`` that
        customer is merged into ``customer`` (they are the same person); otherwise
        ``IdentityConflictError``.
        """
        check_channel(channel)
        check_id(external_id, "external_id")
        with self._tx() as db:
            self._require_customer(db, customer)
            owner = self.resolve(channel, external_id)
            if owner == customer:
                return customer
            if owner is not None:
                if not merge:
                    raise IdentityConflictError(channel, external_id, owner, customer)
                self.merge_customers(keep=customer, absorb=owner)
                return customer
            db.execute(
                "INSERT INTO identities (channel, external_id, customer, linked_at)"
                " VALUES (?, ?, ?, ?)",
                (channel, external_id, customer, self._now_us()),
            )
            return customer

    # -------------------------------------------------------------- chat users

    def chat_customer(self, user: str, channel: str) -> str:
        """The customer behind chat user ``user`` on ``channel`` (see "Chat users");
        read only: the id may not exist yet (then it has no orders)."""
        with self._lock:
            row = self._db.execute(
                "SELECT customer FROM chat_users WHERE user = ?", (user,)
            ).fetchone()
            if row is not None:
                linked: str = row["customer"]
                return linked
            if channel in CHANNELS:
                owner = self.resolve(channel, user)
                if owner is not None:
                    return owner
            if self.customer(user) is not None:
                return user
        return customer_id_for(channel, user)

    def register_chat_user(self, user: str, channel: str) -> str:
        """Make the customer behind a chatting user exist (with the identity
        ``(channel, user)`` when ``channel`` is a sales channel) and record the link."""
        check_id(user, "user")
        with self._tx() as db:
            customer = self.chat_customer(user, channel)
            self.upsert_customer(customer)
            if channel in CHANNELS and self.resolve(channel, user) is None:
                self.link_identity(channel, user, customer)
            db.execute(
                "INSERT OR IGNORE INTO chat_users (user, customer, linked_at) VALUES (?, ?, ?)",
                (user, customer, self._now_us()),
            )
            return customer

    def link_chat_user(self, user: str, customer: str, *, merge: bool = False) -> bool:
        """Chat user ``user`` is ``customer`` (created if unknown); returns whether the
        link changed. A customer the user was linked to before is merged in when it was
        only their placeholder (created by their first chat, no other identity) or when
        ``merge`` says so; otherwise ``IdentityConflictError``."""
        check_id(user, "user")
        check_id(customer, "customer")
        with self._tx() as db:
            self.upsert_customer(customer)
            row = db.execute("SELECT customer FROM chat_users WHERE user = ?", (user,)).fetchone()
            old: str | None = row["customer"] if row is not None else None
            if old == customer:
                return False
            if old is not None:
                if not (merge or self._placeholder_of(old, user)):
                    raise IdentityConflictError("chat", user, old, customer)
                self.merge_customers(keep=customer, absorb=old)
            db.execute(
                "INSERT OR REPLACE INTO chat_users (user, customer, linked_at) VALUES (?, ?, ?)",
                (user, customer, self._now_us()),
            )
            return True

    def _placeholder_of(self, customer: str, user: str) -> bool:
        """Was ``customer`` created for chat user ``user`` alone (its only identities are
        ``user`` on some channel and its id derives from one of them)?"""
        identities = self.identities(customer)
        return (
            bool(identities)
            and all(i.external_id == user for i in identities)
            and any(customer_id_for(i.channel, user) == customer for i in identities)
        )

    def chat_users_of(self, customer: str) -> list[str]:
        """The chat users linked to ``customer`` (where to send it a message)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT user FROM chat_users WHERE customer = ? ORDER BY user", (customer,)
            ).fetchall()
        return [r["user"] for r in rows]

    def merge_customers(self, keep: str, absorb: str) -> None:
        """Fold ``absorb`` into ``keep`` (see "Identity unification") and delete ``absorb``."""
        if keep == absorb:
            raise ValueError("cannot merge a customer into itself")
        with self._tx() as db:
            kept = self._require_customer(db, keep)
            gone = self._require_customer(db, absorb)
            db.execute("UPDATE identities SET customer = ? WHERE customer = ?", (keep, absorb))
            db.execute("UPDATE chat_users SET customer = ? WHERE customer = ?", (keep, absorb))
            db.execute("UPDATE orders SET customer = ? WHERE customer = ?", (keep, absorb))
            db.execute(
                "INSERT INTO tags (shop, customer, tag, source, created_at)"
                " SELECT shop, ?, tag, source, created_at FROM tags WHERE customer = ?"
                " ON CONFLICT(shop, customer, tag) DO UPDATE SET"
                "   source = CASE WHEN tags.source = 'manual' OR excluded.source = 'manual'"
                "            THEN 'manual' ELSE 'rule' END,"
                "   created_at = min(tags.created_at, excluded.created_at)",
                (keep, absorb),
            )
            db.execute("DELETE FROM tags WHERE customer = ?", (absorb,))
            db.execute("UPDATE points_ledger SET customer = ? WHERE customer = ?", (keep, absorb))
            # Scores of shops where only the absorbed customer was scored carry over until
            # the next scoring run; where both were scored, keep's row stays.
            db.execute(
                "UPDATE OR IGNORE rfm_scores SET customer = ? WHERE customer = ?", (keep, absorb)
            )
            db.execute("DELETE FROM rfm_scores WHERE customer = ?", (absorb,))
            # A broadcast either of them received counts as received by the merged person.
            db.execute(
                "UPDATE OR IGNORE broadcast_log SET customer = ? WHERE customer = ?", (keep, absorb)
            )
            db.execute("DELETE FROM broadcast_log WHERE customer = ?", (absorb,))
            db.execute(
                "UPDATE customers SET"
                " display_name = ?, opt_out = ?, member_level = ?, created_at = ?,"
                " points = (SELECT coalesce(sum(delta), 0) FROM points_ledger WHERE customer = ?)"
                " WHERE id = ?",
                (
                    kept["display_name"] or gone["display_name"],
                    max(kept["opt_out"], gone["opt_out"]),
                    max(kept["member_level"], gone["member_level"]),
                    min(kept["created_at"], gone["created_at"]),
                    keep,
                    keep,
                ),
            )
            db.execute("DELETE FROM customers WHERE id = ?", (absorb,))

    # -------------------------------------------------------------- orders

    def upsert_orders(self, batch: Iterable[Order]) -> UpsertResult:
        """Insert or update orders in one transaction (last-writer-wins on ``updated_at``).

        Raises ``ValueError`` for an invalid order and ``UnknownCustomerError`` for an
        order of an unknown customer; either way nothing of the batch is written.
        """
        inserted = updated = unchanged = stale = 0
        with self._tx() as db:
            for order in batch:
                check_order(order)
                self._require_customer(db, order.customer)
                row = db.execute(
                    f"SELECT {_ORDER_COLUMNS} FROM orders WHERE shop = ? AND order_id = ?",
                    (order.shop, order.order_id),
                ).fetchone()
                if row is not None:
                    old = _order_from_row(row)
                    if old == order:
                        unchanged += 1
                        continue
                    if order.updated_at < old.updated_at:
                        stale += 1
                        continue
                    updated += 1
                else:
                    inserted += 1
                db.execute(
                    f"INSERT OR REPLACE INTO orders ({_ORDER_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _order_params(order),
                )
        return UpsertResult(inserted=inserted, updated=updated, unchanged=unchanged, stale=stale)

    def full_order(self, shop: str, order_id: str) -> Order | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_ORDER_COLUMNS} FROM orders WHERE shop = ? AND order_id = ?",
                (shop, order_id),
            ).fetchone()
        return _order_from_row(row) if row is not None else None

    def order(self, shop: str, order_id: str) -> OrderInfo | None:
        """Look an order up by id. The caller checks ``OrderInfo.customer`` before
        telling a chatting customer anything about it (see ``order_of``)."""
        found = self.full_order(shop, order_id)
        return found.info() if found is not None else None

    def order_of(self, shop: str, customer: str, order_id: str) -> OrderInfo | None:
        """Like ``order`` but ``None`` unless the order belongs to ``customer``."""
        found = self.order(shop, order_id)
        return found if found is not None and found.customer == customer else None

    def latest_order(self, shop: str, customer: str) -> OrderInfo | None:
        """The customer's most recently created order in ``shop``, any status."""
        orders = self.recent_orders(shop, customer, 1)
        return orders[0] if orders else None

    def recent_orders(
        self, shop: str, customer: str, limit: int = DEFAULT_RECENT_ORDERS
    ) -> list[OrderInfo]:
        """Newest first (by ``created_at``, then ``order_id``)."""
        if limit < 1:
            raise ValueError("limit must be >= 1")
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_ORDER_COLUMNS} FROM orders WHERE shop = ? AND customer = ?"
                " ORDER BY created_at DESC, order_id DESC LIMIT ?",
                (shop, customer, limit),
            ).fetchall()
        return [_order_from_row(r).info() for r in rows]

    def shop_orders(self, shop: str) -> list[Order]:
        """Every order of ``shop`` (oldest first) - the input of RFM, rules and points."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_ORDER_COLUMNS} FROM orders WHERE shop = ? ORDER BY created_at, order_id",
                (shop,),
            ).fetchall()
        return [_order_from_row(r) for r in rows]

    # -------------------------------------------------------------- tags

    def add_tag(self, shop: str, customer: str, tag: str, *, source: TagSource = "manual") -> bool:
        """Tag ``customer`` in ``shop``; returns whether anything changed.

        A manual tag wins: adding it manually over a rule tag turns it manual (rules
        never remove manual tags); a rule adding an existing manual tag is a no-op.
        """
        check_id(shop, "shop")
        check_tag(tag)
        if source not in ("manual", "rule"):
            raise ValueError(f"unknown tag source {source!r}")
        with self._tx() as db:
            self._require_customer(db, customer)
            row = db.execute(
                "SELECT source FROM tags WHERE shop = ? AND customer = ? AND tag = ?",
                (shop, customer, tag),
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO tags (shop, customer, tag, source, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (shop, customer, tag, source, self._now_us()),
                )
                return True
            if row["source"] == "rule" and source == "manual":
                db.execute(
                    "UPDATE tags SET source = 'manual' WHERE shop = ? AND customer = ? AND tag = ?",
                    (shop, customer, tag),
                )
                return True
            return False

    def remove_tag(
        self, shop: str, customer: str, tag: str, *, source: TagSource | None = None
    ) -> bool:
        """Remove a tag (only if it has ``source``, when given); returns whether it existed.

        Removing a rule tag by hand lasts until the rule next matches.
        """
        with self._tx() as db:
            sql = "DELETE FROM tags WHERE shop = ? AND customer = ? AND tag = ?"
            params: tuple[str, ...] = (shop, customer, tag)
            if source is not None:
                sql += " AND source = ?"
                params += (source,)
            return db.execute(sql, params).rowcount > 0

    def tags(self, shop: str, customer: str) -> list[Tag]:
        with self._lock:
            rows = self._db.execute(
                "SELECT tag, source, created_at FROM tags WHERE shop = ? AND customer = ?"
                " ORDER BY tag",
                (shop, customer),
            ).fetchall()
        return [_tag_from_row(r) for r in rows]

    def shop_tags(self, shop: str) -> dict[str, list[Tag]]:
        """customer -> tags, for every tagged customer of ``shop``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT customer, tag, source, created_at FROM tags WHERE shop = ?"
                " ORDER BY customer, tag",
                (shop,),
            ).fetchall()
        result: dict[str, list[Tag]] = {}
        for r in rows:
            result.setdefault(r["customer"], []).append(_tag_from_row(r))
        return result

    def customers_with_tag(self, shop: str, tag: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT customer FROM tags WHERE shop = ? AND tag = ? ORDER BY customer",
                (shop, tag),
            ).fetchall()
        return [r["customer"] for r in rows]

    # -------------------------------------------------------------- membership

    def set_level(self, customer: str, level: int) -> None:
        if not 0 <= level <= MAX_LEVEL:
            raise ValueError(f"member level must be 0..{MAX_LEVEL}, got {level}")
        with self._tx() as db:
            self._require_customer(db, customer)
            db.execute("UPDATE customers SET member_level = ? WHERE id = ?", (level, customer))

    def add_points(
        self,
        customer: str,
        delta: int,
        *,
        kind: str = "manual",
        ref: str | None = None,
        at: datetime | None = None,
        allow_negative: bool = False,
    ) -> bool:
        """Append a ledger entry and adjust the balance.

        ``ref`` makes the entry idempotent: a second call with the same ``ref`` changes
        nothing and returns ``False``. A balance may only go negative with
        ``allow_negative`` (reversing points that were already spent).
        """
        if kind not in POINTS_KINDS:
            raise ValueError(f"unknown points kind {kind!r}")
        with self._tx() as db:
            row = self._require_customer(db, customer)
            if (
                ref is not None
                and db.execute("SELECT 1 FROM points_ledger WHERE ref = ?", (ref,)).fetchone()
                is not None
            ):
                return False
            balance = row["points"] + delta
            if balance < 0 and not allow_negative:
                raise InsufficientPointsError(
                    f"{customer!r} has {row['points']} points, cannot apply {delta}"
                )
            db.execute(
                "INSERT INTO points_ledger (customer, delta, kind, ref, at) VALUES (?, ?, ?, ?, ?)",
                (customer, delta, kind, ref, self._now_us(at)),
            )
            db.execute("UPDATE customers SET points = ? WHERE id = ?", (balance, customer))
            return True

    def points_entry(self, ref: str) -> PointsEntry | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM points_ledger WHERE ref = ?", (ref,)).fetchone()
        if row is None:
            return None
        return PointsEntry(
            customer=row["customer"],
            delta=row["delta"],
            kind=row["kind"],
            ref=row["ref"],
            at=from_us(row["at"]),
        )

    def qualifying_points(self, customer: str) -> int:
        """Points that count towards the level (grants minus reversals)."""
        kinds = sorted(QUALIFYING_KINDS)
        with self._lock:
            row = self._db.execute(
                "SELECT coalesce(sum(delta), 0) AS total FROM points_ledger"
                f" WHERE customer = ? AND kind IN ({', '.join('?' * len(kinds))})",
                (customer, *kinds),
            ).fetchone()
        total: int = row["total"]
        return total

    # -------------------------------------------------------------- RFM

    def save_rfm_scores(self, shop: str, scores: Iterable[RfmScore], scored_at: datetime) -> None:
        """Replace all stored scores of ``shop`` (a scoring run is a snapshot)."""
        at = to_us(scored_at)
        with self._tx() as db:
            db.execute("DELETE FROM rfm_scores WHERE shop = ?", (shop,))
            db.executemany(
                "INSERT INTO rfm_scores (shop, customer, recency_days, frequency,"
                " monetary_cents, currency, r, f, m, segment, scored_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        shop,
                        s.customer,
                        s.recency_days,
                        s.frequency,
                        s.monetary_cents,
                        s.currency,
                        s.r,
                        s.f,
                        s.m,
                        str(s.segment),
                        at,
                    )
                    for s in scores
                ],
            )

    def rfm_score(self, shop: str, customer: str) -> RfmScore | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM rfm_scores WHERE shop = ? AND customer = ?", (shop, customer)
            ).fetchone()
        return _rfm_from_row(row) if row is not None else None

    def customers_in_segment(self, shop: str, segment: Segment | str) -> list[str]:
        """Customers of ``shop`` in ``segment`` as of the last ``score_shop`` run, sorted."""
        seg = parse_segment(segment)
        with self._lock:
            rows = self._db.execute(
                "SELECT customer FROM rfm_scores WHERE shop = ? AND segment = ? ORDER BY customer",
                (shop, str(seg)),
            ).fetchall()
        return [r["customer"] for r in rows]

    # -------------------------------------------------------------- broadcast log

    def sent_customers(self, broadcast_id: str) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT customer FROM broadcast_log WHERE broadcast_id = ?", (broadcast_id,)
            ).fetchall()
        return {r["customer"] for r in rows}

    def mark_sent(self, broadcast_id: str, customer: str, sent_at: datetime) -> bool:
        """Record a delivered broadcast message; ``False`` if it was already recorded."""
        check_id(broadcast_id, "broadcast_id")
        with self._tx() as db:
            self._require_customer(db, customer)
            cur = db.execute(
                "INSERT OR IGNORE INTO broadcast_log (broadcast_id, customer,"
                " sent_at) VALUES (?, ?, ?)",
                (broadcast_id, customer, to_us(sent_at)),
            )
            return cur.rowcount > 0

    # -------------------------------------------------------------- sidebar

    def profile(self, shop: str, customer: str) -> CustomerProfile | None:
        """Everything the agent sidebar shows, read in one consistent snapshot."""
        with self._tx(write=False) as db:
            row = db.execute("SELECT * FROM customers WHERE id = ?", (customer,)).fetchone()
            if row is None:
                return None
            found = _customer_from_row(row)
            statuses = sorted(REVENUE_STATUSES)
            ltv_rows = db.execute(
                "SELECT currency, sum(amount_cents) AS total FROM orders"
                " WHERE shop = ? AND customer = ?"
                f" AND status IN ({', '.join('?' * len(statuses))})"
                " GROUP BY currency ORDER BY currency",
                (shop, customer, *statuses),
            ).fetchall()
            count = db.execute(
                "SELECT count(*) FROM orders WHERE shop = ? AND customer = ?", (shop, customer)
            ).fetchone()[0]
            rfm = self.rfm_score(shop, customer)
            return CustomerProfile(
                customer=customer,
                shop=shop,
                display_name=found.display_name,
                timezone=found.timezone,
                opt_out=found.opt_out,
                member_level=found.member_level,
                is_vip=is_vip(found.member_level),
                points=found.points,
                tags=tuple(self.tags(shop, customer)),
                segment=rfm.segment if rfm is not None else None,
                rfm=rfm,
                recent_orders=tuple(self.recent_orders(shop, customer, PROFILE_RECENT_ORDERS)),
                order_count=count,
                lifetime_value={r["currency"]: r["total"] for r in ltv_rows},
                channels=tuple(self.identities(customer)),
            )
