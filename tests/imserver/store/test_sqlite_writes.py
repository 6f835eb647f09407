"""SqliteStore write path: group commit, isolation of failures, backpressure,
cancellation, durability and lifecycle."""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from imserver.store import (
    MarkRecalled,
    PutAgent,
    PutAppliedKey,
    PutUsedToken,
    SetMembers,
    SetReadPoint,
    SqliteStore,
    Store,
    WriteOp,
)
from imserver.store._sqlite import ROWS_PER_STATEMENT
from imserver.store._writer import WriterDied
from protocol import AgentStatus, MemberRole

from .conftest import Commits, StoreFactory, WriteLock, put_conv, put_msg, writer_took_all
from .test_sqlite_events import event


def test_sqlite_store_is_a_store(db_path: Path) -> None:
    store: Store = SqliteStore(db_path)  # checked by mypy
    assert store is not None


def test_bad_arguments(db_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SqliteStore(db_path, synchronous="OFF")
    with pytest.raises(ValueError, match=">= 1"):
        SqliteStore(db_path, max_pending_ops=0)
    assert SqliteStore(db_path, synchronous="normal").synchronous == "NORMAL"


async def test_group_commit_batches_concurrent_writers(
    make_store: StoreFactory, db_path: Path
) -> None:
    commits = Commits()
    store = await make_store(on_commit=commits)
    await store.write([put_conv(f"c{i}") for i in range(200)])
    commits.clear()

    # 200 callers arriving together share one transaction (or two, if the
    # committer wakes between them).
    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(store.write, [put_msg(f"c{i}", 1)])
    assert sum(commits.ops) == 200
    assert sum(commits.callers) == 200
    assert len(commits.calls) <= 2

    # While a transaction is in flight, everything arriving meanwhile goes
    # into the next one: exactly two transactions here.
    commits.clear()
    with WriteLock(db_path) as lock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.write, [put_msg("c0", 2)])
            await trio.testing.wait_all_tasks_blocked()
            await writer_took_all(store)  # its transaction waits for the lock
            for i in range(1, 200):
                nursery.start_soon(store.write, [put_msg(f"c{i}", 2)])
            await trio.testing.wait_all_tasks_blocked()
            assert store.pending_ops == 200
            lock.release()
    assert commits.callers == [1, 199]
    assert store.pending_ops == 0


async def test_a_commit_window_gathers_the_writes_that_arrive_within_it(
    make_store: StoreFactory, autojump_clock: trio.testing.MockClock
) -> None:
    # Virtual time: the sleeps below place arrivals at t, t + 0.5 and t + 2.5.
    commits = Commits()
    store = await make_store(on_commit=commits, commit_window_s=1.0)
    await store.write([put_conv("c1"), put_conv("c2"), put_conv("c3")])
    commits.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.write, [put_msg("c1", 1)])
        await trio.sleep(0.5)  # within the first write's window: joins its transaction
        nursery.start_soon(store.write, [put_msg("c2", 1)])
        await trio.sleep(2.0)  # long after it: a transaction of its own
        nursery.start_soon(store.write, [put_msg("c3", 1)])
    assert commits.callers == [2, 1]
    for conv in ("c1", "c2", "c3"):
        history, _ = await store.history(conv, before=None, after=None, limit=10)
        assert [m.seq for m in history] == [1]


async def test_batches_respect_max_batch_ops_without_splitting_a_call(
    make_store: StoreFactory, db_path: Path
) -> None:
    commits = Commits()
    store = await make_store(on_commit=commits, max_batch_ops=50)
    await store.write([put_conv("c")])
    commits.clear()
    big = [put_msg("c", seq) for seq in range(1000, 1120)]  # 120 ops > 50
    with WriteLock(db_path) as lock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.write, [put_msg("c", 1)])
            await trio.testing.wait_all_tasks_blocked()
            await writer_took_all(store)
            for seq in range(2, 62):  # 60 single-op calls
                nursery.start_soon(store.write, [put_msg("c", seq)])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(store.write, big)
            await trio.testing.wait_all_tasks_blocked()
            lock.release()
    assert commits.ops == [1, 50, 10, 120]
    history, _ = await store.history("c", before=None, after=None, limit=200)
    assert len(history) == 181


