"""SqliteStore read path and write semantics: history paging, conversation
lists per scope, actor snapshots, recall, read points, agents, retention, and
the query plans behind them."""

from __future__ import annotations

import itertools
import re
import sqlite3
from typing import Any

import pytest

from imserver.limits import RETENTION_DELETE_BATCH
from imserver.store import (
    MarkRecalled,
    PutAgent,
    PutAppliedKey,
    PutConversation,
    Scope,
    ScopeKind,
    SetMembers,
    SetReadPoint,
    SqliteStore,
    WriteOp,
    _export,
    _sqlite,
)
from imserver.store._schema import migrate
from protocol import (
    AgentStatus,
    ConvKind,
    ConvState,
    ImageBody,
    MemberRole,
    Role,
    TextBody,
)

from .conftest import Commits, StoreFactory, conversation, put_conv, put_msg

# ------------------------------------------------------------------ history

SEQS = [1, 2, 3, 5, 6, 8, 9, 10, 11, 12]  # gaps, as after retention or lost seqs


def _model(before: int | None, after: int | None, limit: int) -> tuple[list[int], bool]:
    candidates = [
        s for s in SEQS if (after is None or s > after) and (before is None or s < before)
    ]
    page = candidates[-limit:] if after is None else candidates[:limit]
    return page, len(candidates) > limit


@pytest.fixture
async def history_store(store: SqliteStore) -> SqliteStore:
    await store.write([put_conv("h"), *(put_msg("h", s) for s in SEQS), put_conv("empty")])
    return store


async def test_history_matches_the_documented_paging(history_store: SqliteStore) -> None:
    bounds: list[int | None] = [None, *range(0, 15)]
    for before, after, limit in itertools.product(bounds, bounds, range(1, 5)):
        page, more = await history_store.history("h", before=before, after=after, limit=limit)
        assert ([m.seq for m in page], more) == _model(before, after, limit), (before, after, limit)


async def test_history_edges(history_store: SqliteStore) -> None:
    store = history_store

    async def seqs(**kw: Any) -> tuple[list[int], bool]:
        page, more = await store.history("h", **kw)
        return [m.seq for m in page], more

    # neither bound: the newest page, older ones exist
    assert await seqs(before=None, after=None, limit=3) == ([10, 11, 12], True)
    # paging back with before = first seq of the page
    assert await seqs(before=10, after=None, limit=3) == ([6, 8, 9], True)
    assert await seqs(before=6, after=None, limit=3) == ([2, 3, 5], True)
    assert await seqs(before=2, after=None, limit=3) == ([1], False)
    assert await seqs(before=1, after=None, limit=3) == ([], False)
    # paging forward with after = last seq of the page
    assert await seqs(before=None, after=0, limit=4) == ([1, 2, 3, 5], True)
    assert await seqs(before=None, after=5, limit=4) == ([6, 8, 9, 10], True)
    assert await seqs(before=None, after=10, limit=4) == ([11, 12], False)
    assert await seqs(before=None, after=12, limit=4) == ([], False)
    # both: a window, oldest first, has_more within the window
    assert await seqs(before=9, after=2, limit=2) == ([3, 5], True)
    assert await seqs(before=9, after=2, limit=3) == ([3, 5, 6], True)
    assert await seqs(before=9, after=2, limit=4) == ([3, 5, 6, 8], False)
    assert await seqs(before=3, after=3, limit=5) == ([], False)
    # a page exactly as large as what is left says no more
    assert await seqs(before=None, after=None, limit=10) == (SEQS, False)
    assert await seqs(before=None, after=None, limit=200) == (SEQS, False)
    # unknown or empty conversation
    assert await store.history("empty", before=None, after=None, limit=5) == ([], False)
    assert await store.history("nope", before=None, after=None, limit=5) == ([], False)


