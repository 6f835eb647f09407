"""Schema migrations: applied in order, in one transaction, exactly once."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from imserver.store import SCHEMA_VERSION, SchemaError, SqliteStore
from imserver.store._schema import MIGRATIONS, Migration, current_version, migrate, split_sql

from .conftest import StoreFactory, put_conv, put_msg


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    yield c
    c.close()


def _add_column(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE t ADD COLUMN b TEXT NOT NULL DEFAULT ''")
    conn.execute("UPDATE t SET b = 'x' || a")


V1 = Migration(1, "t", "CREATE TABLE t (a INTEGER PRIMARY KEY);\nCREATE INDEX t_a ON t(a);")
V2 = Migration(2, "t.b", _add_column)


def test_real_schema_from_scratch_then_no_op(conn: sqlite3.Connection) -> None:
    assert current_version(conn) == 0
    assert migrate(conn) == (0, SCHEMA_VERSION)
    assert migrate(conn) == (SCHEMA_VERSION, SCHEMA_VERSION)
    rows = conn.execute("SELECT version, name FROM schema_version").fetchall()
    assert rows == [(m.version, m.name) for m in MIGRATIONS]
    tables = {
        name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    assert {
        "conversations",
        "members",
        "messages",
        "read_points",
        "agents",
        "applied_keys",
    } <= tables


def test_older_database_is_migrated_in_order(conn: sqlite3.Connection) -> None:
    assert migrate(conn, [V1]) == (0, 1)
    conn.execute("INSERT INTO t (a) VALUES (1), (2)")
    assert migrate(conn, [V1, V2]) == (1, 2)
    assert conn.execute("SELECT a, b FROM t ORDER BY a").fetchall() == [(1, "x1"), (2, "x2")]
    assert migrate(conn, [V1, V2]) == (2, 2)
    assert [v for (v,) in conn.execute("SELECT version FROM schema_version ORDER BY version")] == [
        1,
        2,
    ]


def test_failed_migration_leaves_the_old_version(conn: sqlite3.Connection) -> None:
    migrate(conn, [V1])

    def half_done(c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE half (x)")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        migrate(conn, [V1, V2, Migration(3, "broken", half_done)])
    # V2 and the half-built table were rolled back with it: one transaction.
    assert current_version(conn) == 1
    assert conn.execute("SELECT name FROM sqlite_master WHERE name IN ('half')").fetchall() == []
    assert [row[1] for row in conn.execute("PRAGMA table_info(t)")] == ["a"]
    assert not conn.in_transaction


def test_newer_database_is_refused(conn: sqlite3.Connection, tmp_path: Path) -> None:
    migrate(conn, [V1, V2])
    with pytest.raises(SchemaError, match="newer"):
        migrate(conn, [V1])
    assert not conn.in_transaction


def test_misnumbered_migrations_are_refused(conn: sqlite3.Connection) -> None:
    with pytest.raises(SchemaError):
        migrate(conn, [V1, Migration(3, "gap", "SELECT 1")])


def test_split_sql_keeps_literals_and_triggers_whole() -> None:
    script = """
    -- a comment; with a semicolon
    CREATE TABLE x (a TEXT DEFAULT 'a;b');
    CREATE TRIGGER tr AFTER INSERT ON x BEGIN
        UPDATE x SET a = 'c;d';
    END;
    -- trailing comment
    """
    statements = split_sql(script)
    assert len(statements) == 2
    assert statements[0].endswith("DEFAULT 'a;b');")
    assert statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END;")


async def test_reopening_a_store_is_a_no_op(make_store: StoreFactory, db_path: Path) -> None:
    first = await make_store()
    await first.write([put_conv("c"), put_msg("c", 1)])
    await first.aclose()
    second = await make_store()
    assert await second.get_conversation("c") is not None
    await second.aclose()
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone() == (1,)
    finally:
        conn.close()


async def test_store_refuses_a_newer_database(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        migrate(conn)
        conn.execute("INSERT INTO schema_version VALUES (999, 'future', 0)")
    finally:
        conn.close()
    store = SqliteStore(db_path)
    with pytest.raises(SchemaError):
        await store.open()
    await store.aclose()


async def test_store_migrates_an_empty_existing_file(
    make_store: StoreFactory, db_path: Path
) -> None:
    await trio.Path(db_path).touch()
    store = await make_store()
    await store.write([put_conv("c")])
    conn = sqlite3.connect(db_path)
    try:
        assert current_version(conn) == SCHEMA_VERSION
    finally:
        conn.close()