async def test_failing_caller_does_not_fail_the_others(
    make_store: StoreFactory, db_path: Path, raw: sqlite3.Connection
) -> None:
    commits = Commits()
    store = await make_store(on_commit=commits)
    await store.write([put_conv("c"), put_msg("c", 1)])
    commits.clear()
    outcome: dict[str, BaseException | None] = {}

    async def writer(name: str, ops: Sequence[WriteOp]) -> None:
        try:
            await store.write(ops)
        except Exception as exc:
            outcome[name] = exc
        else:
            outcome[name] = None

    with WriteLock(db_path) as lock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, "first", [put_msg("c", 2)])
            await trio.testing.wait_all_tasks_blocked()
            await writer_took_all(store)
            nursery.start_soon(writer, "good-1", [put_msg("c", 3)])
            # duplicate seq 1, after a valid op that must be rolled back too
            nursery.start_soon(writer, "bad", [put_msg("c", 4), put_msg("c", 1)])
            nursery.start_soon(writer, "orphan", [put_msg("no-such-conv", 1)])  # foreign key
            nursery.start_soon(writer, "good-2", [put_msg("c", 5)])
            await trio.testing.wait_all_tasks_blocked()
            lock.release()
    assert outcome["first"] is None
    assert outcome["good-1"] is None
    assert outcome["good-2"] is None
    assert isinstance(outcome["bad"], sqlite3.IntegrityError)
    assert isinstance(outcome["orphan"], sqlite3.IntegrityError)
    seqs = [s for (s,) in raw.execute("SELECT seq FROM messages WHERE conv = 'c' ORDER BY seq")]
    assert seqs == [1, 2, 3, 5]
    # The shared attempt is rolled back and not reported; each retry is.
    assert commits.callers == [1, 1, 1]
    assert store.pending_ops == 0
    # and the committer is still healthy
    await store.write([put_msg("c", 6)])


async def test_backpressure_bounds_pending_ops(make_store: StoreFactory, db_path: Path) -> None:
    commits = Commits()
    store = await make_store(on_commit=commits, max_pending_ops=10)
    await store.write([put_conv("c")])
    commits.clear()
    with WriteLock(db_path) as lock:
        async with trio.open_nursery() as nursery:
            for seq in range(1, 101):
                nursery.start_soon(store.write, [put_msg("c", seq)])
            await trio.testing.wait_all_tasks_blocked()
            # 10 admitted (in flight or queued); 90 callers wait their turn.
            assert store.pending_ops == 10
            lock.release()
    assert sum(commits.ops) == 100
    assert max(commits.ops) <= 10
    assert len(commits.calls) >= 10
    assert store.pending_ops == 0
    # A single call larger than the bound is admitted alone, not deadlocked.
    await store.write([put_msg("c", seq) for seq in range(101, 131)])
    assert commits.ops[-1] == 30


async def test_cancelled_waiting_write_is_dropped_and_committer_survives(
    make_store: StoreFactory, db_path: Path, raw: sqlite3.Connection
) -> None:
    store = await make_store(max_pending_ops=2)
    await store.write([put_conv("c")])
    with WriteLock(db_path) as lock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.write, [put_msg("c", 1)])  # in flight
            await trio.testing.wait_all_tasks_blocked()
            await writer_took_all(store)
            queued = trio.CancelScope()
            waiting = trio.CancelScope()

            async def write_in(scope: trio.CancelScope, seq: int) -> None:
                with scope:
                    await store.write([put_msg("c", seq)])

            nursery.start_soon(write_in, queued, 2)  # admitted (2 pending)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(write_in, waiting, 3)  # waits for admission
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(store.write, [put_msg("c", 4)])  # waits behind it
            await trio.testing.wait_all_tasks_blocked()
            assert store.pending_ops == 2
            queued.cancel()
            waiting.cancel()
            await trio.testing.wait_all_tasks_blocked()
            lock.release()
    seqs = [s for (s,) in raw.execute("SELECT seq FROM messages ORDER BY seq")]
    # 2 was admitted before its caller gave up: committed anyway (allowed).
    # 3 was still waiting for admission: never written.
    assert seqs == [1, 2, 4]
    assert store.pending_ops == 0
    await store.write([put_msg("c", 5)])