async def test_history_returns_full_messages(store: SqliteStore) -> None:
    image = ImageBody(url="https://img/x.png", hash="h", size=10, mime="image/png", width=3)
    await store.write(
        [
            put_conv("c"),
            put_msg("c", 1, body=image, sender="agent-1", role=Role.AGENT, cmid="m-1", ts=77),
        ]
    )
    [msg], _ = await store.history("c", before=None, after=None, limit=1)
    assert msg.conv == "c"
    assert msg.sender == "agent-1"
    assert msg.sender_role is Role.AGENT
    assert msg.cmid == "m-1"
    assert msg.ts == 77
    assert msg.body == image
    assert not msg.recalled


async def test_recall_erases_the_body(store: SqliteStore, raw: sqlite3.Connection) -> None:
    image = ImageBody(url="https://img/x.png", hash="h", size=10, mime="image/png")
    await store.write([put_conv("c"), put_msg("c", 1, body=image), put_msg("c", 2)])
    await store.write([MarkRecalled(conv="c", seq=1), MarkRecalled(conv="c", seq=99)])
    page, _ = await store.history("c", before=None, after=None, limit=10)
    assert page[0].recalled
    assert page[0].body == TextBody(text="")
    assert not page[1].recalled
    assert page[1].body == TextBody(text="hello 2")
    # the content is gone from the file, the kind is kept for audits
    assert raw.execute("SELECT kind, body, recalled FROM messages WHERE seq = 1").fetchone() == (
        "image",
        b"",
        1,
    )


# ------------------------------------------------------- conversation lists

S1, S2 = "s1", "s2"


@pytest.fixture
async def lists_store(store: SqliteStore) -> SqliteStore:
    def direct(
        cid: str, shop: str, customer: str, state: ConvState, ts: int, agent: str | None = None
    ) -> PutConversation:
        return put_conv(cid, shop=shop, customer=customer, state=state, agent=agent, updated_at=ts)

    def group(cid: str, shop: str, ts: int) -> PutConversation:
        return put_conv(
            cid,
            shop=shop,
            kind=ConvKind.GROUP,
            customer=None,
            state=ConvState.ASSIGNED,
            updated_at=ts,
        )

    ops: list[WriteOp] = [
        direct("d1", S1, "cu1", ConvState.BOT, 100),
        direct("d2", S1, "cu1", ConvState.ASSIGNED, 200, agent="a1"),
        direct("d3", S1, "cu2", ConvState.QUEUED, 300),
        direct("d4", S1, "cu2", ConvState.CLOSED, 400, agent="a1"),
        direct("d5", S1, "cu3", ConvState.ASSIGNED, 500, agent="a2"),
        direct("d6", S2, "cu1", ConvState.BOT, 600),
        group("g1", S1, 700),
        group("g2", S1, 800),
        group("g3", S2, 900),
        SetMembers(conv="g1", add={"a1": MemberRole.OWNER, "cu1": MemberRole.MEMBER}),
        SetMembers(conv="g2", add={"a2": MemberRole.OWNER}),
        SetMembers(conv="g3", add={"a1": MemberRole.OWNER}),
        # d2 has 5 messages (ts below updated_at: the order above is unchanged)
        *(put_msg("d2", seq, ts=50) for seq in range(1, 6)),
        SetReadPoint(conv="d2", user="cu1", seq=3),
        SetReadPoint(conv="d1", user="cu1", seq=7),  # beyond last_seq: unread stays 0
    ]
    await store.write(ops)
    return store


async def _ids(
    store: SqliteStore,
    scope: Scope,
    *,
    state: ConvState | None = None,
    before: int | None = None,
    limit: int = 50,
) -> tuple[list[str], bool]:
    convs, more = await store.list_conversations(
        scope, state=state, updated_before=before, limit=limit
    )
    return [c.id for c in convs], more


