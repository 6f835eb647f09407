"""The embedded SQLite engine of the store: one database file, WAL, group commit.

Theory of operation
-------------------
Lifecycle. The committer is a trio task, so it needs a nursery; the store
does not hide one. The server starts it with::

    store = SqliteStore(path)
    await nursery.start(store.run)      # opens + migrates, then returns
    ...
    await store.aclose()                # or cancel the nursery

``run()`` opens the database (``open()``: WAL, pragmas, migrations, one
writer and ``STORE_READERS`` read-only connections), reports itself started,
then commits writes until ``aclose()`` is called or it is cancelled. On the way
out, cancelled or not, it commits every write still pending (shielded), fails
anything it could not commit with ``trio.ClosedResourceError`` and closes
every connection. ``open()`` on its own is enough for reads (tools, tests);
``write()`` and ``prune()`` raise ``RuntimeError`` until ``run()`` is running
and ``trio.ClosedResourceError`` once the store is closing or closed. A store
is used once: after ``aclose()`` it cannot be reopened (make a new one).

Writes (group commit). ``write(ops)`` wraps the ops in a job, enqueues it
without yielding, and waits for the job's event. One long-lived committer
task takes every queued job (up to ``max_batch_ops`` operations, never
splitting a job; a larger job goes alone), runs them as ONE transaction,
wakes the callers and goes straight on to the next batch. While a
transaction runs, new jobs pile up for the next one, so under load the fsync
cost is shared by everybody who arrived during the previous commit. With a
``commit_window_s`` (default ``STORE_COMMIT_WINDOW_S``, off) a batch also
waits until its oldest job is that old, so that at low load one fsync
carries a few milliseconds of writes rather than one (``_Handoff``). Jobs are committed in
arrival order, so the calls of one task apply in call order. By default
(``writer_process``) the transaction runs in the store's writer *process*,
on its own GIL, reached over a socket the trio loop waits on (see
``_writer``): no thread and no thread wake-up per batch. With
``writer_process=False`` a worker thread runs it on the writer connection.

Backpressure. Operations admitted but not yet committed (queued or in the
running transaction) are ``pending_ops``. A job that would push it past
``max_pending_ops`` waits in a FIFO admission line (a job bigger than the
bound is admitted alone when nothing is pending, so it cannot deadlock).
Memory is therefore bounded by the bound plus the waiting callers' own
op lists, which they already hold.

Failure isolation. If the shared transaction raises (one caller's
IntegrityError, say), it is rolled back and each job is retried in its own
transaction, in order: only the faulty caller gets the exception (the raw
``sqlite3`` one). ``on_commit(seconds, ops, callers)`` is called in the trio
thread once per *committed* transaction (retries included), with the
time from BEGIN to COMMIT; rolled-back attempts are not reported.

Cancellation. A caller cancelled while waiting for admission is removed from
the line and nothing of it is written. Once admitted, its job is committed
regardless (the ``Store`` contract: a cancelled write may or may not have
committed); the committer never depends on a caller still waiting. The
committer runs shielded, so a transaction is never left half way: when
``run()`` ends (``aclose()`` or cancellation) everything admitted or waiting
for admission is handed to it, and it commits it all before it stops.

Reads. ``STORE_READERS`` read-only (``mode=ro``) connections form a pool:
a semaphore hands each one to one thread at a time. With WAL, readers see the
last committed snapshot and never wait for the writer. Multi-query reads
(``load_actor``) run in one read transaction so they see one snapshot.
Store threads use their own ``CapacityLimiter`` so the rest of the process
cannot starve the committer of threads.

Durability. ``synchronous=FULL`` (default) fsyncs the WAL on every commit:
an acknowledged write survives power loss. ``NORMAL`` survives a process
crash but may lose the last commits on power loss; it is cheaper.

Retention. ``prune()`` deletes ``RETENTION_DELETE_BATCH`` rows per
transaction, each one a job of its own through the committer, so other
writers interleave between batches and the write lock is never held long.
It also forgets idempotency keys older than the cutoff (not counted).

Worker event log. ``PutEvent`` appends to ``worker_events`` (AUTOINCREMENT
row id = event id: ids grow in commit order and a committed id is never
reused, even after pruning) and the id is written into the op after its
transaction commits, before ``write()`` returns. ``PutCursor`` saves a plugin's watermark (never lowered).

Semantics the interface leaves open, decided here:
``PutConversation`` upserts, but ``last_seq`` and ``updated_at`` never go
down (the same MAX rule as ``PutMessage``); ``SetMembers`` applies ``add``
then ``remove``; ``PutAgent`` is ignored if older (``ts``) than the stored
row; a repeated ``PutAppliedKey`` is a no-op; ``MarkRecalled`` of a missing
message is a no-op. ``list_conversations`` pages strictly below
``updated_before``: rows sharing the boundary timestamp with the last row of a
page are skipped (the interface has no tie-breaker cursor). In the AGENT
scope "assigned to user" means ``agent == user`` in any state, so an agent
also sees the conversations they closed.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import trio

from protocol import (
    AgentStatus,
    Channel,
    Conversation,
    ConvKind,
    ConvState,
    MemberRole,
    Message,
    Role,
    TextBody,
    WorkerEventKind,
)

from ..limits import (
    RETENTION_DELETE_BATCH,
    STORE_COMMIT_WINDOW_S,
    STORE_MAX_BATCH_OPS,
    STORE_MAX_PENDING_OPS,
    STORE_READERS,
)
from ._base import (
    ActorSnapshot,
    AgentRecord,
    MarkRecalled,
    PageRead,
    PutAgent,
    PutAppliedKey,
    PutConversation,
    PutCursor,
    PutEvent,
    PutMessage,
    PutShop,
    PutStaff,
    PutUsedToken,
    Scope,
    ScopeKind,
    SetMembers,
    SetReadPoint,
    StoredEvent,
    WriteOp,
)
from ._schema import (
    BODY_KIND,
    body_decoder,
    body_encoder,
    event_decoder,
    event_encoder,
    migrate,
    tags_decoder,
    tags_encoder,
)
from ._shops import SQL_LIST_SHOPS, SQL_PUT_SHOP
from ._writer import PruneWork, WireWork, WriterProcess

__all__ = ["SqliteStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

BUSY_TIMEOUT_S: Final = 5.0
"""How long a statement waits for a lock held by another connection. This
process is the only writer, so only outside readers (export, the sqlite3 CLI)
and WAL checkpoints ever contend; they hold locks for milliseconds."""

_SYNCHRONOUS_MODES: Final = frozenset({"FULL", "EXTRA", "NORMAL"})
"""OFF is refused: write() promises durability."""

_NO_BOUND: Final = 2**62
"""Stands for "no upper bound" in seq / updated_at comparisons (Seq <= 2**53)."""

_OP_TYPES: Final = (
    PutConversation,
    PutMessage,
    SetMembers,
    SetReadPoint,
    MarkRecalled,
    PutAgent,
    PutAppliedKey,
    PutEvent,
    PutCursor,
    PutUsedToken,
    PutShop,
    PutStaff,
)

OnCommit = Callable[[float, int, int], None]


# --------------------------------------------------------------------- jobs


@dataclass(frozen=True, slots=True)
class _PruneStep:
    """Delete at most ``limit`` rows of ``table`` with ts < ``cutoff``."""

    table: Literal["messages", "applied_keys", "worker_events", "used_tokens"]
    cutoff: int
    limit: int


_Work = list[WriteOp] | _PruneStep


class _Job:
    __slots__ = ("admitted", "done", "error", "result", "solo", "weight", "work")

    def __init__(self, work: _Work, weight: int, *, solo: bool = False) -> None:
        self.work = work
        self.weight = weight
        """Operations it counts for in batching and backpressure."""
        self.solo = solo
        """Never share a transaction (prune steps)."""
        self.admitted = False
        self.done = trio.Event()
        self.result = 0
        self.error: BaseException | None = None


_Stat = tuple[float, int, int]
"""(seconds, ops, callers) of one committed transaction."""


class _Handoff:
    """The FIFO of admitted jobs, from the callers to the committer task (all
    in the trio thread).

    ``put`` never blocks; ``take`` waits until there is work or ``stop`` was
    called and everything was taken. Group commit by time: a batch is not
    taken before its oldest job has waited ``window`` seconds (unless
    stopping, or a full batch is already waiting), so that at low load one
    commit -- whose fsync and round trip cost the same for one message as
    for fifty -- carries the messages of a few milliseconds rather than one.
    Under load the committer is busy longer than the window and takes each
    batch at once.
    """

    def __init__(self, max_batch_ops: int, window_s: float) -> None:
        self._max_batch = max_batch_ops
        self._window = window_s
        self._jobs: deque[_Job] = deque()
        self._ops = 0
        self._arrived: deque[float] = deque()
        self._wakeup: trio.Event | None = None
        self._emptied = trio.Event()
        self._stopping = False

    def put(self, job: _Job) -> None:
        self._jobs.append(job)
        self._ops += job.weight
        if self._window > 0:
            self._arrived.append(trio.current_time())
        if self._wakeup is not None:
            self._wakeup.set()

    def stop(self) -> None:
        """The committer commits what is queued, then its ``take`` returns None."""
        self._stopping = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def take(self) -> list[_Job] | None:
        """The next batch, in arrival order: whole jobs up to ``max_batch_ops``
        operations (a larger job alone, a solo job alone)."""
        jobs = self._jobs
        while not jobs:
            if self._stopping:
                return None
            self._wakeup = trio.Event()
            await self._wakeup.wait()
            self._wakeup = None
        if self._window > 0 and not self._stopping and self._ops < self._max_batch:
            await trio.sleep_until(self._arrived[0] + self._window)
        batch = [jobs.popleft()]
        ops = batch[0].weight
        while jobs and not batch[0].solo:
            head = jobs[0]
            if head.solo or ops + head.weight > self._max_batch:
                break
            batch.append(jobs.popleft())
            ops += head.weight
        self._ops -= ops
        if self._window > 0:
            for _ in batch:
                self._arrived.popleft()
        if not jobs:
            self._emptied.set()
            self._emptied = trio.Event()
        return batch

    async def wait_taken(self) -> None:
        """Until the committer has taken every job put so far (tests use it to
        know which jobs are in flight and which are still queued)."""
        while self._jobs:
            await self._emptied.wait()

    def drain(self) -> list[_Job]:
        """What was never taken (only if the committer died of a bug)."""
        left = list(self._jobs)
        self._jobs.clear()
        self._arrived.clear()
        self._ops = 0
        return left


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    RUNNING = "running"
    CLOSED = "closed"


# ---------------------------------------------------------------------- SQL

_CONV_COLUMNS: Final = (
    "c.id, c.kind, c.shop, c.customer, c.channel, c.state, c.agent, c.priority, c.tags,"
    " c.title, c.last_seq, c.created_at, c.updated_at"
)

_SQL_PUT_CONVERSATION: Final = """
INSERT INTO conversations (id, kind, shop, customer, channel, state, agent, priority, tags,
                           title, last_seq, created_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    kind = excluded.kind, shop = excluded.shop, customer = excluded.customer,
    channel = excluded.channel, state = excluded.state, agent = excluded.agent,
    priority = excluded.priority, tags = excluded.tags, title = excluded.title,
    created_at = excluded.created_at,
    last_seq = MAX(last_seq, excluded.last_seq),
    updated_at = MAX(updated_at, excluded.updated_at)
"""
_SQL_PUT_MEMBER: Final = """
INSERT INTO members (conv, user, role) VALUES (?, ?, ?)
ON CONFLICT (conv, user) DO UPDATE SET role = excluded.role
"""
_SQL_DELETE_MEMBER: Final = "DELETE FROM members WHERE conv = ? AND user = ?"
_SQL_RECALL: Final = "UPDATE messages SET recalled = 1, body = X'' WHERE conv = ? AND seq = ?"
_SQL_PUT_AGENT: Final = """
INSERT INTO agents (shop, agent, status, ts) VALUES (?, ?, ?, ?)
ON CONFLICT (shop, agent) DO UPDATE SET status = excluded.status, ts = excluded.ts
WHERE excluded.ts >= agents.ts
"""
_SQL_PUT_KEY: Final = """
INSERT INTO applied_keys (conv, key, ts) VALUES (?, ?, ?)
ON CONFLICT (conv, key) DO NOTHING
"""
_SQL_PUT_CURSOR: Final = """
INSERT INTO worker_cursors (plugin, event_id) VALUES (?, ?)
ON CONFLICT (plugin) DO UPDATE SET event_id = MAX(event_id, excluded.event_id)
"""
_SQL_PUT_USED_TOKEN: Final = """
INSERT INTO used_tokens (jti, exp) VALUES (?, ?) ON CONFLICT (jti) DO NOTHING
"""
_SQL_PUT_STAFF: Final = """
INSERT INTO staff (shop, user, role, ts) VALUES (?, ?, ?, ?)
ON CONFLICT (shop, user) DO UPDATE SET role = excluded.role, ts = excluded.ts
WHERE excluded.ts >= staff.ts
"""
_SQL_USED_TOKENS: Final = "SELECT jti, exp FROM used_tokens WHERE exp > ? ORDER BY exp DESC LIMIT ?"

_SQL_PRUNE: Final = {
    "used_tokens": """
        DELETE FROM used_tokens WHERE jti IN
            (SELECT jti FROM used_tokens WHERE exp < ? ORDER BY exp LIMIT ?)""",
    "messages": """
        DELETE FROM messages WHERE (conv, seq) IN
            (SELECT conv, seq FROM messages WHERE ts < ? ORDER BY ts LIMIT ?)""",
    "applied_keys": """
        DELETE FROM applied_keys WHERE id IN
            (SELECT id FROM applied_keys WHERE ts < ? ORDER BY ts LIMIT ?)""",
    "worker_events": """
        DELETE FROM worker_events WHERE id IN
            (SELECT id FROM worker_events WHERE ts < ? ORDER BY ts LIMIT ?)""",
}

_MESSAGE_COLUMNS: Final = "seq, sender, sender_role, cmid, ts, kind, body, recalled"
SQL_HISTORY_BEFORE: Final = f"""
SELECT {_MESSAGE_COLUMNS} FROM messages
WHERE conv = ? AND seq < ? ORDER BY seq DESC LIMIT ?
"""
SQL_HISTORY_AFTER: Final = f"""
SELECT {_MESSAGE_COLUMNS} FROM messages
WHERE conv = ? AND seq > ? AND seq < ? ORDER BY seq ASC LIMIT ?
"""
SQL_GET_CONVERSATION: Final = f"SELECT {_CONV_COLUMNS} FROM conversations AS c WHERE c.id = ?"
SQL_GET_MEMBERS: Final = "SELECT user, role FROM members WHERE conv = ? ORDER BY user"
SQL_MEMBER_ROLE: Final = "SELECT role FROM members WHERE conv = ? AND user = ?"
SQL_RECENT_CMIDS: Final = """
SELECT sender, cmid, seq, ts FROM messages WHERE conv = ? ORDER BY seq DESC LIMIT ?
"""
SQL_RECENT_KEYS: Final = "SELECT key FROM applied_keys WHERE conv = ? ORDER BY id DESC LIMIT ?"
# The literal kind/state terms must match conv_open_direct's WHERE for the
# partial index to apply; INDEXED BY because the ORDER BY (a tie-break that
# should never be needed) would otherwise lure the planner to conv_by_customer.
SQL_FIND_OPEN_DIRECT: Final = f"""
SELECT {_CONV_COLUMNS} FROM conversations AS c INDEXED BY conv_open_direct
WHERE c.shop = ? AND c.customer = ? AND c.kind = 'direct' AND c.state <> 'closed'
ORDER BY c.updated_at DESC, c.id DESC LIMIT 1
"""
SQL_READ_POINT: Final = "SELECT seq FROM read_points WHERE conv = ? AND user = ?"
SQL_LIST_AGENTS: Final = "SELECT shop, agent, status, ts FROM agents WHERE shop = ? ORDER BY agent"
SQL_SHOP_EXISTS: Final = "SELECT 1 FROM shops WHERE name = ?"
# A customer has at most one direct conversation per shop, so walking theirs
# (conv_by_customer) is short; memberships walk members_by_user.
SQL_SHOP_USER: Final = """
SELECT EXISTS (SELECT 1 FROM staff WHERE shop = :shop AND user = :user)
    OR EXISTS (SELECT 1 FROM agents WHERE shop = :shop AND agent = :user)
    OR EXISTS (SELECT 1 FROM conversations AS c WHERE c.customer = :user AND c.shop = :shop)
"""
# (Group membership makes no one a user of the shop: members are chosen among its users.)
SQL_SHOP_AGENT: Final = """
SELECT EXISTS (SELECT 1 FROM staff WHERE shop = :shop AND user = :user
               AND role IN ('agent', 'supervisor'))
    OR EXISTS (SELECT 1 FROM agents WHERE shop = :shop AND agent = :user)
"""
SQL_COUNT_OPEN_DIRECT: Final = """
SELECT COUNT(*) FROM (SELECT 1 FROM conversations AS c
                      WHERE c.customer = ? AND c.kind = 'direct' AND c.state <> 'closed' LIMIT ?)
"""
SQL_WORKER_CURSOR: Final = "SELECT event_id FROM worker_cursors WHERE plugin = ?"
SQL_WORKER_PLUGINS: Final = "SELECT plugin FROM worker_cursors ORDER BY plugin"
# The highest id ever committed, so it stays right after the newest rows are pruned.
SQL_LAST_EVENT_ID: Final = "SELECT seq FROM sqlite_sequence WHERE name = 'worker_events'"
SQL_EVENTS_AFTER: Final = """
SELECT id, shard, kind, event FROM worker_events WHERE id > ? ORDER BY id LIMIT ?
"""


def list_conversations_sql(kind: ScopeKind, with_state: bool) -> str:
    """The page query of ``list_conversations`` (named parameters :user,
    :shop, :state, :before, :before_id, :n). Pages are cut by the key
    (updated_at, id), so conversations updated in the same millisecond are
    neither skipped nor repeated.

    A scope is a union of "branches", each served in page order by one index
    and cut at :n rows, so a page reads O(branches * limit) index entries
    whatever the table size; membership branches read the user's memberships
    (bounded by the groups they belong to)."""
    state = " AND c.state = :state" if with_state else ""

    def direct(condition: str) -> str:
        where = f"{condition} AND " if condition else ""
        return (
            "SELECT c.id, c.updated_at FROM conversations AS c"
            f" WHERE {where}(c.updated_at, c.id) < (:before, :before_id){state}"
            " ORDER BY c.updated_at DESC, c.id DESC LIMIT :n"
        )

    def membership(condition: str) -> str:
        # CROSS JOIN pins members as the outer loop: without statistics the
        # planner may prefer walking every conversation of a state or shop.
        return (
            "SELECT c.id, c.updated_at FROM members AS m"
            " CROSS JOIN conversations AS c ON c.id = m.conv"
            f" WHERE m.user = :user{condition} AND (c.updated_at, c.id) < (:before, :before_id){state}"
            " ORDER BY c.updated_at DESC, c.id DESC LIMIT :n"
        )

    if kind is ScopeKind.CUSTOMER:
        branches = [direct("c.customer = :user"), membership("")]
    elif kind is ScopeKind.AGENT:
        branches = [
            direct("c.shop = :shop AND c.agent = :user"),
            direct("c.shop = :shop AND c.state = 'bot'"),
            direct("c.shop = :shop AND c.state = 'queued'"),
            membership(" AND c.shop = :shop AND c.kind = 'group'"),
        ]
    elif kind is ScopeKind.SHOP:
        branches = [direct("c.shop = :shop")]
    else:
        branches = [direct("")]
    union = "\n    UNION\n    ".join(f"SELECT id, updated_at FROM ({b})" for b in branches)
    return f"""
WITH page (id, updated_at) AS (
    {union}
)
SELECT {_CONV_COLUMNS}, COALESCE(r.seq, 0)
FROM page AS p
JOIN conversations AS c ON c.id = p.id
LEFT JOIN read_points AS r ON r.conv = c.id AND r.user = :user
ORDER BY p.updated_at DESC, p.id DESC
LIMIT :n
"""


_LIST_SQL: Final = {
    (kind, with_state): list_conversations_sql(kind, with_state)
    for kind in ScopeKind
    for with_state in (False, True)
}


# ------------------------------------------------------------ row mapping


def _conversation(row: Sequence[Any], read_seq: int | None = None) -> Conversation:
    last_seq = int(row[10])
    return Conversation(
        id=row[0],
        kind=ConvKind(row[1]),
        shop=row[2],
        customer=row[3],
        channel=Channel(row[4]),
        state=ConvState(row[5]),
        agent=row[6],
        priority=row[7],
        tags=tags_decoder.decode(row[8]),
        title=row[9],
        last_seq=last_seq,
        created_at=row[11],
        updated_at=row[12],
        read_seq=read_seq or 0,
        unread=max(0, last_seq - read_seq) if read_seq is not None else 0,
    )


def _message(conv: str, row: Sequence[Any]) -> Message:
    seq, sender, sender_role, cmid, ts, _kind, body, recalled = row
    return Message(
        conv=conv,
        seq=seq,
        sender=sender,
        sender_role=Role(sender_role),
        cmid=cmid,
        ts=ts,
        body=TextBody(text="") if recalled else body_decoder.decode(body),
        recalled=bool(recalled),
    )


# ------------------------------------------------------- the write thread


_Numbered = list[tuple[PutEvent, int]]
"""Event ids to write into the ops once their transaction has committed."""

ROWS_PER_STATEMENT: Final = (128, 16, 4, 1)
"""Rows per multi-row statement, largest first: a run of n rows costs about
n/128 + 8 statements, each prepared once and cached by the connection. Every
``execute`` hands the GIL back and forth around ``sqlite3_step``; under load
the trio thread holds the GIL most of the time, so the writer thread waited
for it once per row. (128 x 9 columns stays far below SQLite's 32,766
variables per statement.)"""

_MESSAGE_ROW: Final = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
_READ_POINT_ROW: Final = "(?, ?, ?)"
_BUMP_ROW: Final = "(?, ?, ?)"
_EVENT_ROW: Final = "(?, ?, ?, ?)"


@functools.cache
def _multi_row_sql(kind: str, rows: int) -> str:
    if kind == "messages":
        return (
            "INSERT INTO messages (conv, seq, sender, sender_role, cmid, ts, kind, body,"
            " recalled) VALUES " + ", ".join([_MESSAGE_ROW] * rows)
        )
    if kind == "read_points":
        return (
            "INSERT INTO read_points (conv, user, seq) VALUES "
            + ", ".join([_READ_POINT_ROW] * rows)
            + " ON CONFLICT (conv, user) DO UPDATE SET seq = MAX(seq, excluded.seq)"
        )
    if kind == "bumps":
        # UPDATE ... FROM (SQLite >= 3.33); ids are unique within one statement.
        return (
            "UPDATE conversations SET last_seq = MAX(last_seq, v.column2),"
            " updated_at = MAX(updated_at, v.column3) FROM (VALUES "
            + ", ".join([_BUMP_ROW] * rows)
            + ") AS v WHERE conversations.id = v.column1"
        )
    if kind == "events":
        return "INSERT INTO worker_events (shard, kind, ts, event) VALUES " + ", ".join(
            [_EVENT_ROW] * rows
        )
    raise ValueError(kind)


def _execute_rows(
    cur: sqlite3.Cursor, kind: str, rows: Sequence[tuple[Any, ...]]
) -> list[tuple[int, int]]:
    """Execute ``rows`` in multi-row statements, in order; returns (rows, last
    row id) of each statement, for event numbering."""
    done = 0
    statements: list[tuple[int, int]] = []
    for size in ROWS_PER_STATEMENT:
        while len(rows) - done >= size:
            params = [value for row in rows[done : done + size] for value in row]
            cur.execute(_multi_row_sql(kind, size), params)
            statements.append((size, cur.lastrowid or 0))
            done += size
    return statements


class _Rows:
    """The row-shaped ops of one transaction, written in multi-row statements.

    Messages, read points, conversation bumps and worker events are buffered
    and flushed together before any other kind of op is applied (and at the
    end), so every op still sees the effects of all ops before it: those four
    commute with each other (different rows or MAX rules), and nothing else
    reads them within a transaction except ``MarkRecalled``, which comes after
    a flush. Buffering only reorders inserts into different tables between
    two flushes; foreign keys are checked per statement, as before.
    """

    __slots__ = ("bumps", "cur", "events", "messages", "numbered", "read_points")

    def __init__(self, cur: sqlite3.Cursor, numbered: _Numbered) -> None:
        self.cur = cur
        self.numbered = numbered
        self.messages: list[tuple[Any, ...]] = []
        self.bumps: dict[str, tuple[int, int]] = {}
        self.read_points: dict[tuple[str, str], int] = {}
        self.events: list[PutEvent] = []

    def message(self, m: Message) -> None:
        body = b"" if m.recalled else body_encoder.encode(m.body)
        self.messages.append(
            (
                m.conv,
                m.seq,
                m.sender,
                m.sender_role.value,
                m.cmid,
                m.ts,
                BODY_KIND[type(m.body)],
                body,
                int(m.recalled),
            )
        )
        seq, ts = self.bumps.get(m.conv, (0, 0))
        self.bumps[m.conv] = (max(seq, m.seq), max(ts, m.ts))

    def read_point(self, op: SetReadPoint) -> None:
        key = (op.conv, op.user)
        self.read_points[key] = max(self.read_points.get(key, 0), op.seq)

    def flush(self) -> None:
        cur = self.cur
        if self.messages:
            _execute_rows(cur, "messages", self.messages)
            _execute_rows(cur, "bumps", [(conv, seq, ts) for conv, (seq, ts) in self.bumps.items()])
            self.messages.clear()
            self.bumps.clear()
        if self.read_points:
            _execute_rows(
                cur,
                "read_points",
                [(conv, user, seq) for (conv, user), seq in self.read_points.items()],
            )
            self.read_points.clear()
        if self.events:
            events = self.events
            rows = [
                (op.shard, op.kind.value, op.event.ts, event_encoder.encode(op.event))
                for op in events
            ]
            # AUTOINCREMENT ids of one multi-row INSERT are consecutive, in VALUES
            # order (one writer, and an id is max(ever used) + 1).
            done = 0
            for size, last_id in _execute_rows(cur, "events", rows):
                for offset, op in enumerate(events[done : done + size]):
                    self.numbered.append((op, last_id - size + 1 + offset))
                done += size
            self.events = []


def _apply_ops(rows: _Rows, ops: list[WriteOp]) -> None:
    cur = rows.cur
    for op in ops:
        if isinstance(op, PutMessage):
            rows.message(op.message)
            continue
        if isinstance(op, SetReadPoint):
            rows.read_point(op)
            continue
        if isinstance(op, PutEvent):
            rows.events.append(op)
            continue
        rows.flush()
        if isinstance(op, PutConversation):
            c = op.conversation
            cur.execute(
                _SQL_PUT_CONVERSATION,
                (
                    c.id,
                    c.kind.value,
                    c.shop,
                    c.customer,
                    c.channel.value,
                    c.state.value,
                    c.agent,
                    c.priority,
                    tags_encoder.encode(c.tags).decode(),
                    c.title,
                    c.last_seq,
                    c.created_at,
                    c.updated_at,
                ),
            )
        elif isinstance(op, SetMembers):
            for user, role in op.add.items():
                cur.execute(_SQL_PUT_MEMBER, (op.conv, user, role.value))
            for user in op.remove:
                cur.execute(_SQL_DELETE_MEMBER, (op.conv, user))
        elif isinstance(op, MarkRecalled):
            cur.execute(_SQL_RECALL, (op.conv, op.seq))
        elif isinstance(op, PutAgent):
            cur.execute(_SQL_PUT_AGENT, (op.shop, op.agent, op.status.value, op.ts))
        elif isinstance(op, PutAppliedKey):
            cur.execute(_SQL_PUT_KEY, (op.conv, op.key, op.ts))
        elif isinstance(op, PutCursor):
            cur.execute(_SQL_PUT_CURSOR, (op.plugin, op.event_id))
        elif isinstance(op, PutUsedToken):
            cur.execute(_SQL_PUT_USED_TOKEN, (op.jti, op.exp))
        elif isinstance(op, PutShop):
            cur.execute(SQL_PUT_SHOP, (op.name, op.ts))
        elif isinstance(op, PutStaff):
            cur.execute(_SQL_PUT_STAFF, (op.shop, op.user, op.role.value, op.ts))
        else:  # pragma: no cover - write() checks types before enqueueing
            raise TypeError(f"not a store write op: {op!r}")


def _apply_work(rows: _Rows, work: _Work) -> tuple[int, int]:
    """Apply one job's work; return (result, ops for on_commit)."""
    if isinstance(work, _PruneStep):
        rows.flush()
        rows.cur.execute(_SQL_PRUNE[work.table], (work.cutoff, work.limit))
        return rows.cur.rowcount, rows.cur.rowcount
    _apply_ops(rows, work)
    return 0, len(work)


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite may already have rolled back (e.g. SQLITE_FULL); never mask the cause.
    with contextlib.suppress(sqlite3.Error):
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _in_transaction(conn: sqlite3.Connection, works: list[_Work]) -> list[tuple[int, int]]:
    numbered: _Numbered = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = _Rows(conn.cursor(), numbered)
        out = [_apply_work(rows, work) for work in works]
        rows.flush()
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    # Only now: an id from a rolled-back attempt must never reach the caller.
    # (The caller reads it after write() returns, i.e. after this thread is done.)
    for op, event_id in numbered:
        op.id = event_id
    return out


def _transact(
    conn: sqlite3.Connection, works: list[_Work]
) -> tuple[list[int | Exception], list[_Stat]]:
    """Run in a worker thread: commit ``works`` together, or, if that fails,
    each on its own. Returns one result (or exception) per work, and the
    stats of each committed transaction."""
    started = time.perf_counter()
    try:
        out = _in_transaction(conn, works)
    except Exception as exc:
        if len(works) == 1:
            return [exc], []
    else:
        stat = (time.perf_counter() - started, sum(ops for _, ops in out), len(works))
        return [result for result, _ in out], [stat]
    results: list[int | Exception] = []
    stats: list[_Stat] = []
    for work in works:
        started = time.perf_counter()
        try:
            ((result, ops),) = _in_transaction(conn, [work])
        except Exception as exc:
            results.append(exc)
        else:
            results.append(result)
            stats.append((time.perf_counter() - started, ops, 1))
    return results, stats


async def _transact_in(
    process: WriterProcess, batch: list[_Job]
) -> tuple[list[int | Exception], list[_Stat]]:
    """``_transact`` run by the writer process; event ids come back with the
    outcome and are written into the ops here, as ``_in_transaction`` does."""
    works: list[WireWork] = [
        PruneWork(table=job.work.table, cutoff=job.work.cutoff, limit=job.work.limit)
        if isinstance(job.work, _PruneStep)
        else job.work
        for job in batch
    ]
    results, event_ids, stats = await process.transact(works)
    for job, result, ids in zip(batch, results, event_ids, strict=True):
        if isinstance(job.work, list) and not isinstance(result, Exception):
            events = [op for op in job.work if isinstance(op, PutEvent)]
            for op, event_id in zip(events, ids, strict=True):
                op.id = event_id
    return results, stats


# --------------------------------------------------------- read functions


def _q_load_actor(
    conn: sqlite3.Connection, conv: str, dedup_window: int, keys_window: int
) -> ActorSnapshot:
    conn.execute("BEGIN")  # one snapshot for the four queries
    try:
        row = conn.execute(SQL_GET_CONVERSATION, (conv,)).fetchone()
        members = {u: MemberRole(r) for u, r in conn.execute(SQL_GET_MEMBERS, (conv,))}
        recent = conn.execute(SQL_RECENT_CMIDS, (conv, max(dedup_window, 0))).fetchall()
        keys = {k for (k,) in conn.execute(SQL_RECENT_KEYS, (conv, max(keys_window, 0)))}
    finally:
        _rollback(conn)
    cmids: dict[tuple[str, str], tuple[int, int]] = {}
    for sender, cmid, seq, ts in reversed(recent):  # oldest first: keep the original seq
        cmids.setdefault((sender, cmid), (seq, ts))
    return ActorSnapshot(
        conversation=_conversation(row) if row is not None else None,
        members=members,
        recent_cmids=cmids,
        applied_keys=keys,
    )


def _q_history(
    conn: sqlite3.Connection, conv: str, before: int | None, after: int | None, limit: int
) -> tuple[list[Message], bool]:
    limit = max(limit, 0)
    upper = _NO_BOUND if before is None else before
    if after is None:
        rows = conn.execute(SQL_HISTORY_BEFORE, (conv, upper, limit + 1)).fetchall()
        page = rows[:limit]
        page.reverse()
    else:
        rows = conn.execute(SQL_HISTORY_AFTER, (conv, after, upper, limit + 1)).fetchall()
        page = rows[:limit]
    return [_message(conv, row) for row in page], len(rows) > limit


def _q_list_conversations(
    conn: sqlite3.Connection,
    scope: Scope,
    state: ConvState | None,
    before: int | None,
    limit: int,
    before_id: str | None = None,
) -> tuple[list[Conversation], bool]:
    limit = max(limit, 0)
    params = {
        "user": scope.user,
        "shop": scope.shop,
        "state": state.value if state is not None else None,
        "before": _NO_BOUND if before is None else before,
        # "" sorts before every id: without an id the page starts strictly below ``before``
        "before_id": before_id or "",
        "n": limit + 1,
    }
    rows = conn.execute(_LIST_SQL[scope.kind, state is not None], params).fetchall()
    return [_conversation(row, row[13]) for row in rows[:limit]], len(rows) > limit


def _q_get_conversation(conn: sqlite3.Connection, conv: str) -> Conversation | None:
    row = conn.execute(SQL_GET_CONVERSATION, (conv,)).fetchone()
    return _conversation(row) if row is not None else None


def _q_get_members(conn: sqlite3.Connection, conv: str) -> dict[str, MemberRole]:
    return {u: MemberRole(r) for u, r in conn.execute(SQL_GET_MEMBERS, (conv,))}


def _q_read_page(
    conn: sqlite3.Connection,
    conv: str,
    user: str,
    before: int | None,
    after: int | None,
    limit: int,
) -> PageRead:
    conversation = _q_get_conversation(conn, conv)
    if conversation is None:
        return PageRead(conversation=None, member_role=None, messages=[], more=False)
    row = conn.execute(SQL_MEMBER_ROLE, (conv, user)).fetchone()
    messages, more = _q_history(conn, conv, before, after, limit)
    return PageRead(
        conversation=conversation,
        member_role=MemberRole(row[0]) if row else None,
        messages=messages,
        more=more,
    )


def _q_find_open_direct(conn: sqlite3.Connection, shop: str, customer: str) -> Conversation | None:
    row = conn.execute(SQL_FIND_OPEN_DIRECT, (shop, customer)).fetchone()
    return _conversation(row) if row is not None else None


def _q_read_point(conn: sqlite3.Connection, conv: str, user: str) -> int:
    row = conn.execute(SQL_READ_POINT, (conv, user)).fetchone()
    return int(row[0]) if row is not None else 0


def _q_list_agents(conn: sqlite3.Connection, shop: str) -> list[AgentRecord]:
    return [
        AgentRecord(shop=s, agent=a, status=AgentStatus(st), ts=ts)
        for s, a, st, ts in conn.execute(SQL_LIST_AGENTS, (shop,))
    ]


def _q_shop_users(conn: sqlite3.Connection, shop: str, users: Sequence[str]) -> set[str]:
    return {
        user
        for user in users
        if conn.execute(SQL_SHOP_USER, {"shop": shop, "user": user}).fetchone()[0]
    }


def _q_shop_agent(conn: sqlite3.Connection, shop: str, user: str) -> bool:
    return bool(conn.execute(SQL_SHOP_AGENT, {"shop": shop, "user": user}).fetchone()[0])


def _q_worker_cursor(conn: sqlite3.Connection, plugin: str) -> int | None:
    row = conn.execute(SQL_WORKER_CURSOR, (plugin,)).fetchone()
    return int(row[0]) if row is not None else None


def _q_worker_plugins(conn: sqlite3.Connection) -> list[str]:
    return [str(row[0]) for row in conn.execute(SQL_WORKER_PLUGINS)]


def _q_last_event_id(conn: sqlite3.Connection) -> int:
    row = conn.execute(SQL_LAST_EVENT_ID).fetchone()
    return int(row[0]) if row is not None else 0


def _q_events_after(conn: sqlite3.Connection, after: int, limit: int) -> list[StoredEvent]:
    return [
        StoredEvent(
            id=event_id, shard=shard, kind=WorkerEventKind(kind), event=event_decoder.decode(blob)
        )
        for event_id, shard, kind, blob in conn.execute(SQL_EVENTS_AFTER, (after, max(limit, 0)))
    ]


# -------------------------------------------------------------- the store


class SqliteStore:
    """``Store`` on one SQLite file. See the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "FULL",
        on_commit: OnCommit | None = None,
        max_batch_ops: int = STORE_MAX_BATCH_OPS,
        max_pending_ops: int = STORE_MAX_PENDING_OPS,
        readers: int = STORE_READERS,
        writer_process: bool = True,
        commit_window_s: float = STORE_COMMIT_WINDOW_S,
    ) -> None:
        mode = synchronous.upper()
        if mode not in _SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {sorted(_SYNCHRONOUS_MODES)}")
        if min(max_batch_ops, max_pending_ops, readers) < 1:
            raise ValueError("max_batch_ops, max_pending_ops and readers must be >= 1")
        self.path = Path(path)
        self.synchronous = mode
        self._on_commit = on_commit
        self._max_batch = max_batch_ops
        self._max_pending = max_pending_ops
        self._n_readers = readers
        self._writer_process = writer_process
        """Commit in a child process (``_writer``), not in the writer thread."""
        self.writer: WriterProcess | None = None
        """The writer process, while ``run()`` runs (None: a worker thread commits)."""

        self._state = _State.NEW
        self._run_called = False
        self._closing = False
        self._closed = trio.Event()
        self._open_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(readers + 1)  # readers + the committer

        self._writer: sqlite3.Connection | None = None
        self._idle_readers: list[sqlite3.Connection] = []
        self._reader_slots = trio.Semaphore(readers)
        self._readers_closed = False

        self._handoff = _Handoff(max_batch_ops, commit_window_s)  # admitted, not yet taken
        self._waiting: deque[_Job] = deque()  # the admission line (backpressure)
        self._pending_ops = 0  # admitted and not yet committed (queued + in flight)
        self._stop = trio.Event()

    # ------------------------------------------------------------ lifecycle

    @property
    def pending_ops(self) -> int:
        """Write operations accepted and not yet committed (for metrics)."""
        return self._pending_ops

    async def open(self) -> None:
        """Create or migrate the schema and open the connections (idempotent).
        Reads work from here on; writes need ``run()``."""
        async with self._open_lock:
            if self._state is _State.CLOSED:
                raise trio.ClosedResourceError("the store is closed")
            if self._state is not _State.NEW:
                return
            self._writer, self._idle_readers = await trio.to_thread.run_sync(
                self._open_sync, limiter=self._limiter
            )
            self._state = _State.OPEN

    def _open_sync(self) -> tuple[sqlite3.Connection, list[sqlite3.Connection]]:
        if sqlite3.sqlite_version_info < (3, 24, 0):  # UPSERT
            raise RuntimeError(f"SQLite >= 3.24 is required, found {sqlite3.sqlite_version}")
        opened: list[sqlite3.Connection] = []
        try:
            writer = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            opened.append(writer)
            (journal,) = writer.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(journal).lower() != "wal":
                raise RuntimeError(f"{self.path}: cannot use WAL mode (got {journal!r})")
            # The mode is one of a fixed set, so formatting it in is safe.
            writer.execute(f"PRAGMA synchronous = {self.synchronous}")
            writer.execute("PRAGMA foreign_keys = ON")
            migrate(writer)
            uri = self.path.resolve().as_uri() + "?mode=ro"
            readers = []
            for _ in range(self._n_readers):
                reader = sqlite3.connect(
                    uri,
                    uri=True,
                    timeout=BUSY_TIMEOUT_S,
                    isolation_level=None,
                    check_same_thread=False,
                )
                opened.append(reader)
                readers.append(reader)
        except BaseException:
            for conn in opened:
                conn.close()
            raise
        return writer, readers

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open, report started, commit writes until ``aclose()`` or
        cancellation; then commit what is pending and close."""
        if self._run_called:
            raise RuntimeError("SqliteStore.run() was already called")
        self._run_called = True  # before any await: two run()s must not both pass
        await self.open()
        process = None
        try:
            if self._writer_process:
                # Started before run() reports itself started: its memory is part of
                # the server's baseline, and the first write pays no fork.
                process = self.writer = WriterProcess(
                    str(self.path), self.synchronous, BUSY_TIMEOUT_S
                )
                try:
                    await trio.to_thread.run_sync(process.start, limiter=self._limiter)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await process.aclose()
                    raise
            self._state = _State.RUNNING
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_committer, process)
                try:
                    task_status.started()
                    await self._stop.wait()
                finally:
                    self._closing = True
                    # Everything still waiting for admission goes to the committer, which
                    # commits it all before it stops (cancellation cannot cut this short:
                    # it runs shielded).
                    while self._waiting:
                        self._admit_job(self._waiting.popleft())
                    self._handoff.stop()
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()

    async def aclose(self) -> None:
        """Refuse new writes, commit everything pending, close all connections.
        Idempotent; with ``run()`` running, waits for it to finish."""
        async with self._open_lock:  # let an open() in progress finish first
            if self._state in (_State.NEW, _State.OPEN):
                # No committer, so nothing is pending: just close.
                self._state = _State.CLOSED
                try:
                    with trio.CancelScope(shield=True):
                        await self._close_connections()
                finally:
                    self._closed.set()
        if self._state is _State.RUNNING:
            self._closing = True
            self._stop.set()
        await self._closed.wait()

    async def _shutdown(self) -> None:
        self._closing = True
        try:
            # Empty unless the writer thread died of a bug.
            leftovers = [*self._handoff.drain(), *self._waiting]
            self._waiting.clear()
            for job in leftovers:
                job.error = trio.ClosedResourceError("the store closed before this write committed")
                job.done.set()
            self._state = _State.CLOSED
        finally:
            try:
                await self._close_connections()
            finally:
                self._closed.set()

    async def _close_connections(self) -> None:
        self._readers_closed = True
        # Take every reader slot: waits for reads in flight to hand theirs back.
        for _ in range(self._n_readers):
            await self._reader_slots.acquire()
        conns = [*self._idle_readers]
        self._idle_readers.clear()
        writer, self._writer = self._writer, None
        if writer is not None:
            conns.append(writer)  # last: closing it checkpoints and removes the WAL

        def close_all() -> None:
            if writer is not None:
                with contextlib.suppress(sqlite3.Error):
                    writer.execute("PRAGMA optimize")
            for conn in conns:
                conn.close()

        await trio.to_thread.run_sync(close_all, limiter=self._limiter)

    # --------------------------------------------------------------- writes

    def _check_writable(self) -> None:
        if self._closing or self._state is _State.CLOSED:
            raise trio.ClosedResourceError("the store is closed")
        if self._state is not _State.RUNNING:
            raise RuntimeError("SqliteStore.run() is not running")

    async def write(self, ops: Sequence[WriteOp]) -> None:
        """Apply ``ops`` atomically; return once committed (see module doc)."""
        work = list(ops)
        for op in work:
            if not isinstance(op, _OP_TYPES):
                raise TypeError(f"not a store write op: {op!r}")
        if not work:
            self._check_writable()
            await trio.lowlevel.checkpoint()
            return
        await self._submit(_Job(work, len(work)))

    async def _submit(self, job: _Job) -> int:
        self._check_writable()
        # No await before the job is queued: concurrent callers that start in
        # the same scheduling round all land in the same transaction.
        if not self._waiting and self._fits(job.weight):
            self._admit_job(job)
        else:
            self._waiting.append(job)
        try:
            await job.done.wait()
        except BaseException:
            if not job.admitted and not job.done.is_set():
                self._waiting.remove(job)
                self._admit()  # it may have been the head blocking smaller jobs
            raise
        if job.error is not None:
            raise job.error
        return job.result

    def _fits(self, weight: int) -> bool:
        return self._pending_ops == 0 or self._pending_ops + weight <= self._max_pending

    def _admit_job(self, job: _Job) -> None:
        job.admitted = True
        self._pending_ops += job.weight
        self._handoff.put(job)

    def _admit(self) -> None:
        while self._waiting and self._fits(self._waiting[0].weight):
            self._admit_job(self._waiting.popleft())

    async def _run_committer(self, process: WriterProcess | None) -> None:
        """Commit batch after batch until stopped and empty, through the writer
        process or (``writer_process=False``) a worker thread. Shielded: an
        admitted job is always committed, and a transaction never abandoned."""
        writer = self._writer
        assert writer is not None
        with trio.CancelScope(shield=True):
            try:
                while (batch := await self._handoff.take()) is not None:
                    results: list[int | Exception]
                    try:
                        if process is None:
                            results, stats = await trio.to_thread.run_sync(
                                _transact,
                                writer,
                                [job.work for job in batch],
                                limiter=self._limiter,
                            )
                        else:
                            results, stats = await _transact_in(process, batch)
                    except Exception as exc:  # a bug in _transact, not a caller's fault
                        log.exception("store commit failed")
                        results, stats = [exc] * len(batch), []
                    self._committed(batch, results, stats)
            finally:
                if process is not None:
                    await process.aclose()

    def _committed(
        self, batch: list[_Job], results: list[int | Exception], stats: list[_Stat]
    ) -> None:
        """In the trio thread: wake the batch's callers, admit waiting jobs."""
        for job, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                job.error = result
            else:
                job.result = result
            job.done.set()
        self._pending_ops -= sum(job.weight for job in batch)
        self._admit()
        if self._on_commit is not None:
            for seconds, ops, callers in stats:
                try:
                    self._on_commit(seconds, ops, callers)
                except Exception:
                    log.exception("on_commit callback failed")

    async def prune(self, older_than_ms: int) -> int:
        """Delete messages with ts < ``older_than_ms`` (and idempotency keys
        as old), ``RETENTION_DELETE_BATCH`` rows per transaction."""
        deleted = await self._prune_table("messages", older_than_ms)
        await self._prune_table("applied_keys", older_than_ms)
        return deleted

    async def prune_events(self, older_than_ms: int) -> int:
        """Delete worker events with ts < ``older_than_ms``, acked or not,
        ``RETENTION_DELETE_BATCH`` rows per transaction."""
        return await self._prune_table("worker_events", older_than_ms)

    async def prune_used_tokens(self, now_s: int) -> int:
        """Forget used single-use tokens that have expired by ``now_s``."""
        return await self._prune_table("used_tokens", now_s)

    async def _prune_table(
        self,
        table: Literal["messages", "applied_keys", "worker_events", "used_tokens"],
        older_than_ms: int,
    ) -> int:
        deleted = 0
        while True:
            step = _PruneStep(table, older_than_ms, RETENTION_DELETE_BATCH)
            n = await self._submit(_Job(step, 1, solo=True))
            deleted += n
            if n < RETENTION_DELETE_BATCH:
                return deleted

    # ---------------------------------------------------------------- reads

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        if self._readers_closed:  # closing holds every slot: do not queue for one
            raise trio.ClosedResourceError("the store is closed")
        async with self._reader_slots:
            if self._readers_closed:
                raise trio.ClosedResourceError("the store is closed")
            if not self._idle_readers:
                raise RuntimeError("SqliteStore is not open")
            conn = self._idle_readers.pop()
            try:
                return await trio.to_thread.run_sync(query, conn, limiter=self._limiter)
            finally:
                self._idle_readers.append(conn)

    async def load_actor(self, conv: str, *, dedup_window: int, keys_window: int) -> ActorSnapshot:
        return await self._read(lambda c: _q_load_actor(c, conv, dedup_window, keys_window))

    async def get_conversation(self, conv: str) -> Conversation | None:
        return await self._read(lambda c: _q_get_conversation(c, conv))

    async def used_tokens(self, now_s: int, limit: int) -> list[tuple[str, int]]:
        def query(conn: sqlite3.Connection) -> list[tuple[str, int]]:
            return [(jti, exp) for jti, exp in conn.execute(_SQL_USED_TOKENS, (now_s, limit))]

        return await self._read(query)

    async def get_members(self, conv: str) -> dict[str, MemberRole]:
        return await self._read(lambda c: _q_get_members(c, conv))

    async def read_page(
        self, conv: str, *, user: str, before: int | None, after: int | None, limit: int
    ) -> PageRead:
        return await self._read(lambda c: _q_read_page(c, conv, user, before, after, limit))

    async def find_open_direct(self, shop: str, customer: str) -> Conversation | None:
        return await self._read(lambda c: _q_find_open_direct(c, shop, customer))

    async def history(
        self, conv: str, *, before: int | None, after: int | None, limit: int
    ) -> tuple[list[Message], bool]:
        return await self._read(lambda c: _q_history(c, conv, before, after, limit))

    async def list_conversations(
        self,
        scope: Scope,
        *,
        state: ConvState | None,
        updated_before: int | None,
        limit: int,
        before_id: str | None = None,
    ) -> tuple[list[Conversation], bool]:
        return await self._read(
            lambda c: _q_list_conversations(c, scope, state, updated_before, limit, before_id)
        )

    async def read_point(self, conv: str, user: str) -> int:
        return await self._read(lambda c: _q_read_point(c, conv, user))

    async def list_agents(self, shop: str) -> list[AgentRecord]:
        return await self._read(lambda c: _q_list_agents(c, shop))

    async def shop_exists(self, shop: str) -> bool:
        return await self._read(
            lambda c: c.execute(SQL_SHOP_EXISTS, (shop,)).fetchone() is not None
        )

    async def list_shops(self) -> list[str]:
        return await self._read(lambda c: [str(n) for (n,) in c.execute(SQL_LIST_SHOPS)])

    async def shop_users(self, shop: str, users: Sequence[str]) -> set[str]:
        return await self._read(lambda c: _q_shop_users(c, shop, users))

    async def is_shop_agent(self, shop: str, user: str) -> bool:
        return await self._read(lambda c: _q_shop_agent(c, shop, user))

    async def count_open_direct(self, customer: str, limit: int) -> int:
        return await self._read(
            lambda c: int(c.execute(SQL_COUNT_OPEN_DIRECT, (customer, limit)).fetchone()[0])
        )

    async def worker_cursor(self, plugin: str) -> int | None:
        return await self._read(lambda c: _q_worker_cursor(c, plugin))

    async def worker_plugins(self) -> list[str]:
        return await self._read(_q_worker_plugins)

    async def last_event_id(self) -> int:
        """The highest event id ever committed (0 if none), even if pruned."""
        return await self._read(_q_last_event_id)

    async def events_after(self, after: int, limit: int) -> list[StoredEvent]:
        return await self._read(lambda c: _q_events_after(c, after, limit))
