"""Commands that travel through the shard queue to a conversation actor.

Every command names its conversation (the shard key), who sent it, and where
the one reply goes (``ReplyTo``: a session id and request id, which a cluster
engine can route to another process). Notices have no reply address.
"""

from __future__ import annotations

import msgspec

from protocol import AnyBody, Channel, ConvState, MemberRole

from ..policy import Identity


class ReplyTo(msgspec.Struct, frozen=True, gc=False):
    session: str
    request: int


class Command(msgspec.Struct, kw_only=True, gc=False):
    conv: str
    who: Identity
    reply: ReplyTo | None = None


class SendCmd(Command, tag="send"):
    cmid: str
    body: AnyBody


class RecallCmd(Command, tag="recall"):
    seq: int


class ReadCmd(Command, tag="read"):
    seq: int


class DeliveredCmd(Command, tag="delivered"):
    seq: int


class TypingCmd(Command, tag="typing"):
    pass


class GetCmd(Command, tag="get"):
    pass


class OpenDirectCmd(Command, tag="open"):
    shop: str
    channel: Channel


class CreateGroupCmd(Command, tag="create_group"):
    shop: str
    title: str
    members: list[str]


class MembersCmd(Command, tag="members"):
    add: list[str]
    remove: list[str]
    role: MemberRole


class UpdateCmd(Command, tag="update"):
    state: ConvState | None = None
    agent: str | None = None
    priority: int | None = None
    tags_add: list[str] = []
    tags_remove: list[str] = []
    note: str = ""
    key: str = ""
    if_state: ConvState | None = None
    if_agent: str | None = None


AnyCommand = (
    SendCmd
    | RecallCmd
    | ReadCmd
    | DeliveredCmd
    | TypingCmd
    | GetCmd
    | OpenDirectCmd
    | CreateGroupCmd
    | MembersCmd
    | UpdateCmd
)