async def test_list_customer_scope(lists_store: SqliteStore) -> None:
    scope = Scope(kind=ScopeKind.CUSTOMER, user="cu1")
    assert await _ids(lists_store, scope) == (["g1", "d6", "d2", "d1"], False)
    assert await _ids(lists_store, scope, state=ConvState.BOT) == (["d6", "d1"], False)
    assert await _ids(lists_store, scope, limit=2) == (["g1", "d6"], True)
    assert await _ids(lists_store, scope, before=600, limit=2) == (["d2", "d1"], False)
    assert await _ids(lists_store, Scope(kind=ScopeKind.CUSTOMER, user="nobody")) == ([], False)


async def test_list_agent_scope(lists_store: SqliteStore) -> None:
    scope = Scope(kind=ScopeKind.AGENT, user="a1", shop=S1)
    # own (d2, and d4 though closed), the shop's bot/queued ones (d1, d3),
    # groups of this shop they belong to (g1, not g3 of another shop);
    # not d5 (another agent's) nor g2 (not a member)
    assert await _ids(lists_store, scope) == (["g1", "d4", "d3", "d2", "d1"], False)
    assert await _ids(lists_store, scope, limit=2) == (["g1", "d4"], True)
    assert await _ids(lists_store, scope, before=400, limit=2) == (["d3", "d2"], True)
    assert await _ids(lists_store, scope, before=200, limit=2) == (["d1"], False)
    assert await _ids(lists_store, scope, state=ConvState.QUEUED) == (["d3"], False)
    assert await _ids(lists_store, scope, state=ConvState.CLOSED) == (["d4"], False)
    other = Scope(kind=ScopeKind.AGENT, user="a2", shop=S1)
    assert await _ids(lists_store, other) == (["g2", "d5", "d3", "d1"], False)


async def test_list_shop_and_all_scopes(lists_store: SqliteStore) -> None:
    shop = Scope(kind=ScopeKind.SHOP, user="sup", shop=S1)
    assert await _ids(lists_store, shop) == (["g2", "g1", "d5", "d4", "d3", "d2", "d1"], False)
    assert await _ids(lists_store, shop, limit=3) == (["g2", "g1", "d5"], True)
    assert await _ids(lists_store, shop, before=500, limit=3) == (["d4", "d3", "d2"], True)
    assert await _ids(lists_store, shop, before=200, limit=3) == (["d1"], False)
    assert await _ids(lists_store, shop, state=ConvState.BOT) == (["d1"], False)
    everything = Scope(kind=ScopeKind.ALL, user="admin")
    ids, more = await _ids(lists_store, everything)
    assert ids == ["g3", "g2", "g1", "d6", "d5", "d4", "d3", "d2", "d1"]
    assert not more
    assert await _ids(lists_store, everything, state=ConvState.BOT) == (["d6", "d1"], False)
    assert await _ids(lists_store, everything, limit=9) == (ids, False)
    assert await _ids(lists_store, everything, limit=8) == (ids[:8], True)


async def test_list_fills_read_seq_and_unread_for_the_scope_user(lists_store: SqliteStore) -> None:
    convs, _ = await lists_store.list_conversations(
        Scope(kind=ScopeKind.CUSTOMER, user="cu1"), state=None, updated_before=None, limit=50
    )
    by_id = {c.id: c for c in convs}
    assert (by_id["d2"].last_seq, by_id["d2"].read_seq, by_id["d2"].unread) == (5, 3, 2)
    assert (by_id["d1"].last_seq, by_id["d1"].read_seq, by_id["d1"].unread) == (0, 7, 0)
    assert (by_id["g1"].read_seq, by_id["g1"].unread) == (0, 0)
    convs, _ = await lists_store.list_conversations(
        Scope(kind=ScopeKind.SHOP, user="a1", shop=S1), state=None, updated_before=None, limit=50
    )
    d2 = next(c for c in convs if c.id == "d2")
    assert (d2.read_seq, d2.unread) == (0, 5)  # a1 has read nothing
    # the non-per-user view leaves them at zero
    got = await lists_store.get_conversation("d2")
    assert got is not None
    assert (got.last_seq, got.read_seq, got.unread) == (5, 0, 0)


