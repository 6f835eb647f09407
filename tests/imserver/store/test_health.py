"""The store knows when it cannot serve: a corrupt page met by a read marks it
corrupt for good; a database that fails quick_check is refused before opening."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from imserver.store import DatabaseCorrupt, WatchedSqliteStore, prepare_database
from tests.imserver.store.conftest import put_conv, put_msg

CONV = "c1"


async def _fill(path: Path) -> None:
    store = WatchedSqliteStore(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.write([put_conv(CONV, last_seq=400)])
        await store.write([put_msg(CONV, seq, cmid=f"m{seq}") for seq in range(1, 401)])
        assert store.health() is None
        await store.aclose()


def _damage(path: Path) -> None:
    """Overwrite the leaf pages of the messages table, as a bad disk would (the
    schema stays readable, so the store opens)."""
    db = sqlite3.connect(path)
    try:
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        pages = [
            n
            for (n,) in db.execute(
                "SELECT pageno FROM dbstat WHERE name = 'messages' AND pagetype = 'leaf'"
            )
        ]
    finally:
        db.close()
    assert len(pages) > 2
    with open(path, "r+b") as f:
        for page in pages:
            f.seek((page - 1) * page_size)
            f.write(b"\xff" * page_size)


async def test_a_corrupt_page_met_by_a_read_makes_the_store_unhealthy(tmp_path: Path) -> None:
    path = tmp_path / "im.db"
    await _fill(path)
    await trio.to_thread.run_sync(_damage, path)
    store = WatchedSqliteStore(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        assert store.health() is None  # nothing has met the damage yet
        with pytest.raises(sqlite3.DatabaseError):
            await store.history(CONV, before=None, after=0, limit=400)
        assert store.health() == "store: database corrupt"
        await store.aclose()
    with pytest.raises(DatabaseCorrupt, match="malformed"):
        await trio.to_thread.run_sync(prepare_database, path)
