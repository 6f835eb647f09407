"""Shard queue and conversation actors: the single-writer core."""

from ._actor import ConversationActor, customer_view
from ._commands import (
    AnyCommand,
    CreateGroupCmd,
    DeliveredCmd,
    GetCmd,
    MembersCmd,
    OpenDirectCmd,
    ReadCmd,
    RecallCmd,
    ReplyTo,
    SendCmd,
    TypingCmd,
    UpdateCmd,
)
from ._queue import LocalShards, ShardQueue, shard_of

__all__ = [
    "AnyCommand",
    "ConversationActor",
    "CreateGroupCmd",
    "DeliveredCmd",
    "GetCmd",
    "LocalShards",
    "MembersCmd",
    "OpenDirectCmd",
    "ReadCmd",
    "RecallCmd",
    "ReplyTo",
    "SendCmd",
    "ShardQueue",
    "TypingCmd",
    "UpdateCmd",
    "customer_view",
    "shard_of",
]