async def test_list_orders_ties_by_id(store: SqliteStore) -> None:
    await store.write([put_conv(f"t{i}", updated_at=500) for i in range(3)])
    scope = Scope(kind=ScopeKind.SHOP, user="x", shop="shop-1")
    assert await _ids(store, scope) == (["t2", "t1", "t0"], False)


async def test_conversation_fields_round_trip(store: SqliteStore) -> None:
    conv = conversation(
        "c", tags=["vip", "退货"], title="标题", agent="a1", state=ConvState.ASSIGNED
    )
    await store.write([PutConversation(conversation=conv)])
    assert await store.get_conversation("c") == conv
    assert await store.get_conversation("missing") is None


async def test_put_conversation_never_lowers_last_seq_or_updated_at(store: SqliteStore) -> None:
    await store.write([put_conv("c", updated_at=100), put_msg("c", 3, ts=500)])
    stale = conversation("c", state=ConvState.ASSIGNED, agent="a1", updated_at=200, last_seq=0)
    await store.write([PutConversation(conversation=stale)])
    got = await store.get_conversation("c")
    assert got is not None
    assert (got.state, got.agent, got.last_seq, got.updated_at) == (
        ConvState.ASSIGNED,
        "a1",
        3,
        500,
    )
    # PutMessage: MAX semantics too (an older message does not lower them)
    await store.write([put_msg("c", 2, ts=10)])
    got = await store.get_conversation("c")
    assert got is not None
    assert (got.last_seq, got.updated_at) == (3, 500)


async def test_find_open_direct_ignores_closed_and_groups(store: SqliteStore) -> None:
    await store.write(
        [
            put_conv("old", customer="cu", state=ConvState.CLOSED, updated_at=900),
            put_conv("grp", customer="cu", kind=ConvKind.GROUP, state=ConvState.BOT),
            put_conv("other-shop", shop="elsewhere", customer="cu"),
        ]
    )
    assert await store.find_open_direct("shop-1", "cu") is None
    await store.write([put_conv("new", customer="cu", state=ConvState.QUEUED, updated_at=50)])
    found = await store.find_open_direct("shop-1", "cu")
    assert found is not None
    assert found.id == "new"
    await store.write([put_conv("new", customer="cu", state=ConvState.CLOSED, updated_at=60)])
    assert await store.find_open_direct("shop-1", "cu") is None


# ------------------------------------------------------------ actor loading


async def test_load_actor_windows(store: SqliteStore) -> None:
    ops: list[WriteOp] = [put_conv("c")]
    ops += [
        put_msg("c", seq, sender=f"u{seq % 2}", cmid=f"m{seq}", ts=seq * 10) for seq in range(1, 31)
    ]
    ops += [
        PutAppliedKey(conv="c", key=f"k{i}", ts=7) for i in range(1, 16)
    ]  # same ts: insertion order decides
    ops += [PutAppliedKey(conv="c", key="k3", ts=9)]  # a repeat is a no-op
    ops += [SetMembers(conv="c", add={"u0": MemberRole.MEMBER, "u1": MemberRole.ADMIN})]
    await store.write(ops)
    snap = await store.load_actor("c", dedup_window=10, keys_window=5)
    assert snap.conversation is not None
    assert snap.conversation.last_seq == 30
    assert snap.members == {"u0": MemberRole.MEMBER, "u1": MemberRole.ADMIN}
    assert snap.recent_cmids == {
        (f"u{seq % 2}", f"m{seq}"): (seq, seq * 10) for seq in range(21, 31)
    }
    assert snap.applied_keys == {f"k{i}" for i in range(11, 16)}
    whole = await store.load_actor("c", dedup_window=1000, keys_window=1000)
    assert len(whole.recent_cmids) == 30
    assert len(whole.applied_keys) == 15
    none = await store.load_actor("c", dedup_window=0, keys_window=0)
    assert none.recent_cmids == {}
    assert none.applied_keys == set()
    missing = await store.load_actor("missing", dedup_window=10, keys_window=10)
    assert missing.conversation is None
    assert missing.members == {}
    assert missing.recent_cmids == {}
    assert missing.applied_keys == set()


