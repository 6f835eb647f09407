"""Durable storage of conversations, messages, members, read points, agents
and the worker event log.

``Store`` (in ``_base``) is the interface the server is written against;
``SqliteStore`` is the embedded engine; ``export_conversation`` and
``export_shop`` dump messages to JSONL or CSV for the CLI.
"""

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
    Store,
    StoredEvent,
    WriteOp,
)
from ._export import ExportFormat, export_conversation, export_shop
from ._health import WRITER_DEAD, DatabaseCorrupt, WatchedSqliteStore, prepare_database
from ._schema import SCHEMA_VERSION, SchemaError
from ._shops import add_shops, read_shops
from ._sqlite import SqliteStore

__all__ = [
    "SCHEMA_VERSION",
    "WRITER_DEAD",
    "ActorSnapshot",
    "AgentRecord",
    "DatabaseCorrupt",
    "ExportFormat",
    "MarkRecalled",
    "PageRead",
    "PutAgent",
    "PutAppliedKey",
    "PutConversation",
    "PutCursor",
    "PutEvent",
    "PutMessage",
    "PutShop",
    "PutStaff",
    "PutUsedToken",
    "SchemaError",
    "Scope",
    "ScopeKind",
    "SetMembers",
    "SetReadPoint",
    "SqliteStore",
    "Store",
    "StoredEvent",
    "WatchedSqliteStore",
    "WriteOp",
    "add_shops",
    "export_conversation",
    "export_shop",
    "prepare_database",
    "read_shops",
]
