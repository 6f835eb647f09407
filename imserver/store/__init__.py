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
    "export_conversation",
    "export_shop",
    "prepare_database",
]
