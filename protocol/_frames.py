"""Every frame of the protocol, as msgspec Structs.

Theory of operation
-------------------
One WebSocket *binary* message carries exactly one frame: a msgpack map whose
``"t"`` key names the frame type (msgspec tagged union). Unknown keys are
ignored, so fields can be added without a version bump; removing or changing
a field's meaning needs a new ``PROTOCOL_VERSION``.

Frames come in four families:

* handshake: ``Hello`` (client, first frame) and ``Welcome`` (server);
* requests: client frames with an ``id`` (a client-chosen uint32). Each gets
  exactly one reply frame carrying the same ``id``: a type-specific result
  (``Sent``, ``HistoryPage``, ``Ok``...) or an ``Error``;
* notices: client frames without ``id`` (``Typing``, ``Delivered``); never
  answered, except by an ``Error`` with ``id`` absent if they are refused;
* events: server pushes without ``id`` (``MessageEvent``, ``ReceiptEvent``...).

Message bodies are a second tagged union, keyed by ``"k"``.

Field constraints (lengths, ranges) are declared on the types below, so one
decode both parses and validates: a frame that decodes is well formed.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Final

from msgspec import Meta, Struct

from ._limits import (
    MAX_ATTRS,
    MAX_BATCH_IDS,
    MAX_CONVERSATION_PAGE,
    MAX_HISTORY_PAGE,
    MAX_ID_CHARS,
    MAX_RESUME_POINTS,
    MAX_TAGS,
    MAX_TEXT_CHARS,
    MAX_TOKEN_CHARS,
)

# --------------------------------------------------------------------------
# Scalar types with their constraints
# --------------------------------------------------------------------------

Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[^\x00-\x1f]+$")]
"""User, shop, conversation, device and client-message ids: 1..128 printable chars."""
ConvId = Id
UserId = Id
RequestId = Annotated[int, Meta(ge=0, le=2**32 - 1)]
Seq = Annotated[int, Meta(ge=0, le=2**53)]
"""Per-conversation sequence number. 1 is the first message; 0 means "none"."""
Millis = Annotated[int, Meta(ge=0, le=2**53)]
"""Unix time in milliseconds (or a duration in ms)."""
Count = Annotated[int, Meta(ge=0, le=2**53)]
Text = Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]
ShortText = Annotated[str, Meta(max_length=256)]
Url = Annotated[str, Meta(max_length=2048)]
Tag = Annotated[str, Meta(min_length=1, max_length=64)]
Attrs = Annotated[dict[ShortText, ShortText], Meta(max_length=MAX_ATTRS)]
Priority = Annotated[int, Meta(ge=0, le=9)]
"""0 (default) .. 9 (most urgent). Routing serves higher first."""


class Role(enum.StrEnum):
    CUSTOMER = "customer"
    AGENT = "agent"
    SUPERVISOR = "supervisor"
    WORKER = "worker"
    ADMIN = "admin"


class Channel(enum.StrEnum):
    TAOBAO = "taobao"
    TMALL = "tmall"
    ALIBABA_1688 = "1688"
    ALIEXPRESS = "aliexpress"
    JD = "jd"
    WEB = "web"
    APP = "app"


class ConvKind(enum.StrEnum):
    DIRECT = "direct"
    """A customer with a shop (bot, then queue, then an agent)."""
    GROUP = "group"
    """A shop's community group chat with members and roles."""


class ConvState(enum.StrEnum):
    BOT = "bot"
    QUEUED = "queued"
    ASSIGNED = "assigned"
    CLOSED = "closed"


