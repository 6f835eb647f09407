"""The storage interface the rest of the server is written against.

Theory of operation
-------------------
Conversation actors are the only writers of their conversation's rows. They
hand the store a list of write operations and ``await store.write(ops)``,
which returns once the operations are durable (committed to disk). The store
is free to merge the operations of many concurrent callers into one
transaction (group commit) and does; callers see each call as atomic and
calls from one task are applied in call order.

Reads never block writes: they run on separate read-only connections.

An engine (SQLite embedded, later Redis+SQL in cluster mode) implements
``Store``; nothing outside ``imserver.store`` imports an engine module except
the server's wiring.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

import msgspec
import trio

from protocol import (
    AgentStatus,
    Conversation,
    ConvState,
    MemberRole,
    Message,
    Role,
    WorkerEvent,
    WorkerEventKind,
)

# ---------------------------------------------------------------- write ops


class PutConversation(msgspec.Struct, kw_only=True, tag="conversation", gc=False):
    """Insert or replace the conversation row (per-user fields read_seq/unread ignored)."""

    conversation: Conversation


class PutMessage(msgspec.Struct, kw_only=True, tag="message", gc=False):
    """Insert a message. Also raises the conversation's last_seq and updated_at
    to the message's seq and ts (never lowers them)."""

    message: Message


class SetMembers(msgspec.Struct, kw_only=True, tag="members", gc=False):
    conv: str
    add: dict[str, MemberRole] = {}
    remove: list[str] = []


class SetReadPoint(msgspec.Struct, kw_only=True, tag="read", gc=False):
    """Raise ``user``'s read point in ``conv`` to ``seq`` (never lowers it)."""

    conv: str
    user: str
    seq: int


class MarkRecalled(msgspec.Struct, kw_only=True, tag="recalled", gc=False):
    """Message ``seq`` was recalled: its body is erased (history shows recalled=True)."""

    conv: str
    seq: int


class PutAgent(msgspec.Struct, kw_only=True, tag="agent", gc=False):
    shop: str
    agent: str
    status: AgentStatus
    ts: int


class PutAppliedKey(msgspec.Struct, kw_only=True, tag="applied_key", gc=False):
    """An idempotency key of a conversation update, remembered for dedup."""

    conv: str
    key: str
    ts: int


class PutEvent(msgspec.Struct, kw_only=True, tag="event", gc=False):
    """Append a worker event to the log. The store numbers events in commit
    order and writes the number into ``id`` before ``write`` returns."""

    shard: int
    kind: WorkerEventKind
    event: WorkerEvent
    id: int = 0

    def stored(self) -> StoredEvent:
        return StoredEvent(id=self.id, shard=self.shard, kind=self.kind, event=self.event)


class PutCursor(msgspec.Struct, kw_only=True, tag="cursor", gc=False):
    """A worker plugin has acked every event up to ``event_id``."""

    plugin: str
    event_id: int


class PutUsedToken(msgspec.Struct, kw_only=True, tag="used_token", gc=False):
    """A single-use token was accepted: refuse it again until ``exp`` (unix seconds)."""

    jti: str
    exp: int


class PutShop(msgspec.Struct, kw_only=True, tag="shop", gc=False):
    """Register a shop (a tenant); registering it again changes nothing."""

    name: str
    ts: int


class PutStaff(msgspec.Struct, kw_only=True, tag="staff", gc=False):
    """``user`` logged in as staff (``role``) of ``shop``: from now on one of its
    agents (an assignee) and one of its users (presence, plugin notices)."""

    shop: str
    user: str
    role: Role
    ts: int


WriteOp = (
    PutConversation
    | PutMessage
    | SetMembers
    | SetReadPoint
    | MarkRecalled
    | PutAgent
    | PutAppliedKey
    | PutEvent
    | PutCursor
    | PutUsedToken
    | PutShop
    | PutStaff
)


class StoredEvent(msgspec.Struct, kw_only=True, frozen=True):
    """A worker event as logged: ``event`` without its id and attempt."""

    id: int
    shard: int
    kind: WorkerEventKind
    event: WorkerEvent

    def frame(self, *, attempt: int) -> WorkerEvent:
        return msgspec.structs.replace(self.event, event_id=self.id, attempt=attempt)


# ------------------------------------------------------------- read records


class ActorSnapshot(msgspec.Struct, kw_only=True):
    """What a conversation actor loads when it (re)starts."""

    conversation: Conversation | None
    """None when the conversation does not exist."""
    members: dict[str, MemberRole]
    recent_cmids: dict[tuple[str, str], tuple[int, int]]
    """(sender, cmid) -> (seq, ts) for the last ``dedup_window`` messages."""
    applied_keys: set[str]
    """The last ``keys_window`` idempotency keys applied to the conversation."""


class PageRead(msgspec.Struct, kw_only=True):
    """One read for a history page or a resume batch: the conversation (None if
    it does not exist), the reader's membership, and the messages."""

    conversation: Conversation | None
    member_role: MemberRole | None
    messages: list[Message]
    more: bool


