"""The worker event log: ids in commit order, cursors, replay, retention."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import trio
import trio.testing

from imserver.limits import RETENTION_DELETE_BATCH
from imserver.store import PutCursor, PutEvent, SqliteStore
from imserver.store._schema import MIGRATIONS, current_version, migrate
from protocol import Conversation, WorkerEvent, WorkerEventKind

from .conftest import Commits, StoreFactory, WriteLock, conversation, put_conv, put_msg


def event(ts: int, *, shard: int = 3, conv: Conversation | None = None) -> PutEvent:
    kind = WorkerEventKind.CONVERSATION
    return PutEvent(
        shard=shard,
        kind=kind,
        event=WorkerEvent(
            event_id=0, shard=shard, kind=kind, ts=ts, conversation=conv, change="opened", shop="s"
        ),
    )


async def test_event_ids_follow_commit_order(store: SqliteStore, db_path: Path) -> None:
    assert await store.last_event_id() == 0
    first = event(1, conv=conversation("c"))
    await store.write([put_conv("c"), first])
    assert first.id == 1
    ops = [event(10 + i) for i in range(50)]
    with WriteLock(db_path) as lock:
        async with trio.open_nursery() as nursery:
            for op in ops:  # one group commit
                nursery.start_soon(store.write, [op])
            await trio.testing.wait_all_tasks_blocked()
            assert all(op.id == 0 for op in ops)  # not before the commit
            lock.release()
    assert sorted(op.id for op in ops) == list(range(2, 52))
    assert await store.last_event_id() == 51

    replay = await store.events_after(0, 10)
    assert [e.id for e in replay] == list(range(1, 11))
    assert (replay[0].shard, replay[0].kind) == (3, WorkerEventKind.CONVERSATION)
    assert replay[0].event == first.event
    assert replay[0].event.conversation == conversation("c")
    assert replay[0] == first.stored()
    frame = replay[0].frame(attempt=2)
    assert (frame.event_id, frame.attempt) == (1, 2)
    assert [e.id for e in await store.events_after(45, 100)] == list(range(46, 52))
    assert await store.events_after(51, 100) == []


async def test_failed_write_assigns_no_event_id(store: SqliteStore) -> None:
    await store.write([put_conv("c"), put_msg("c", 1)])
    failing = event(5)
    try:
        await store.write([failing, put_msg("c", 1)])  # duplicate seq
    except sqlite3.IntegrityError:
        pass
    else:
        raise AssertionError("expected an IntegrityError")
    assert failing.id == 0
    ok = event(6)
    await store.write([ok])
    assert ok.id == 1  # the rolled-back id was never committed, so it is reused
    assert [e.id for e in await store.events_after(0, 10)] == [1]


async def test_cursors_never_go_down(store: SqliteStore) -> None:
    assert await store.worker_cursor("crm") is None
    await store.write([PutCursor(plugin="crm", event_id=10)])
    await store.write([PutCursor(plugin="crm", event_id=7), PutCursor(plugin="bot", event_id=1)])
    assert await store.worker_cursor("crm") == 10
    assert await store.worker_cursor("bot") == 1


async def test_prune_events_in_batches_keeps_ids_growing(make_store: StoreFactory) -> None:
    commits = Commits()
    store = await make_store(on_commit=commits)
    old = RETENTION_DELETE_BATCH + 7
    await store.write([event(i) for i in range(1, old + 1)])
    await store.write([event(10_000_000)])
    commits.clear()
    assert await store.prune_events(10_000_000) == old
    assert commits.ops == [RETENTION_DELETE_BATCH, 7]
    assert [e.id for e in await store.events_after(0, 10)] == [old + 1]
    # pruning the newest too must not let ids restart
    assert await store.prune_events(20_000_000) == 1
    assert await store.last_event_id() == old + 1
    again = event(1)
    await store.write([again])
    assert again.id == old + 2


async def test_v1_database_is_migrated_to_the_event_log(
    make_store: StoreFactory, db_path: Path
) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        migrate(conn, MIGRATIONS[:1])
        conn.execute(
            "INSERT INTO conversations (id, kind, shop, channel, state) "
            "VALUES ('old', 'direct', 's', 'web', 'bot')"
        )
    finally:
        conn.close()
    store = await make_store()
    assert await store.get_conversation("old") is not None
    op = event(1)
    await store.write([op])
    assert op.id == 1
    conn = sqlite3.connect(db_path)
    try:
        assert current_version(conn) == len(MIGRATIONS) >= 2
    finally:
        conn.close()
