"""The SQLite schema, its migrations, and the row encodings shared by the
engine (``_sqlite``) and the exporter (``_export``).

Migrations
----------
``MIGRATIONS`` is an append-only list: entry *n* (1-based) moves a database
from version *n-1* to *n*. An entry is either an SQL script or a function of
the connection. ``migrate`` applies the missing ones in order inside ONE
``BEGIN IMMEDIATE`` transaction and records each in ``schema_version``, so a
crash mid-migration leaves the database at its old version, and two processes
opening the same file at once cannot both migrate. Never edit a released
entry; add a new one.

Layout notes
------------
* Tables keyed by a natural composite key are ``WITHOUT ROWID``: the primary
  key *is* the b-tree, so lookups by (conv, seq) or (conv, user) are one seek.
* Every list query has an index that yields rows already in the order the
  query returns them (``updated_at DESC, id DESC``), so a page costs O(limit)
  rather than a sort of the whole candidate set. ``tests/imserver/store``
  checks the query plans.
* Worker events are msgpack blobs of ``protocol.WorkerEvent`` as the actor
  built it (``event_id`` 0); the row id is the event id.
* Message bodies are msgpack (msgspec) blobs of the ``protocol.AnyBody``
  union, tag included; ``kind`` repeats the tag so exports and ad-hoc SQL can
  filter without decoding. A recalled message keeps its ``kind`` but its body
  is erased (zero-length blob).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, get_args

import msgspec

from protocol import AnyBody, Body, WorkerEvent

# ------------------------------------------------------------------ codecs

body_encoder: Final = msgspec.msgpack.Encoder()
body_decoder: Final = msgspec.msgpack.Decoder(AnyBody)
event_encoder: Final = body_encoder  # msgpack encoders are untyped: one serves all
event_decoder: Final = msgspec.msgpack.Decoder(WorkerEvent)
tags_encoder: Final = msgspec.json.Encoder()
tags_decoder: Final = msgspec.json.Decoder(list[str])

BODY_KIND: Final[dict[type[Body], str]] = {
    cls: str(cls.__struct_config__.tag) for cls in get_args(AnyBody)
}
"""Body class -> its tag (the ``messages.kind`` column)."""


# -------------------------------------------------------------- migrations


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    apply: str | Callable[[sqlite3.Connection], None]
    """An SQL script (statements separated by ``;``) or a function that runs
    inside the migration transaction (it must not commit)."""


_V1_SQL: Final = """
CREATE TABLE conversations (
    id          TEXT    NOT NULL PRIMARY KEY,
    kind        TEXT    NOT NULL,
    shop        TEXT    NOT NULL,
    customer    TEXT,
    channel     TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    agent       TEXT,
    priority    INTEGER NOT NULL DEFAULT 0,
    tags        TEXT    NOT NULL DEFAULT '[]',   -- JSON array of strings
    title       TEXT    NOT NULL DEFAULT '',
    last_seq    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- One index per list_conversations shape, each in page order (see module doc).
CREATE INDEX conv_by_updated     ON conversations(updated_at, id);
CREATE INDEX conv_by_state       ON conversations(state, updated_at, id);
CREATE INDEX conv_by_shop        ON conversations(shop, updated_at, id);
CREATE INDEX conv_by_shop_state  ON conversations(shop, state, updated_at, id);
CREATE INDEX conv_by_shop_agent  ON conversations(shop, agent, updated_at, id);
CREATE INDEX conv_by_customer    ON conversations(customer, updated_at, id);
-- find_open_direct: tiny, holds only the open direct conversations.
CREATE INDEX conv_open_direct    ON conversations(shop, customer)
    WHERE kind = 'direct' AND state <> 'closed';
-- export_shop walks a shop's conversations in id order; never updated after
-- insert. UNIQUE (trivially true) tells the planner each entry is one
-- conversation, so a join on messages needs no sort.
CREATE UNIQUE INDEX conv_by_shop_id ON conversations(shop, id);

CREATE TABLE members (
    conv  TEXT NOT NULL REFERENCES conversations(id),
    user  TEXT NOT NULL,
    role  TEXT NOT NULL,
    PRIMARY KEY (conv, user)
) WITHOUT ROWID;
CREATE INDEX members_by_user ON members(user, conv);

CREATE TABLE messages (
    conv         TEXT    NOT NULL REFERENCES conversations(id),
    seq          INTEGER NOT NULL,
    sender       TEXT    NOT NULL,
    sender_role  TEXT    NOT NULL,
    cmid         TEXT    NOT NULL,
    ts           INTEGER NOT NULL,
    kind         TEXT    NOT NULL,
    body         BLOB    NOT NULL,
    recalled     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (conv, seq)
) WITHOUT ROWID;
-- Retention deletes by age.
CREATE INDEX messages_by_ts ON messages(ts);

CREATE TABLE read_points (
    conv  TEXT    NOT NULL REFERENCES conversations(id),
    user  TEXT    NOT NULL,
    seq   INTEGER NOT NULL,
    PRIMARY KEY (conv, user)
) WITHOUT ROWID;

CREATE TABLE agents (
    shop    TEXT    NOT NULL,
    agent   TEXT    NOT NULL,
    status  TEXT    NOT NULL,
    ts      INTEGER NOT NULL,
    PRIMARY KEY (shop, agent)
) WITHOUT ROWID;

-- A rowid table on purpose: the rowid is the insertion order, which is what
-- "the last N keys" means (many keys can share a millisecond).
CREATE TABLE applied_keys (
    id    INTEGER PRIMARY KEY,
    conv  TEXT    NOT NULL REFERENCES conversations(id),
    key   TEXT    NOT NULL,
    ts    INTEGER NOT NULL,
    UNIQUE (conv, key)
);
CREATE INDEX applied_keys_by_conv ON applied_keys(conv, id);
CREATE INDEX applied_keys_by_ts   ON applied_keys(ts);
"""

_V2_SQL: Final = """
-- The worker event log. AUTOINCREMENT: ids are never reused, even after the
-- newest rows are pruned, because plugin watermarks compare ids.
CREATE TABLE worker_events (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    shard  INTEGER NOT NULL,
    kind   TEXT    NOT NULL,
    ts     INTEGER NOT NULL,
    event  BLOB    NOT NULL   -- msgpack of protocol.WorkerEvent
);
CREATE INDEX worker_events_by_ts ON worker_events(ts);

CREATE TABLE worker_cursors (
    plugin    TEXT    NOT NULL PRIMARY KEY,
    event_id  INTEGER NOT NULL
) WITHOUT ROWID;
"""

_V3_SQL: Final = """
-- Single-use tokens already used, kept until they expire, so that a restart
-- does not make them usable again. exp is in unix seconds.
CREATE TABLE used_tokens (
    jti  TEXT    NOT NULL PRIMARY KEY,
    exp  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX used_tokens_by_exp ON used_tokens(exp);
"""

_V4_SQL: Final = """
-- Registered shops (tenants): conversations, groups and subscriptions name one.
CREATE TABLE shops (
    name        TEXT    NOT NULL PRIMARY KEY,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;

-- Staff (agents, supervisors) seen logging in to a shop: the shop's agents
-- (who may be assigned its conversations) and users (presence, notices).
CREATE TABLE staff (
    shop  TEXT    NOT NULL,
    user  TEXT    NOT NULL,
    role  TEXT    NOT NULL,
    ts    INTEGER NOT NULL,
    PRIMARY KEY (shop, user)
) WITHOUT ROWID;
"""

MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "initial schema", _V1_SQL),
    Migration(2, "worker event log", _V2_SQL),
    Migration(3, "used single-use tokens", _V3_SQL),
    Migration(4, "registered shops and their staff", _V4_SQL),
)

SCHEMA_VERSION: Final = MIGRATIONS[-1].version
"""The version this code reads and writes."""


class SchemaError(RuntimeError):
    """The database was written by a newer version of imserver, or the
    migration list is malformed."""


def split_sql(script: str) -> list[str]:
    """Split a script into statements. ``executescript`` cannot be used
    inside a transaction (it COMMITs first), so migrations run statement by
    statement; ``sqlite3.complete_statement`` keeps ``;`` inside literals and
    triggers intact."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return [s for s in statements if not _only_comments(s)]


def _only_comments(statement: str) -> bool:
    return all(not line.strip() or line.strip().startswith("--") for line in statement.splitlines())


def current_version(conn: sqlite3.Connection) -> int:
    """The schema version of an open database (0 for an empty one)."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if exists is None:
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(
    conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS
) -> tuple[int, int]:
    """Bring the database up to the last version in ``migrations``.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Returns
    (version before, version after); equal when there was nothing to do.
    """
    for index, migration in enumerate(migrations, start=1):
        if migration.version != index:
            raise SchemaError(f"migration #{index} has version {migration.version}")
    target = len(migrations)
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
        )
        before = current_version(conn)
        if before > target:
            raise SchemaError(
                f"database schema version {before} is newer than this code ({target}); "
                "upgrade imserver"
            )
        for migration in migrations[before:]:
            if isinstance(migration.apply, str):
                for statement in split_sql(migration.apply):
                    conn.execute(statement)
            else:
                migration.apply(conn)
            conn.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, int(time.time() * 1000)),
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return before, target