class ScopeKind(enum.Enum):
    CUSTOMER = "customer"
    """Conversations where ``customer == user`` or ``user`` is a member."""
    AGENT = "agent"
    """Conversations of ``shop`` that are assigned to ``user``, or in state bot or
    queued (open to any agent of the shop), or groups where ``user`` is a member."""
    SHOP = "shop"
    """Every conversation of ``shop`` (supervisors, shop workers)."""
    ALL = "all"
    """Every conversation (admins, global workers)."""


class Scope(msgspec.Struct, kw_only=True, frozen=True):
    kind: ScopeKind
    user: str
    shop: str = ""

    @classmethod
    def for_role(cls, role: Role, user: str, shop: str) -> Scope:
        if role is Role.CUSTOMER:
            return cls(kind=ScopeKind.CUSTOMER, user=user)
        if role is Role.AGENT:
            return cls(kind=ScopeKind.AGENT, user=user, shop=shop)
        # Only the explicit "*" is every shop: an empty shop (a token minted without
        # one) is a shop scope that matches nothing, never all of them.
        if shop == "*":
            return cls(kind=ScopeKind.ALL, user=user)
        return cls(kind=ScopeKind.SHOP, user=user, shop=shop)


class AgentRecord(msgspec.Struct, kw_only=True):
    shop: str
    agent: str
    status: AgentStatus
    ts: int


class Store(Protocol):
    """See the module docstring. All methods are trio-async and cancel-safe
    in the sense that a cancelled ``write`` may or may not have committed."""

    async def open(self) -> None:
        """Create or migrate the schema and open the connections (idempotent).
        Reads work after it; writes need ``run()``, which calls it."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open, report started, then run the committer until ``aclose()`` or
        cancellation; on exit commit everything pending and close. Start it
        with ``await nursery.start(store.run)`` (a trio task needs a nursery,
        which ``open()`` does not have)."""

    async def aclose(self) -> None:
        """Refuse new writes, commit everything pending, then close all
        connections (waits for ``run()`` to finish when it is running)."""

    async def write(self, ops: Sequence[WriteOp]) -> None:
        """Apply ``ops`` atomically; return once durable."""

    async def load_actor(
        self, conv: str, *, dedup_window: int, keys_window: int
    ) -> ActorSnapshot: ...

    async def used_tokens(self, now_s: int, limit: int) -> list[tuple[str, int]]:
        """(jti, exp) of used single-use tokens not yet expired, latest expiry first."""

    async def get_conversation(self, conv: str) -> Conversation | None: ...

    async def get_members(self, conv: str) -> dict[str, MemberRole]: ...

    async def read_page(
        self, conv: str, *, user: str, before: int | None, after: int | None, limit: int
    ) -> PageRead:
        """``history`` plus the conversation and ``user``'s membership, in one read."""

    async def find_open_direct(self, shop: str, customer: str) -> Conversation | None:
        """The customer's direct conversation with ``shop`` that is not closed, if any."""

    async def history(
        self, conv: str, *, before: int | None, after: int | None, limit: int
    ) -> tuple[list[Message], bool]:
        """Messages with after < seq < before in ascending seq order, and whether
        more exist in the paging direction. With ``before`` only (or neither),
        the newest ``limit`` below it; with ``after``, the oldest ``limit`` above it."""

    async def list_conversations(
        self,
        scope: Scope,
        *,
        state: ConvState | None,
        updated_before: int | None,
        limit: int,
        before_id: str | None = None,
    ) -> tuple[list[Conversation], bool]:
        """Conversations visible in ``scope``, most recently updated first (then by id,
        descending), with ``read_seq`` and ``unread`` filled in for ``scope.user``. A
        page starts below the key (``updated_before``, ``before_id``): pass the last
        conversation's updated_at and id to get the next page."""

    async def read_point(self, conv: str, user: str) -> int: ...

    async def list_agents(self, shop: str) -> list[AgentRecord]: ...

    async def shop_exists(self, shop: str) -> bool:
        """Whether ``shop`` is registered."""

    async def list_shops(self) -> list[str]:
        """Every registered shop, by name."""

    async def shop_users(self, shop: str, users: Sequence[str]) -> set[str]:
        """Those of ``users`` who belong to ``shop``: its staff (logged in, or with
        an agent status) and its customers (a direct conversation with it; being a
        group member makes no one a user of the shop)."""

    async def is_shop_agent(self, shop: str, user: str) -> bool:
        """Whether ``user`` is an agent (or supervisor) of ``shop``: logged in as
        one, or has an agent status there."""

    async def count_open_direct(self, customer: str, limit: int) -> int:
        """How many direct conversations of ``customer`` are not closed (counted up
        to ``limit``)."""

    async def worker_cursor(self, plugin: str) -> int | None:
        """The saved watermark of ``plugin``, or None if it never saved one."""

    async def worker_plugins(self) -> list[str]:
        """Every plugin that ever saved a cursor (it will come back for its events)."""

    async def last_event_id(self) -> int:
        """The highest event id in the log (0 if empty)."""

    async def events_after(self, after: int, limit: int) -> list[StoredEvent]:
        """Logged events with id > ``after``, ascending, at most ``limit``."""

    async def prune_events(self, older_than_ms: int) -> int:
        """Delete worker events with ts < older_than_ms; return how many."""

    async def prune(self, older_than_ms: int) -> int:
        """Delete messages with ts < older_than_ms; return how many."""