async def test_members_add_update_remove(store: SqliteStore) -> None:
    await store.write(
        [
            put_conv("g", kind=ConvKind.GROUP, customer=None),
            SetMembers(conv="g", add={"a": MemberRole.OWNER, "b": MemberRole.MEMBER}),
        ]
    )
    await store.write(
        [
            SetMembers(
                conv="g", add={"b": MemberRole.ADMIN, "c": MemberRole.MEMBER}, remove=["a", "zz"]
            )
        ]
    )
    assert await store.get_members("g") == {"b": MemberRole.ADMIN, "c": MemberRole.MEMBER}
    assert await store.get_members("missing") == {}


async def test_read_points_never_go_down(store: SqliteStore) -> None:
    await store.write([put_conv("c"), SetReadPoint(conv="c", user="u", seq=5)])
    await store.write([SetReadPoint(conv="c", user="u", seq=3)])
    assert await store.read_point("c", "u") == 5
    await store.write(
        [SetReadPoint(conv="c", user="u", seq=7), SetReadPoint(conv="c", user="v", seq=1)]
    )
    assert await store.read_point("c", "u") == 7
    assert await store.read_point("c", "v") == 1
    assert await store.read_point("c", "nobody") == 0


async def test_agents_latest_status_wins(store: SqliteStore) -> None:
    await store.write(
        [
            PutAgent(shop="s", agent="b", status=AgentStatus.ONLINE, ts=10),
            PutAgent(shop="s", agent="a", status=AgentStatus.BUSY, ts=10),
            PutAgent(shop="t", agent="c", status=AgentStatus.AWAY, ts=10),
        ]
    )
    await store.write([PutAgent(shop="s", agent="b", status=AgentStatus.OFFLINE, ts=20)])
    await store.write(
        [PutAgent(shop="s", agent="b", status=AgentStatus.AWAY, ts=15)]
    )  # late, older
    agents = await store.list_agents("s")
    assert [(a.agent, a.status, a.ts) for a in agents] == [
        ("a", AgentStatus.BUSY, 10),
        ("b", AgentStatus.OFFLINE, 20),
    ]
    assert await store.list_agents("nobody") == []


# ---------------------------------------------------------------- retention


async def test_prune_deletes_in_bounded_batches(
    make_store: StoreFactory, raw: sqlite3.Connection
) -> None:
    commits = Commits()
    store = await make_store(on_commit=commits)
    old = 2 * RETENTION_DELETE_BATCH + 123
    ops: list[WriteOp] = [put_conv("a"), put_conv("b")]
    ops += [put_msg("a" if i % 2 else "b", i, ts=i) for i in range(1, old + 1)]
    ops += [put_msg("a", old + i, ts=1_000_000 + i) for i in range(1, 11)]
    ops += [
        PutAppliedKey(conv="a", key="old", ts=5),
        PutAppliedKey(conv="a", key="new", ts=2_000_000),
    ]
    await store.write(ops)
    commits.clear()
    assert await store.prune(1_000_000) == old
    # messages: full batches then the rest; then one pass over the keys
    assert commits.ops == [RETENTION_DELETE_BATCH, RETENTION_DELETE_BATCH, 123, 1]
    assert set(commits.callers) == {1}
    assert raw.execute("SELECT COUNT(*), MIN(ts) FROM messages").fetchone() == (10, 1_000_001)
    assert [k for (k,) in raw.execute("SELECT key FROM applied_keys")] == ["new"]
    # conversations keep their counters (seqs are never reused)
    conv = await store.get_conversation("a")
    assert conv is not None
    assert conv.last_seq == old + 10
    assert await store.prune(1_000_000) == 0