class MemberRole(enum.StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"


class AgentStatus(enum.StrEnum):
    ONLINE = "online"
    BUSY = "busy"
    AWAY = "away"
    OFFLINE = "offline"


class Topic(enum.StrEnum):
    """Shop-wide streams a supervisor, worker or admin may subscribe to."""

    CONVERSATIONS = "conversations"
    """Every conversation change (opened, queued, assigned, closed, tagged)."""
    MESSAGES = "messages"
    """Every message of every conversation of the shop."""
    AGENTS = "agents"
    """Agent status changes."""
    DASHBOARD = "dashboard"
    """Live figures published by workers (queue lengths, waits, agent loads)."""


class WorkerEventKind(enum.StrEnum):
    """What a worker plugin can ask to be told about (see WorkerJoin)."""

    MESSAGE = "message"
    """A message was stored in a conversation of the worker's shards."""
    CONVERSATION = "conversation"
    """A conversation was opened, reopened, queued, assigned, transferred, closed or updated."""
    AGENT = "agent"
    """An agent's status changed (sent to every instance of the plugin)."""


class ReceiptKind(enum.StrEnum):
    DELIVERED = "delivered"
    READ = "read"


# --------------------------------------------------------------------------
# Message bodies (tag key "k")
# --------------------------------------------------------------------------


class Body(Struct, kw_only=True, omit_defaults=True, tag_field="k", gc=False):
    """Base of all message bodies."""


class TextBody(Body, tag="text"):
    text: Text


class ImageBody(Body, tag="image"):
    url: Url
    hash: ShortText
    size: Count
    mime: ShortText
    width: Count = 0
    height: Count = 0


class VoiceBody(Body, tag="voice"):
    url: Url
    hash: ShortText
    size: Count
    mime: ShortText
    duration_ms: Millis


class FileBody(Body, tag="file"):
    url: Url
    hash: ShortText
    size: Count
    mime: ShortText
    name: ShortText


class ProductCardBody(Body, tag="product"):
    product_id: Id
    title: ShortText
    price_cents: Count
    currency: Annotated[str, Meta(min_length=3, max_length=3)] = "CNY"
    url: Url = ""
    image: Url = ""


class OrderCardBody(Body, tag="order"):
    order_id: Id
    status: ShortText
    amount_cents: Count
    currency: Annotated[str, Meta(min_length=3, max_length=3)] = "CNY"
    items: Annotated[list[ShortText], Meta(max_length=50)] = []
    url: Url = ""


class QuickRepliesBody(Body, tag="quick_replies"):
    """A prompt with buttons (guided flows); a tap sends the option as text."""

    text: Text
    options: Annotated[list[ShortText], Meta(min_length=1, max_length=10)]


class SystemBody(Body, tag="system"):
    """A conversation event written by the server or a worker (assigned, queued...)."""

    event: ShortText
    data: Attrs = {}


class RecallBody(Body, tag="recall"):
    """Stored when an author recalls message ``seq``; clients hide that message."""

    seq: Seq


AnyBody = (
    TextBody
    | ImageBody
    | VoiceBody
    | FileBody
    | ProductCardBody
    | OrderCardBody
    | QuickRepliesBody
    | SystemBody
    | RecallBody
)

USER_BODY_TYPES: Final = (
    TextBody,
    ImageBody,
    VoiceBody,
    FileBody,
    ProductCardBody,
    OrderCardBody,
    QuickRepliesBody,
)
"""Bodies a Send may carry. SystemBody is for workers and the server; RecallBody
is written only by a Recall request."""


# --------------------------------------------------------------------------
# Shared records
# --------------------------------------------------------------------------


class Message(Struct, kw_only=True, omit_defaults=True, gc=False):
    conv: ConvId
    seq: Seq
    sender: UserId
    sender_role: Role
    cmid: ShortText
    """The client message id the sender chose (idempotency key)."""
    ts: Millis
    """Server time when the message was stored."""
    body: AnyBody
    recalled: bool = False
    """History only: the author recalled it; ``body`` is then emptied."""


class Conversation(Struct, kw_only=True, omit_defaults=True, gc=False):
    id: ConvId
    kind: ConvKind
    shop: Id
    state: ConvState
    channel: Channel = Channel.WEB
    customer: UserId | None = None
    agent: UserId | None = None
    priority: Priority = 0
    tags: list[Tag] = []
    title: ShortText = ""
    last_seq: Seq = 0
    created_at: Millis = 0
    updated_at: Millis = 0
    read_seq: Seq = 0
    """The requesting user's read point (per-user views only)."""
    unread: Count = 0
    """``last_seq - read_seq`` for the requesting user (per-user views only)."""


class Presence(Struct, kw_only=True, omit_defaults=True, gc=False):
    user: UserId
    online: bool
    devices: Count = 0
    last_seen: Millis = 0


class AgentInfo(Struct, kw_only=True, omit_defaults=True, gc=False):
    """One agent as the server last heard of them (``ListAgents``)."""

    agent: UserId
    status: AgentStatus
    """The last status the agent set (``offline`` after their last connection closed)."""
    since: Millis
    """When that status was set."""
    connected: bool = False
    """At least one of the agent's devices is connected now."""


class Limits(Struct, kw_only=True, gc=False):
    """The limits this server enforces, announced in Welcome."""

    max_frame_bytes: Count
    max_text_chars: Count
    frames_per_second: Count
    frames_burst: Count
    max_inflight: Count
    history_page: Count
    recall_window_ms: Millis


# --------------------------------------------------------------------------
# Client -> server frames (tag key "t")
# --------------------------------------------------------------------------


class ClientFrame(Struct, kw_only=True, omit_defaults=True, tag_field="t", gc=False):
    """Base of every frame a client sends."""


class Hello(ClientFrame, tag="hello"):
    v: Annotated[int, Meta(ge=0, le=65535)]
    """Protocol version the client speaks."""
    token: Annotated[str, Meta(min_length=1, max_length=MAX_TOKEN_CHARS)]
    device: Id
    """Stable per install; a second login with the same user+device replaces the first."""
    resume: Annotated[dict[ConvId, Seq], Meta(max_length=MAX_RESUME_POINTS)] = {}
    """Last seq seen per conversation; the server sends what came after, then ``Synced``."""
    agent: ShortText = ""
    """Client software name and version, for logs."""


class Request(ClientFrame):
    id: RequestId


class Ping(Request, tag="ping"):
    pass


class OpenConversation(Request, tag="open"):
    """Customer: get the open conversation with ``shop`` or start one (state bot)."""

    shop: Id
    channel: Channel = Channel.WEB


class CreateGroup(Request, tag="create_group"):
    """Agent, supervisor or admin: a shop group chat; the creator becomes owner."""

    shop: Id
    title: ShortText
    members: Annotated[list[UserId], Meta(max_length=MAX_BATCH_IDS)] = []


class UpdateMembers(Request, tag="members"):
    """Group owner/admin (or shop staff): add or remove members."""

    conv: ConvId
    add: Annotated[list[UserId], Meta(max_length=MAX_BATCH_IDS)] = []
    remove: Annotated[list[UserId], Meta(max_length=MAX_BATCH_IDS)] = []
    role: MemberRole = MemberRole.MEMBER
    """Role given to the added members."""


class Send(Request, tag="send"):
    conv: ConvId
    cmid: Id
    """Client message id: a retry with the same cmid returns the original seq."""
    body: AnyBody


class Recall(Request, tag="recall"):
    conv: ConvId
    seq: Seq


class Read(Request, tag="read"):
    """Everything up to ``seq`` is read by this user (all their devices)."""

    conv: ConvId
    seq: Seq


class History(Request, tag="history"):
    """Messages with ``after < seq < before`` (either bound optional), oldest first.
    With ``before`` only, the newest ``limit`` messages below it."""

    conv: ConvId
    before: Seq | None = None
    after: Seq | None = None
    limit: Annotated[int, Meta(ge=1, le=MAX_HISTORY_PAGE)] = 50


class ListConversations(Request, tag="list"):
    """The user's conversations, most recently updated first, with unread counts."""

    state: ConvState | None = None
    updated_before: Millis | None = None
    before_id: ConvId | None = None
    """With ``updated_before``: the id of the last conversation of the previous page,
    so that conversations updated in the same millisecond are not skipped."""
    limit: Annotated[int, Meta(ge=1, le=MAX_CONVERSATION_PAGE)] = 50


class GetConversation(Request, tag="get"):
    conv: ConvId


class UpdateConversation(Request, tag="update"):
    """Staff and workers: route and label a direct conversation.

    Every field is optional; ``agent`` with ``state=assigned`` assigns or
    transfers, ``state=queued`` puts it in the queue, ``state=closed`` closes.
    ``key`` makes the update idempotent: a repeat with the same key is ``Ok``
    and changes nothing."""

    conv: ConvId
    state: ConvState | None = None
    agent: UserId | None = None
    priority: Priority | None = None
    tags_add: Annotated[list[Tag], Meta(max_length=MAX_TAGS)] = []
    tags_remove: Annotated[list[Tag], Meta(max_length=MAX_TAGS)] = []
    note: Text = ""
    """Shown to the receiving agent on transfer (stored as a system message)."""
    key: ShortText = ""
    if_state: ConvState | None = None
    """Conditional update: refused with ``conflict`` unless the conversation is in
    this state (routing assigns only what is still queued)."""
    if_agent: UserId | None = None
    """Conditional update: refused with ``conflict`` unless the conversation is
    assigned to this agent (routing takes a chat back only from its holder)."""


class SetAgentStatus(Request, tag="agent_status"):
    status: AgentStatus


class ListAgents(Request, tag="agents"):
    """Supervisors, workers, admins: the agents of ``shop`` (default: the user's
    own) with the last status each set and whether they are connected now."""

    shop: Id | None = None


class WatchPresence(Request, tag="watch"):
    """Presence of these users now (reply) and on every change (events)."""

    users: Annotated[list[UserId], Meta(max_length=MAX_BATCH_IDS)]


class Subscribe(Request, tag="subscribe"):
    """Supervisor, worker, admin: shop-wide event streams (queue dashboards, plugins)."""

    topics: Annotated[list[Topic], Meta(max_length=8)]
    shop: Id | None = None
    """Admin and global workers name the shop; others get their own."""


class Unwatch(Request, tag="unwatch"):
    """Stop presence events for these users (see WatchPresence)."""

    users: Annotated[list[UserId], Meta(max_length=MAX_BATCH_IDS)]


class Unsubscribe(Request, tag="unsubscribe"):
    """Stop these shop-wide streams (see Subscribe)."""

    topics: Annotated[list[Topic], Meta(max_length=8)]
    shop: Id | None = None


class WorkerJoin(Request, tag="worker_join"):
    """Worker role only: join the instances of ``plugin``. The server splits the
    shards among the live instances of a plugin and delivers each event of the
    requested kinds to the instance owning its shard, at least once, until acked."""

    plugin: Id
    kinds: Annotated[list[WorkerEventKind], Meta(min_length=1, max_length=8)]


class Notify(Request, tag="notify"):
    """Worker role only: push an ephemeral plugin event (not stored) to the
    participants of ``conv``, to the devices of ``user``, or to the dashboard
    subscribers of ``shop``. Exactly one target must be given."""

    kind: ShortText
    data: Annotated[dict[ShortText, Any], Meta(max_length=64)] = {}
    conv: ConvId | None = None
    user: UserId | None = None
    shop: Id | None = None


class WorkerAck(ClientFrame, tag="worker_ack"):
    """Worker notice: these events are handled; they will not be delivered again."""

    ids: Annotated[list[Annotated[int, Meta(ge=0)]], Meta(max_length=1000)]


class Typing(ClientFrame, tag="typing"):
    conv: ConvId


class Delivered(ClientFrame, tag="delivered"):
    conv: ConvId
    seq: Seq


ClientFrameType = (
    Hello
    | Ping
    | OpenConversation
    | CreateGroup
    | UpdateMembers
    | Send
    | Recall
    | Read
    | History
    | ListConversations
    | GetConversation
    | UpdateConversation
    | SetAgentStatus
    | ListAgents
    | WatchPresence
    | Subscribe
    | Unwatch
    | Unsubscribe
    | WorkerJoin
    | Notify
    | WorkerAck
    | Typing
    | Delivered
)

# --------------------------------------------------------------------------
# Server -> client frames
# --------------------------------------------------------------------------


class ServerFrame(Struct, kw_only=True, omit_defaults=True, tag_field="t", gc=False):
    """Base of every frame the server sends."""


class Welcome(ServerFrame, tag="welcome"):
    v: int
    session: str
    user: UserId
    role: Role
    shop: str
    """The user's shop ("" for customers, "*" for global workers and admins)."""
    server_time: Millis
    heartbeat_ms: Millis
    idle_timeout_ms: Millis
    limits: Limits


class Error(ServerFrame, tag="error"):
    code: str
    """An ``ErrorCode`` value; clients must treat unknown codes like ``internal``."""
    message: str
    id: RequestId | None = None
    """The request this answers; absent for errors about notices or the connection."""
    retry_after_ms: Millis = 0
    detail: Attrs = {}


class Reply(ServerFrame):
    id: RequestId


class Pong(Reply, tag="pong"):
    server_time: Millis


class Ok(Reply, tag="ok"):
    pass


class Sent(Reply, tag="sent"):
    """The message is durable. ``duplicate`` is true when ``cmid`` was seen before
    and this is the original seq."""

    conv: ConvId
    cmid: str
    seq: Seq
    ts: Millis
    duplicate: bool = False


class ConversationInfo(Reply, tag="conversation"):
    conversation: Conversation


class HistoryPage(Reply, tag="history_page"):
    conv: ConvId
    messages: list[Message]
    has_more: bool


class ConversationPage(Reply, tag="conversation_page"):
    conversations: list[Conversation]
    has_more: bool


class PresenceList(Reply, tag="presence_list"):
    presences: list[Presence]


class AgentList(Reply, tag="agent_list"):
    shop: Id
    agents: list[AgentInfo]
    """By agent id; at most ``MAX_AGENT_LIST`` (``truncated`` says there were more)."""
    truncated: bool = False


class WorkerJoined(Reply, tag="worker_joined"):
    instance: str
    shards: list[int]
    """The shards this instance owns now (it changes: see WorkerAssignment)."""
    shard_count: int


class WorkerAssignment(ServerFrame, tag="worker_assignment"):
    """The instance's shards changed (an instance joined or left)."""

    shards: list[int]
    shard_count: int


class WorkerEvent(ServerFrame, tag="worker_event"):
    """One event for a worker; ack its ``event_id`` once handled. Delivery is at
    least once: after a worker or server failure an event may come again
    (``attempt`` > 1), so actions carry idempotency keys derived from ``event_id``."""

    event_id: int
    shard: int
    kind: WorkerEventKind
    ts: Millis
    conversation: Conversation | None = None
    message: Message | None = None
    change: ShortText = ""
    agent: UserId | None = None
    agent_status: AgentStatus | None = None
    shop: str = ""
    attempt: int = 1


class PluginEvent(ServerFrame, tag="plugin"):
    """An ephemeral event from a worker plugin (queue position, CRM sidebar, dashboard)."""

    plugin: str
    kind: ShortText
    data: dict[str, Any] = {}
    conv: str | None = None


class MessageEvent(ServerFrame, tag="msg"):
    message: Message


class ReceiptEvent(ServerFrame, tag="receipt"):
    conv: ConvId
    user: UserId
    kind: ReceiptKind
    seq: Seq


class TypingEvent(ServerFrame, tag="typing"):
    conv: ConvId
    user: UserId


class PresenceEvent(ServerFrame, tag="presence"):
    presence: Presence


class ConversationEvent(ServerFrame, tag="conv"):
    conversation: Conversation
    change: ShortText
    """What happened: opened, reopened, created, queued, assigned, transferred, closed,
    updated, members."""
    note: Text = ""
    """Staff only: the note given with a transfer or assignment, sent to the receiving agent."""
    by: str = ""
    """Who made the change, when it was a person or worker (staff views)."""


class AgentEvent(ServerFrame, tag="agent"):
    shop: Id
    agent: UserId
    status: AgentStatus


class Synced(ServerFrame, tag="synced"):
    """Sent once after Welcome: every message missed since the Hello's resume
    points has been delivered. ``last_seq`` maps each resumed conversation to
    its last seq at that moment."""

    last_seq: dict[ConvId, Seq]


ServerFrameType = (
    Welcome
    | Error
    | Pong
    | Ok
    | Sent
    | ConversationInfo
    | HistoryPage
    | ConversationPage
    | PresenceList
    | AgentList
    | WorkerJoined
    | WorkerAssignment
    | WorkerEvent
    | PluginEvent
    | MessageEvent
    | ReceiptEvent
    | TypingEvent
    | PresenceEvent
    | ConversationEvent
    | AgentEvent
    | Synced
)

REQUEST_TYPES: Final = tuple(t for t in ClientFrameType.__args__ if issubclass(t, Request))
NOTICE_TYPES: Final = (Typing, Delivered, WorkerAck)

# A literal list, so that type checkers see the re-exports of ``protocol``
# (mypy cannot evaluate a computed __all__ and then exports none of these names).
# tests/protocol/test_codec.py checks that every public name defined here is listed.
__all__ = [
    "MAX_ATTRS",
    "MAX_BATCH_IDS",
    "MAX_CONVERSATION_PAGE",
    "MAX_HISTORY_PAGE",
    "MAX_ID_CHARS",
    "MAX_RESUME_POINTS",
    "MAX_TAGS",
    "MAX_TEXT_CHARS",
    "MAX_TOKEN_CHARS",
    "NOTICE_TYPES",
    "REQUEST_TYPES",
    "USER_BODY_TYPES",
    "AgentEvent",
    "AgentInfo",
    "AgentList",
    "AgentStatus",
    "AnyBody",
    "Attrs",
    "Body",
    "Channel",
    "ClientFrame",
    "ClientFrameType",
    "ConvId",
    "ConvKind",
    "ConvState",
    "Conversation",
    "ConversationEvent",
    "ConversationInfo",
    "ConversationPage",
    "Count",
    "CreateGroup",
    "Delivered",
    "Error",
    "FileBody",
    "GetConversation",
    "Hello",
    "History",
    "HistoryPage",
    "Id",
    "ImageBody",
    "Limits",
    "ListAgents",
    "ListConversations",
    "MemberRole",
    "Message",
    "MessageEvent",
    "Millis",
    "Notify",
    "Ok",
    "OpenConversation",
    "OrderCardBody",
    "Ping",
    "PluginEvent",
    "Pong",
    "Presence",
    "PresenceEvent",
    "PresenceList",
    "Priority",
    "ProductCardBody",
    "QuickRepliesBody",
    "Read",
    "Recall",
    "RecallBody",
    "ReceiptEvent",
    "ReceiptKind",
    "Reply",
    "Request",
    "RequestId",
    "Role",
    "Send",
    "Sent",
    "Seq",
    "ServerFrame",
    "ServerFrameType",
    "SetAgentStatus",
    "ShortText",
    "Subscribe",
    "Synced",
    "SystemBody",
    "Tag",
    "Text",
    "TextBody",
    "Topic",
    "Typing",
    "TypingEvent",
    "Unsubscribe",
    "Unwatch",
    "UpdateConversation",
    "UpdateMembers",
    "Url",
    "UserId",
    "VoiceBody",
    "WatchPresence",
    "Welcome",
    "WorkerAck",
    "WorkerAssignment",
    "WorkerEvent",
    "WorkerEventKind",
    "WorkerJoin",
    "WorkerJoined",
]
