"""The shop registry from outside a running server (``imserver shop add|list``).

A server registers the shops it is told about (``serve --shops``) through its
own store; this module lets an operator add shops to a data directory whether
or not a server runs on it: one short transaction on the database file (WAL:
the server's readers and writer are not disturbed; a running server sees the
new shops at once, as it looks unknown shops up in the database).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from ._schema import migrate

SQL_PUT_SHOP = "INSERT INTO shops (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING"
SQL_LIST_SHOPS = "SELECT name FROM shops ORDER BY name"


def add_shops(db: Path, names: Iterable[str]) -> int:
    """Register ``names`` in the database at ``db`` (created and migrated if
    needed); returns how many were new."""
    conn = sqlite3.connect(db, timeout=5.0, isolation_level=None)
    try:
        migrate(conn)
        now = int(time.time() * 1000)
        conn.execute("BEGIN IMMEDIATE")
        try:
            added = sum(conn.execute(SQL_PUT_SHOP, (name, now)).rowcount for name in names)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return added
    finally:
        conn.close()


def read_shops(db: Path) -> list[str]:
    """The registered shops of the database at ``db``, by name."""
    conn = sqlite3.connect(db, timeout=5.0, isolation_level=None)
    try:
        migrate(conn)
        return [str(name) for (name,) in conn.execute(SQL_LIST_SHOPS)]
    finally:
        conn.close()