# ------------------------------------------------------------- query plans

_ALLOWED_SCANS = re.compile(r"^SCAN (p|\(subquery-\d+\))$")


def _plan(conn: sqlite3.Connection, sql: str, params: Any) -> list[str]:
    return [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]


@pytest.fixture
def planner() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrate(conn)
    return conn


def test_every_query_is_index_driven(planner: sqlite3.Connection) -> None:
    """No full table scan anywhere, and no sort of more than a page."""
    list_params = {"user": "u", "shop": "s", "state": "bot", "before": 1, "before_id": "", "n": 51}
    queries: list[tuple[str, Any]] = [(sql, list_params) for sql in _sqlite._LIST_SQL.values()]
    queries += [
        (_sqlite.SQL_HISTORY_BEFORE, ("c", 10, 51)),
        (_sqlite.SQL_HISTORY_AFTER, ("c", 1, 10, 51)),
        (_sqlite.SQL_GET_CONVERSATION, ("c",)),
        (_sqlite.SQL_GET_MEMBERS, ("c",)),
        (_sqlite.SQL_RECENT_CMIDS, ("c", 10)),
        (_sqlite.SQL_RECENT_KEYS, ("c", 10)),
        (_sqlite.SQL_FIND_OPEN_DIRECT, ("s", "c")),
        (_sqlite.SQL_READ_POINT, ("c", "u")),
        (_sqlite.SQL_LIST_AGENTS, ("s",)),
        (_sqlite._SQL_PRUNE["messages"], (1, 10)),
        (_sqlite._SQL_PRUNE["applied_keys"], (1, 10)),
        (_export.SQL_EXPORT_CONVERSATION, ("c",)),
        (_export.SQL_EXPORT_SHOP, {"shop": "s", "since": 0}),
    ]
    for sql, params in queries:
        for line in _plan(planner, sql, params):
            if line.startswith("SCAN"):
                assert _ALLOWED_SCANS.match(line), (line, sql)
    # streams: never a sort
    for sql, params in queries[len(_sqlite._LIST_SQL) :]:
        if "LIMIT 1" not in sql:
            assert not any("TEMP B-TREE" in line for line in _plan(planner, sql, params)), sql


@pytest.mark.parametrize(
    ("kind", "with_state", "indexes"),
    [
        (ScopeKind.CUSTOMER, False, {"conv_by_customer", "members_by_user"}),
        (ScopeKind.CUSTOMER, True, {"conv_by_customer", "members_by_user"}),
        (ScopeKind.AGENT, False, {"conv_by_shop_agent", "conv_by_shop_state", "members_by_user"}),
        (ScopeKind.AGENT, True, {"conv_by_shop_agent", "conv_by_shop_state", "members_by_user"}),
        (ScopeKind.SHOP, False, {"conv_by_shop"}),
        (ScopeKind.SHOP, True, {"conv_by_shop_state"}),
        (ScopeKind.ALL, False, {"conv_by_updated"}),
        (ScopeKind.ALL, True, {"conv_by_state"}),
    ],
)
def test_list_plans_use_the_page_order_indexes(
    planner: sqlite3.Connection, kind: ScopeKind, with_state: bool, indexes: set[str]
) -> None:
    params = {"user": "u", "shop": "s", "state": "bot", "before": 1, "before_id": "", "n": 51}
    plan = " ".join(_plan(planner, _sqlite._LIST_SQL[kind, with_state], params))
    used = set(re.findall(r"INDEX (\w+)", plan))
    assert used == indexes
    # members drive the membership branches (not a walk over conversations)
    if "members_by_user" in indexes:
        assert "SEARCH m USING COVERING INDEX members_by_user (user=?)" in plan