async def test_durable_and_visible_to_a_fresh_connection(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    assert store.synchronous == "FULL"
    await store.write([put_conv("c"), put_msg("c", 1)])
    # While the store is open: a new connection reads the WAL.
    fresh = sqlite3.connect(db_path)
    try:
        assert fresh.execute("SELECT seq FROM messages").fetchall() == [(1,)]
        assert fresh.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        fresh.close()
    await store.aclose()
    # After close: the WAL is checkpointed into the main file.
    assert not db_path.with_name(db_path.name + "-wal").exists()
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("SELECT last_seq FROM conversations").fetchall() == [(1,)]
    finally:
        conn.close()


async def test_aclose_commits_pending_and_refuses_new_writes(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.write([put_conv("c")])
    results: list[int] = []

    async def write(seq: int) -> None:
        await store.write([put_msg("c", seq)])
        results.append(seq)

    async with trio.open_nursery() as nursery:
        for seq in range(1, 21):
            nursery.start_soon(write, seq)
        await trio.testing.wait_all_tasks_blocked()
        await store.aclose()
    assert sorted(results) == list(range(1, 21))
    with pytest.raises(trio.ClosedResourceError):
        await store.write([put_msg("c", 99)])
    with pytest.raises(trio.ClosedResourceError):
        await store.history("c", before=None, after=None, limit=10)
    with pytest.raises(trio.ClosedResourceError):
        await store.open()
    await store.aclose()  # idempotent


async def test_cancelling_run_flushes_pending_writes(db_path: Path) -> None:
    commits = Commits()
    store = SqliteStore(db_path, on_commit=commits)
    acked: list[int] = []

    async def write(seq: int) -> None:
        await store.write([put_msg("c", seq)])
        acked.append(seq)

    async with trio.open_nursery() as outer, trio.open_nursery() as store_nursery:
        await store_nursery.start(store.run)
        await store.write([put_conv("c")])
        with WriteLock(db_path) as lock:
            outer.start_soon(write, 1)  # in flight, waiting for the lock
            await trio.testing.wait_all_tasks_blocked()
            await writer_took_all(store)
            for seq in range(2, 11):  # queued behind it
                outer.start_soon(write, seq)
            await trio.testing.wait_all_tasks_blocked()
            store_nursery.cancel_scope.cancel()
            lock.release()
    # The in-flight transaction finished; the queued ones were committed by
    # the writer thread before it stopped (run() waits for it, cancelled or not).
    assert sorted(acked) == list(range(1, 11))
    assert commits.ops == [1, 1, 9]
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone() == (10,)
    finally:
        conn.close()
    with pytest.raises(trio.ClosedResourceError):
        await store.write([put_msg("c", 11)])


async def test_lifecycle_errors(db_path: Path) -> None:
    store = SqliteStore(db_path)
    with pytest.raises(RuntimeError, match="not open"):
        await store.get_conversation("c")
    await store.open()
    await store.open()  # idempotent
    assert await store.get_conversation("c") is None  # reads work without run()
    with pytest.raises(RuntimeError, match="not running"):
        await store.write([put_conv("c")])
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        with pytest.raises(RuntimeError, match="already called"):
            await store.run()
        with pytest.raises(TypeError):
            await store.write(["not an op"])  # type: ignore[list-item]
        await store.write([])
        await store.aclose()
    # closing a store that never ran
    other = SqliteStore(db_path.with_name("other.db"))
    await other.open()
    await other.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await other.get_conversation("c")


async def test_reads_do_not_wait_for_the_write_lock(store: SqliteStore, db_path: Path) -> None:
    await store.write([put_conv("c"), put_msg("c", 1)])
    writer = sqlite3.connect(db_path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE messages SET cmid = 'uncommitted'")
        with trio.fail_after(2):  # well under the 5 s busy timeout
            page, _ = await store.history("c", before=None, after=None, limit=10)
        assert [m.cmid for m in page] == ["c1"]
        writer.execute("ROLLBACK")
    finally:
        writer.close()


async def test_every_op_kind_round_trips(store: SqliteStore) -> None:
    ops: list[WriteOp] = [
        put_conv("g", customer=None),
        SetMembers(conv="g", add={"u1": MemberRole.OWNER, "u2": MemberRole.MEMBER}),
        put_msg("g", 1),
        SetReadPoint(conv="g", user="u1", seq=1),
        MarkRecalled(conv="g", seq=1),
        PutAgent(shop="s", agent="a1", status=AgentStatus.ONLINE, ts=5),
        PutAppliedKey(conv="g", key="k1", ts=5),
    ]
    await store.write(ops)
    snap = await store.load_actor("g", dedup_window=10, keys_window=10)
    assert snap.members == {"u1": MemberRole.OWNER, "u2": MemberRole.MEMBER}
    assert snap.applied_keys == {"k1"}
    assert await store.read_point("g", "u1") == 1
    page, _ = await store.history("g", before=None, after=None, limit=10)
    assert page[0].recalled
    [agent] = await store.list_agents("s")
    assert agent.status is AgentStatus.ONLINE


async def test_row_ops_of_one_transaction_keep_their_meaning(
    store: SqliteStore, raw: sqlite3.Connection
) -> None:
    """Messages, read points, bumps and events are written in multi-row
    statements (``ROWS_PER_STATEMENT``); odd run lengths, several
    conversations, an op that must see earlier rows (a recall of a message of
    the same job) and a conversation upsert in between change nothing."""
    count = sum(ROWS_PER_STATEMENT) + ROWS_PER_STATEMENT[0] + 3  # every statement size, twice
    convs = ["a", "b", "c"]
    ops: list[WriteOp] = [put_conv(c) for c in convs]
    events = []
    for seq in range(1, count + 1):
        for conv in convs:
            ops.append(put_msg(conv, seq, ts=5_000 + seq))
            ops.append(SetReadPoint(conv=conv, user="cust-1", seq=seq))
            ops.append(SetReadPoint(conv=conv, user="agent-1", seq=max(1, seq - 5)))
            events.append(event(seq))
            ops.append(events[-1])
        if seq == 7:
            ops.append(MarkRecalled(conv="b", seq=3))  # a row buffered in this very job
            ops.append(put_conv("c", title="renamed"))  # the upsert keeps MAX(last_seq)
    await store.write(ops)

    for conv in convs:
        (n, low, high) = raw.execute(
            "SELECT COUNT(*), MIN(seq), MAX(seq) FROM messages WHERE conv = ?", (conv,)
        ).fetchone()
        assert (n, low, high) == (count, 1, count)
        assert raw.execute(
            "SELECT last_seq, updated_at FROM conversations WHERE id = ?", (conv,)
        ).fetchone() == (count, 5_000 + count)
        points = dict(raw.execute("SELECT user, seq FROM read_points WHERE conv = ?", (conv,)))
        assert points == {"cust-1": count, "agent-1": count - 5}
    assert raw.execute("SELECT recalled FROM messages WHERE conv = 'b' AND seq = 3").fetchone() == (
        1,
    )
    assert raw.execute("SELECT title FROM conversations WHERE id = 'c'").fetchone() == ("renamed",)
    # Event ids: consecutive, in op order, and what the rows hold.
    assert [op.id for op in events] == list(range(1, len(events) + 1))
    stored = await store.events_after(0, len(events))
    assert [e.id for e in stored] == [op.id for op in events]
    assert [e.event.ts for e in stored] == [op.event.ts for op in events]


async def test_a_dead_writer_process_fails_its_batch_and_is_replaced(
    db_path: Path, raw: sqlite3.Connection
) -> None:
    async with trio.open_nursery() as nursery:
        store = SqliteStore(db_path)
        await nursery.start(store.run)
        await store.write([put_conv("c"), put_msg("c", 1)])
        assert store.writer is not None and store.writer.pid is not None
        first = store.writer.pid
        os.kill(first, signal.SIGKILL)
        with pytest.raises(WriterDied):  # whether it committed is unknown to the caller
            await store.write([put_msg("c", 2)])
        await store.write([put_msg("c", 3)])  # a new writer process
        assert store.writer.pid not in (None, first)
        await store.aclose()
    seqs = [seq for (seq,) in raw.execute("SELECT seq FROM messages ORDER BY seq")]
    assert seqs == [1, 3]  # the batch sent to the dead process never committed


async def test_used_tokens_are_kept_until_they_expire(store: SqliteStore) -> None:
    await store.write([PutUsedToken(jti="a", exp=100), PutUsedToken(jti="b", exp=300)])
    await store.write([PutUsedToken(jti="a", exp=100)])  # a repeat is a no-op
    await store.write([PutUsedToken(jti="c", exp=200)])
    assert await store.used_tokens(0, 10) == [("b", 300), ("c", 200), ("a", 100)]
    assert await store.used_tokens(150, 10) == [("b", 300), ("c", 200)]  # unexpired only
    assert await store.used_tokens(0, 1) == [("b", 300)]  # the latest expiry first
    assert await store.prune_used_tokens(250) == 2
    assert await store.used_tokens(0, 10) == [("b", 300)]
