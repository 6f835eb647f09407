"""Codec tests: every frame and body round-trips, every declared constraint is enforced.

Besides hand-written samples (one per frame type, checked to be complete), the
constraint tests walk the msgspec schema of the frame catalogue itself, so a
field or frame added later is covered without touching this file: for every
constrained node of every client frame they break exactly one rule and check
the error code (``too_large`` for "over a maximum length", ``bad_frame`` for
everything else) and that the request id is still recovered.

The schema helpers here (``valid_variants``, ``strategy_for``) are also used by
``test_fuzz``.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from hypothesis import strategies as st
from msgspec import inspect as mi

import protocol
from protocol import (
    AgentEvent,
    AgentInfo,
    AgentList,
    AgentStatus,
    Channel,
    ClientFrameType,
    Conversation,
    ConversationEvent,
    ConversationInfo,
    ConversationPage,
    ConvKind,
    ConvState,
    CreateGroup,
    Delivered,
    Error,
    ErrorCode,
    FileBody,
    FrameError,
    GetConversation,
    Hello,
    History,
    HistoryPage,
    ImageBody,
    Limits,
    ListAgents,
    ListConversations,
    MemberRole,
    Message,
    MessageEvent,
    Notify,
    Ok,
    OpenConversation,
    OrderCardBody,
    Ping,
    PluginEvent,
    Pong,
    Presence,
    PresenceEvent,
    PresenceList,
    ProductCardBody,
    QuickRepliesBody,
    Read,
    Recall,
    RecallBody,
    ReceiptEvent,
    ReceiptKind,
    Request,
    Role,
    Send,
    Sent,
    ServerFrameType,
    SetAgentStatus,
    Subscribe,
    Synced,
    SystemBody,
    TextBody,
    Topic,
    Typing,
    TypingEvent,
    Unsubscribe,
    Unwatch,
    UpdateConversation,
    UpdateMembers,
    VoiceBody,
    WatchPresence,
    Welcome,
    WorkerAck,
    WorkerAssignment,
    WorkerEvent,
    WorkerEventKind,
    WorkerJoin,
    WorkerJoined,
    decode_client_frame,
    decode_server_frame,
    encode,
)
from protocol._limits import (
    MAX_FRAME_BYTES,
    MAX_ID_CHARS,
    MAX_RESUME_POINTS,
    MAX_TEXT_CHARS,
    MAX_TOKEN_CHARS,
)

CLIENT_TYPES: tuple[type[Any], ...] = typing.get_args(ClientFrameType)
SERVER_TYPES: tuple[type[Any], ...] = typing.get_args(ServerFrameType)
BODY_TYPES: tuple[type[Any], ...] = typing.get_args(protocol.AnyBody)

# ------------------------------------------------------------------ samples

BODIES: list[Any] = [
    TextBody(text="你好, is this in stock?"),
    ImageBody(
        url="https://cdn.example/i/1.jpg",
        hash="sha256:ab",
        size=52_311,
        mime="image/jpeg",
        width=800,
        height=600,
    ),
    VoiceBody(
        url="https://cdn.example/v/1.amr",
        hash="sha256:cd",
        size=9_000,
        mime="audio/amr",
        duration_ms=4_200,
    ),
    FileBody(
        url="https://cdn.example/f/1.pdf",
        hash="sha256:ef",
        size=120_000,
        mime="application/pdf",
        name="invoice.pdf",
    ),
    ProductCardBody(
        product_id="p-1",
        title="Tea cup",
        price_cents=1999,
        currency="USD",
        url="https://shop.example/p/1",
        image="https://cdn.example/p/1.jpg",
    ),
    OrderCardBody(
        order_id="o-9",
        status="shipped",
        amount_cents=5998,
        items=["Tea cup x2"],
        url="https://shop.example/o/9",
    ),
    QuickRepliesBody(text="How can we help?", options=["Where is my order?", "Refund"]),
    SystemBody(event="assigned", data={"agent": "agent-7"}),
    RecallBody(seq=3),
]

CONVERSATION = Conversation(
    id="c-1",
    kind=ConvKind.DIRECT,
    shop="shop-1",
    state=ConvState.ASSIGNED,
    channel=Channel.TMALL,
    customer="cust-1",
    agent="agent-7",
    priority=3,
    tags=["vip"],
    title="Order 9",
    last_seq=12,
    created_at=1_700_000_000_000,
    updated_at=1_700_000_060_000,
    read_seq=10,
    unread=2,
)
GROUP = Conversation(
    id="g-1", kind=ConvKind.GROUP, shop="shop-1", state=ConvState.BOT, title="Fans"
)


def message(seq: int, body: Any, recalled: bool = False) -> Message:
    return Message(
        conv="c-1",
        seq=seq,
        sender="cust-1",
        sender_role=Role.CUSTOMER,
        cmid=f"m-{seq}",
        ts=1_700_000_000_000 + seq,
        body=body,
        recalled=recalled,
    )


CLIENT_SAMPLES: list[Any] = [
    Hello(v=1, token="abc.def", device="iphone-1", resume={"c-1": 10, "g-1": 0}, agent="demo/1.0"),
    Hello(v=1, token="t", device="d"),
    Ping(id=0),
    OpenConversation(id=1, shop="shop-1", channel=Channel.ALIBABA_1688),
    OpenConversation(id=1, shop="shop-1"),
    CreateGroup(id=2, shop="shop-1", title="Fans", members=["cust-1", "cust-2"]),
    UpdateMembers(id=3, conv="g-1", add=["cust-3"], remove=["cust-2"], role=MemberRole.ADMIN),
    Recall(id=5, conv="c-1", seq=4),
    Read(id=6, conv="c-1", seq=12),
    History(id=7, conv="c-1", before=100, after=50, limit=200),
    History(id=7, conv="c-1"),
    ListConversations(id=8, state=ConvState.QUEUED, updated_before=1_700_000_000_000, limit=1),
    ListConversations(id=8),
    GetConversation(id=9, conv="c-1"),
    UpdateConversation(
        id=10,
        conv="c-1",
        state=ConvState.ASSIGNED,
        agent="agent-7",
        priority=9,
        tags_add=["vip"],
        tags_remove=["new"],
        note="VIP, be nice",
        key="k-1",
    ),
    UpdateConversation(id=10, conv="c-1"),
    SetAgentStatus(id=11, status=AgentStatus.BUSY),
    UpdateConversation(
        id=10,
        conv="c-1",
        state=ConvState.ASSIGNED,
        agent="agent-7",
        if_state=ConvState.QUEUED,
        if_agent="agent-1",
    ),
    ListAgents(id=11, shop="shop-1"),
    ListAgents(id=11),
    WatchPresence(id=12, users=["agent-7", "cust-1"]),
    Subscribe(id=13, topics=[Topic.CONVERSATIONS, Topic.MESSAGES, Topic.AGENTS], shop="shop-1"),
    Subscribe(id=13, topics=[]),
    Unsubscribe(id=13, topics=[Topic.DASHBOARD], shop="shop-1"),
    Unwatch(id=12, users=["agent-1"]),
    WorkerJoin(id=14, plugin="crm", kinds=[WorkerEventKind.MESSAGE, WorkerEventKind.AGENT]),
    Notify(
        id=15,
        kind="queue_position",
        conv="c-1",
        data={"position": 3, "eta_s": 40.5, "vip": True, "tags": ["a", None, {"x": -1}]},
    ),
    Notify(id=15, kind="figures", shop="shop-1"),
    WorkerAck(ids=[0, 1, 2**53]),
    Typing(conv="c-1"),
    Delivered(conv="c-1", seq=12),
    *[Send(id=2**32 - 1, conv="c-1", cmid=f"cm-{i}", body=body) for i, body in enumerate(BODIES)],
]

WELCOME_SAMPLE = Welcome(
    v=1,
    session="s-1",
    user="cust-1",
    role=Role.CUSTOMER,
    shop="",
    server_time=1_700_000_000_000,
    heartbeat_ms=20_000,
    idle_timeout_ms=60_000,
    limits=Limits(
        max_frame_bytes=65536,
        max_text_chars=5000,
        frames_per_second=50,
        frames_burst=200,
        max_inflight=256,
        history_page=200,
        recall_window_ms=120_000,
    ),
)

SERVER_SAMPLES: list[Any] = [
    WELCOME_SAMPLE,
    Error(code="not_found", message="no such conversation", id=4, retry_after_ms=0),
    Error(code="rate_limited", message="slow down", retry_after_ms=20, detail={"a": "b"}),
    Error(code="some_future_code", message="unknown codes still decode"),
    Pong(id=1, server_time=1_700_000_000_000),
    Ok(id=2),
    Sent(id=3, conv="c-1", cmid="cm-1", seq=13, ts=1_700_000_000_013, duplicate=True),
    Sent(id=3, conv="c-1", cmid="cm-1", seq=13, ts=1_700_000_000_013),
    ConversationInfo(id=4, conversation=CONVERSATION),
    ConversationInfo(id=4, conversation=GROUP),
    HistoryPage(
        id=5,
        conv="c-1",
        has_more=True,
        messages=[message(i + 1, b) for i, b in enumerate(BODIES)]
        + [message(99, TextBody(text=""), recalled=True)],
    ),
    ConversationPage(id=6, conversations=[CONVERSATION, GROUP], has_more=False),
    PresenceList(
        id=7,
        presences=[
            Presence(user="agent-7", online=True, devices=2, last_seen=1_700_000_000_000),
            Presence(user="cust-1", online=False),
        ],
    ),
    *[MessageEvent(message=message(i + 1, body)) for i, body in enumerate(BODIES)],
    ReceiptEvent(conv="c-1", user="agent-7", kind=ReceiptKind.READ, seq=12),
    ReceiptEvent(conv="c-1", user="agent-7", kind=ReceiptKind.DELIVERED, seq=12),
    TypingEvent(conv="c-1", user="agent-7"),
    PresenceEvent(presence=Presence(user="agent-7", online=True)),
    ConversationEvent(conversation=CONVERSATION, change="assigned"),
    AgentEvent(shop="shop-1", agent="agent-7", status=AgentStatus.AWAY),
    Synced(last_seq={"c-1": 12, "g-1": 0}),
    WorkerJoined(id=14, instance="i-1", shards=[0, 3, 15], shard_count=16),
    AgentList(
        id=15,
        shop="shop-1",
        truncated=True,
        agents=[
            AgentInfo(
                agent="agent-7", status=AgentStatus.ONLINE, since=1_700_000_000_000, connected=True
            ),
            AgentInfo(agent="agent-8", status=AgentStatus.OFFLINE, since=1),
        ],
    ),
    WorkerAssignment(shards=[], shard_count=16),
    WorkerEvent(
        event_id=9,
        shard=3,
        kind=WorkerEventKind.MESSAGE,
        ts=1_700_000_000_001,
        conversation=CONVERSATION,
        message=message(1, BODIES[0]),
        shop="shop-1",
        attempt=2,
    ),
    WorkerEvent(
        event_id=10,
        shard=3,
        kind=WorkerEventKind.AGENT,
        ts=1,
        agent="agent-7",
        agent_status=AgentStatus.AWAY,
        change="status",
    ),
    PluginEvent(
        plugin="crm",
        kind="sidebar",
        conv="c-1",
        data={"vip": True, "orders": [1, 2], "name": "张三", "score": 0.5},
    ),
    PluginEvent(plugin="crm", kind="ping"),
    Synced(last_seq={}),
]


def _name(value: Any) -> str:
    return type(value).__name__


def test_samples_cover_every_frame_and_body_type() -> None:
    assert {type(s) for s in CLIENT_SAMPLES} == set(CLIENT_TYPES)
    assert {type(s) for s in SERVER_SAMPLES} == set(SERVER_TYPES)
    assert {type(b) for b in BODIES} == set(BODY_TYPES)
    sent_bodies = {type(s.body) for s in CLIENT_SAMPLES if isinstance(s, Send)}
    pushed_bodies = {type(s.message.body) for s in SERVER_SAMPLES if isinstance(s, MessageEvent)}
    assert sent_bodies == pushed_bodies == set(BODY_TYPES)


def test_every_public_frame_name_is_exported() -> None:
    """``_frames.__all__`` is a literal list (for type checkers); nothing defined there
    may be missing from it, and no import helper may leak into ``protocol``."""
    from protocol import _frames

    defined = {
        name
        for name, value in vars(_frames).items()
        if not name.startswith("_")
        and (
            getattr(value, "__module__", None) == _frames.__name__
            or isinstance(value, types.UnionType)
        )
    }
    assert defined <= set(_frames.__all__)
    assert set(_frames.__all__) <= set(protocol.__all__)
    assert {"enum", "annotations", "Struct", "Meta", "Final", "msgspec"}.isdisjoint(
        protocol.__all__
    )
    for name in protocol.__all__:
        assert hasattr(protocol, name), name


def test_the_frame_families_partition_the_client_frames() -> None:
    requests = set(protocol.REQUEST_TYPES)
    notices = set(protocol.NOTICE_TYPES)
    assert not requests & notices
    assert requests | notices | {Hello} == set(CLIENT_TYPES)
    assert all(issubclass(t, Request) for t in requests)
    assert not any(issubclass(t, Request) for t in notices)


@pytest.mark.parametrize("frame", CLIENT_SAMPLES, ids=_name)
def test_client_frame_round_trip(frame: Any) -> None:
    decoded = decode_client_frame(encode(frame))
    assert type(decoded) is type(frame)
    assert decoded == frame
    assert encode(decoded) == encode(frame)


@pytest.mark.parametrize("frame", SERVER_SAMPLES, ids=_name)
def test_server_frame_round_trip(frame: Any) -> None:
    decoded = decode_server_frame(encode(frame))
    assert type(decoded) is type(frame)
    assert decoded == frame
    assert encode(decoded) == encode(frame)


@pytest.mark.parametrize("frame", CLIENT_SAMPLES, ids=_name)
def test_client_frames_are_not_server_frames(frame: Any) -> None:
    """The two directions are separate unions: a client frame is no server frame
    (the tags "typing" and "recall" exist in both families with other fields)."""
    with pytest.raises(FrameError):
        decode_server_frame(encode(frame))


def test_wire_shape_tag_key_and_omitted_defaults() -> None:
    assert msgspec.msgpack.decode(encode(Ping(id=1))) == {"t": "ping", "id": 1}
    assert msgspec.msgpack.decode(encode(OpenConversation(id=1, shop="s"))) == {
        "t": "open",
        "id": 1,
        "shop": "s",
    }
    raw = msgspec.msgpack.decode(encode(Send(id=1, conv="c", cmid="m", body=TextBody(text="hi"))))
    assert raw == {
        "t": "send",
        "id": 1,
        "conv": "c",
        "cmid": "m",
        "body": {"k": "text", "text": "hi"},
    }
    assert encode(Ping(id=1))[:3] == b"\x82\xa1t"  # a map whose first key is "t"
    # Defaults are omitted even when given explicitly.
    assert encode(Sent(id=1, conv="c", cmid="m", seq=1, ts=2, duplicate=False)) == encode(
        Sent(id=1, conv="c", cmid="m", seq=1, ts=2)
    )


def test_unknown_keys_are_ignored_everywhere() -> None:
    data = msgspec.msgpack.encode(
        {
            "t": "send",
            "id": 1,
            "conv": "c",
            "cmid": "m",
            "future": [1, {"x": None}],
            "body": {"k": "text", "text": "hi", "also_future": True},
        }
    )
    assert decode_client_frame(data) == Send(id=1, conv="c", cmid="m", body=TextBody(text="hi"))
    data = msgspec.msgpack.encode({"t": "ok", "id": 3, "new_field": "x"})
    assert decode_server_frame(data) == Ok(id=3)


def test_tag_may_come_anywhere_in_the_map() -> None:
    data = msgspec.msgpack.encode({"id": 4, "conv": "c", "t": "get"})
    assert decode_client_frame(data) == GetConversation(id=4, conv="c")


# -------------------------------------------------------- malformed input


def _frame_error(data: bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode_client_frame(data)
    return info.value


def test_too_long_text_is_too_large_and_keeps_the_request_id() -> None:
    ok = Send(id=9, conv="c", cmid="m", body=TextBody(text="字" * MAX_TEXT_CHARS))
    assert decode_client_frame(encode(ok)) == ok
    err = _frame_error(
        encode(Send(id=9, conv="c", cmid="m", body=TextBody(text="字" * (MAX_TEXT_CHARS + 1))))
    )
    assert err.code is ErrorCode.TOO_LARGE
    assert err.request_id == 9
    assert "$.body.text" in err.message


def test_text_limit_counts_characters_not_bytes() -> None:
    # 5000 four-byte characters are 20000 bytes of UTF-8 and still fine.
    ok = Send(id=1, conv="c", cmid="m", body=TextBody(text="😀" * MAX_TEXT_CHARS))
    assert len(encode(ok)) > 4 * MAX_TEXT_CHARS
    assert decode_client_frame(encode(ok)) == ok


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"t": "ping", "id": "1"}, ErrorCode.BAD_FRAME),
        ({"t": "ping", "id": 1.0}, ErrorCode.BAD_FRAME),
        ({"t": "ping", "id": True}, ErrorCode.BAD_FRAME),
        ({"t": "read", "id": 1, "conv": "c", "seq": "5"}, ErrorCode.BAD_FRAME),
        ({"t": "read", "id": 1, "conv": 5, "seq": 5}, ErrorCode.BAD_FRAME),
        ({"t": "read", "id": 1, "conv": "c"}, ErrorCode.BAD_FRAME),
        ({"t": "open", "id": 1, "shop": "s", "channel": "myspace"}, ErrorCode.BAD_FRAME),
        ({"t": "send", "id": 1, "conv": "c", "cmid": "m", "body": "hi"}, ErrorCode.BAD_FRAME),
        (
            {"t": "send", "id": 1, "conv": "c", "cmid": "m", "body": {"text": "hi"}},
            ErrorCode.BAD_FRAME,
        ),
        (
            {"t": "send", "id": 1, "conv": "c", "cmid": "m", "body": {"k": "gif", "url": "x"}},
            ErrorCode.BAD_FRAME,
        ),
        ({"t": "watch", "id": 1, "users": "u1"}, ErrorCode.BAD_FRAME),
        ({"t": "hello", "v": 1, "token": "t", "device": "d", "resume": ["c"]}, ErrorCode.BAD_FRAME),
        ({"t": "hello", "v": 1, "token": "", "device": "d"}, ErrorCode.BAD_FRAME),
        (
            {"t": "hello", "v": 1, "token": "t" * (MAX_TOKEN_CHARS + 1), "device": "d"},
            ErrorCode.TOO_LARGE,
        ),
        (
            {
                "t": "hello",
                "v": 1,
                "token": "t",
                "device": "d",
                "resume": {f"c{i}": 1 for i in range(MAX_RESUME_POINTS + 1)},
            },
            ErrorCode.TOO_LARGE,
        ),
        ({"t": "get", "id": 1, "conv": "c" * (MAX_ID_CHARS + 1)}, ErrorCode.TOO_LARGE),
        ({"t": "get", "id": 1, "conv": "line\nbreak"}, ErrorCode.BAD_FRAME),
        ({"t": "history", "id": 1, "conv": "c", "limit": 0}, ErrorCode.BAD_FRAME),
        ({"t": "history", "id": 1, "conv": "c", "limit": 201}, ErrorCode.BAD_FRAME),
    ],
    ids=lambda v: str(v)[:60] if isinstance(v, dict) else str(v),
)
def test_wrong_types_and_values(frame: dict[str, Any], code: ErrorCode) -> None:
    err = _frame_error(msgspec.msgpack.encode(frame))
    assert err.code is code
    id_ok = isinstance(frame.get("id"), int) and not isinstance(frame.get("id"), bool)
    assert err.request_id == (frame["id"] if id_ok else None)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # the one byte msgpack never uses
        b"\xff\xff\xff\xff",
        b"GET / HTTP/1.1\r\n\r\n",
        encode(Ping(id=1))[:-1],  # truncated
        encode(Send(id=1, conv="c", cmid="m", body=TextBody(text="hello")))[:-3],
        encode(Ping(id=1)) + b"\x00",  # trailing bytes
        encode(Ping(id=1)) * 2,  # two frames in one message
        msgspec.msgpack.encode([1, 2, 3]),
        msgspec.msgpack.encode("ping"),
        msgspec.msgpack.encode(7),
        msgspec.msgpack.encode(None),
        msgspec.msgpack.encode(b"\x82\xa1t"),
        msgspec.msgpack.encode(msgspec.msgpack.Ext(1, b"x")),
        msgspec.msgpack.encode({}),
        msgspec.msgpack.encode({"id": 1}),  # no tag
        msgspec.msgpack.encode({"t": "nope", "id": 1}),  # unknown tag
        msgspec.msgpack.encode({"t": 1, "id": 1}),
        msgspec.msgpack.encode({"t": "welcome", "id": 1}),  # a server tag
        msgspec.msgpack.encode({1: "ping"}),
        b"\x81\xc4\x01t\xa4ping",  # binary key
    ],
)
def test_garbage_is_bad_frame(data: bytes) -> None:
    err = _frame_error(data)
    assert err.code is ErrorCode.BAD_FRAME
    assert err.message
    with pytest.raises(FrameError) as info:
        decode_server_frame(data)
    assert info.value.code is ErrorCode.BAD_FRAME


def test_unknown_tag_keeps_the_request_id() -> None:
    err = _frame_error(msgspec.msgpack.encode({"t": "teleport", "id": 77}))
    assert err.code is ErrorCode.BAD_FRAME
    assert err.request_id == 77


@pytest.mark.parametrize("bad_id", [-1, 2**32, 2**64 - 1, "7", None, [7]])
def test_an_invalid_request_id_is_not_recovered(bad_id: Any) -> None:
    err = _frame_error(msgspec.msgpack.encode({"t": "ping", "id": bad_id}))
    assert err.code is ErrorCode.BAD_FRAME
    assert err.request_id is None


def test_deeply_nested_msgpack_is_bad_frame_not_recursion_error() -> None:
    # Regression: 60000 nested arrays inside an ignored key made msgspec raise
    # RecursionError, which escaped the decoders (and ServerConnection.receive).
    head = msgspec.msgpack.encode({"t": "ping", "id": 5})
    nested = b"\x83" + head[1:] + msgspec.msgpack.encode("pad") + b"\x91" * 60_000 + b"\xc0"
    assert len(nested) < MAX_FRAME_BYTES
    err = _frame_error(nested)
    assert err.code is ErrorCode.BAD_FRAME
    with pytest.raises(FrameError):
        decode_server_frame(nested)
    # The same depth inside a typed field, with a recoverable id.
    body = b"\x81\xa1x" * 20_000 + b"\xc0"
    typed = (
        b"\x85"
        + msgspec.msgpack.encode({"t": "send", "id": 6, "conv": "c", "cmid": "m"})[1:]
        + msgspec.msgpack.encode("body")
        + body
    )
    assert _frame_error(typed).code is ErrorCode.BAD_FRAME


def test_moderate_nesting_in_unknown_keys_is_fine() -> None:
    nested: Any = None
    for _ in range(50):
        nested = [nested]
    assert decode_client_frame(msgspec.msgpack.encode({"t": "ping", "id": 5, "x": nested})) == Ping(
        id=5
    )


def test_frame_error_attributes() -> None:
    err = FrameError(ErrorCode.TOO_LARGE, "text too long", 3)
    assert (err.code, err.message, err.request_id) == (ErrorCode.TOO_LARGE, "text too long", 3)
    assert str(err) == "text too long"


# ----------------------------------------------------- schema-driven helpers

ID_PATTERN = r"^[^\x00-\x1f]+$"


def _struct_info(cls: type[Any]) -> mi.StructType:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return info


def _members(t: mi.UnionType) -> list[mi.Type]:
    return [m for m in t.types if not isinstance(m, mi.NoneType)]


def valid_variants(t: mi.Type) -> list[Any]:
    """Valid builtin (msgpack-level) values of ``t``: a base value plus one more
    for every alternative of every union inside it (linear, not a product)."""
    if isinstance(t, mi.StrType):
        return ["x" * max(1, t.min_length or 0)]
    if isinstance(t, mi.IntType):
        low = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else 0)
        return [low]
    if isinstance(t, mi.BoolType):
        return [False]
    if isinstance(t, mi.FloatType):
        return [0.0]
    if isinstance(t, mi.NoneType | mi.AnyType):
        return [None]
    if isinstance(t, mi.EnumType):
        return [next(iter(t.cls)).value]
    if isinstance(t, mi.LiteralType):
        return [t.values[0]]
    if isinstance(t, mi.ListType):
        count = max(1, t.min_length or 0)
        return [[item] * count for item in valid_variants(t.item_type)]
    if isinstance(t, mi.DictType):
        key = valid_variants(t.key_type)[0]
        return [{key: value} for value in valid_variants(t.value_type)]
    if isinstance(t, mi.UnionType):
        return [v for member in _members(t) for v in valid_variants(member)]
    if isinstance(t, mi.StructType):
        fields = {f.encode_name: valid_variants(f.type) for f in t.fields}
        base = {name: options[0] for name, options in fields.items()}
        if t.tag_field is not None:
            base = {t.tag_field: t.tag, **base}
        if issubclass(t.cls, Request):
            base["id"] = 7
        out = [base]
        for name, options in fields.items():
            out.extend({**base, name: option} for option in options[1:])
        return out
    raise NotImplementedError(f"no valid value for {t!r}; teach valid_variants")


def _distinct_keys(t: mi.Type, count: int) -> list[Any]:
    if isinstance(t, mi.StrType):
        width = max(1, t.min_length or 0)
        return [str(i).rjust(width, "0") for i in range(count)]
    raise NotImplementedError(f"no distinct keys for {t!r}")


@dataclass(frozen=True)
class Breakage:
    path: tuple[str | int, ...]
    """Where in the frame (keys and list indexes); () is the whole frame."""
    what: str
    value: Any
    """The replacement; ``_MISSING`` deletes the key."""
    code: ErrorCode


_MISSING: Any = object()


def _breakages(t: mi.Type, value: Any, path: tuple[str | int, ...]) -> Iterator[Breakage]:
    """Every way to break one rule at ``path`` or below, with the expected code."""
    bad, too_large = ErrorCode.BAD_FRAME, ErrorCode.TOO_LARGE
    if not isinstance(t, mi.FloatType | mi.AnyType):
        yield Breakage(path, "float instead", 1.5, bad)
    if isinstance(t, mi.StrType):
        yield Breakage(path, "int instead", 1, bad)
        if t.max_length is not None:
            yield Breakage(path, f"length {t.max_length + 1}", "x" * (t.max_length + 1), too_large)
        if t.min_length:
            yield Breakage(path, f"length {t.min_length - 1}", "x" * (t.min_length - 1), bad)
        if t.pattern is not None:
            assert t.pattern == ID_PATTERN, "a new pattern: add a violating example"
            yield Breakage(path, "control character", "x\x01", bad)
            yield Breakage(path, "empty", "", bad)
    elif isinstance(t, mi.IntType):
        yield Breakage(path, "str instead", "1", bad)
        yield Breakage(path, "bool instead", True, bad)
        if t.ge is not None:
            yield Breakage(path, f"{t.ge - 1} < ge", t.ge - 1, bad)
        if t.le is not None:
            yield Breakage(path, f"{t.le + 1} > le", t.le + 1, bad)
        assert (t.gt, t.lt, t.multiple_of) == (None, None, None), "add cases for these"
    elif isinstance(t, mi.BoolType):
        yield Breakage(path, "int instead", 1, bad)
    elif isinstance(t, mi.EnumType):
        yield Breakage(path, "unknown member", "no-such-member", bad)
        yield Breakage(path, "int instead", 1, bad)
    elif isinstance(t, mi.ListType):
        yield Breakage(path, "map instead", {"a": 1}, bad)
        item = value[0]
        if t.max_length is not None:
            yield Breakage(
                path, f"{t.max_length + 1} items", [item] * (t.max_length + 1), too_large
            )
        if t.min_length:
            yield Breakage(path, f"{t.min_length - 1} items", [item] * (t.min_length - 1), bad)
        yield from _breakages(t.item_type, item, (*path, 0))
    elif isinstance(t, mi.DictType):
        yield Breakage(path, "array instead", [1], bad)
        ((key, item),) = value.items()
        if t.max_length is not None:
            keys = _distinct_keys(t.key_type, t.max_length + 1)
            yield Breakage(
                path, f"{t.max_length + 1} entries", dict.fromkeys(keys, item), too_large
            )
        for broken in _breakages(t.key_type, key, ()):
            yield Breakage(path, f"key {broken.what}", {broken.value: item}, broken.code)
        yield from _breakages(t.value_type, item, (*path, key))
    elif isinstance(t, mi.UnionType):
        members = _members(t)
        if len(members) == 1:
            yield from _breakages(members[0], value, path)
        else:
            assert all(isinstance(m, mi.StructType) and m.tag for m in members)
            (member,) = [
                m for m in members if isinstance(m, mi.StructType) and m.tag == value[m.tag_field]
            ]
            yield from _breakages(member, value, path)
    elif isinstance(t, mi.StructType):
        yield Breakage(path, "array instead", [], bad)
        yield Breakage(path, "str instead", "x", bad)
        if t.tag_field is not None:
            yield Breakage((*path, t.tag_field), "unknown tag", "no-such-tag", bad)
            yield Breakage((*path, t.tag_field), "int tag", 1, bad)
            yield Breakage((*path, t.tag_field), "missing tag", _MISSING, bad)
        for f in t.fields:
            if f.required:
                yield Breakage((*path, f.encode_name), "missing", _MISSING, bad)
            yield from _breakages(f.type, value[f.encode_name], (*path, f.encode_name))
    elif not isinstance(t, mi.NoneType | mi.AnyType | mi.FloatType):
        raise NotImplementedError(f"no breakages for {t!r}")


def _apply(root: Any, path: tuple[str | int, ...], new: Any) -> Any:
    if not path:
        return new
    root = copy.deepcopy(root)
    node = root
    for step in path[:-1]:
        node = node[step]
    if new is _MISSING:
        del node[path[-1]]
    else:
        node[path[-1]] = new
    return root


def _broken_frames(types: tuple[type[Any], ...]) -> list[Any]:
    cases = []
    for cls in types:
        info = _struct_info(cls)
        for n, base in enumerate(valid_variants(info)):
            for b in _breakages(info, base, ()):
                label = f"{info.tag}#{n}:{'.'.join(map(str, b.path)) or '$'}:{b.what}"
                expected_id = (
                    7 if issubclass(cls, Request) and b.path[:1] not in ((), ("id",)) else None
                )
                cases.append(
                    pytest.param(base, _apply(base, b.path, b.value), b.code, expected_id, id=label)
                )
    return cases


CLIENT_BREAKAGES = _broken_frames(CLIENT_TYPES)
SERVER_BREAKAGES = _broken_frames(SERVER_TYPES)


@pytest.mark.parametrize("cls", CLIENT_TYPES + SERVER_TYPES, ids=lambda c: c.__name__)
def test_schema_variants_are_valid(cls: type[Any]) -> None:
    """The baseline of the breakage tests: the unbroken frames decode."""
    decode = decode_client_frame if cls in CLIENT_TYPES else decode_server_frame
    variants = valid_variants(_struct_info(cls))
    for variant in variants:
        assert type(decode(msgspec.msgpack.encode(variant))) is cls


def test_breakages_reach_nested_constraints() -> None:
    """Guard against the walker silently skipping parts of the schema."""
    labels = {p.id for p in CLIENT_BREAKAGES}
    for expected in [
        "send#0:body.text:length 5001",
        "send#6:body.options:0 items",
        "send#6:body.options:11 items",
        "send#4:body.currency:length 2",
        "send#7:body.data:33 entries",
        "send#7:body.data:key length 257",
        "hello#0:resume:1001 entries",
        "hello#0:resume:key control character",
        "hello#0:resume.x:-1 < ge",
        "update#0:priority:10 > le",
        "update#0:tags_add.0:length 65",
        "subscribe#0:topics.0:unknown member",
        "ping#0:id:4294967296 > le",
        "typing#0:conv:control character",
    ]:
        assert expected in labels
    assert len(CLIENT_BREAKAGES) > 400


@pytest.mark.parametrize(("base", "broken", "code", "request_id"), CLIENT_BREAKAGES)
def test_every_client_constraint_is_enforced(
    base: Any, broken: Any, code: ErrorCode, request_id: int | None
) -> None:
    decode_client_frame(msgspec.msgpack.encode(base))  # the unbroken frame is fine
    err = _frame_error(msgspec.msgpack.encode(broken))
    assert err.code is code, err.message
    assert err.request_id == request_id


@pytest.mark.parametrize(("base", "broken", "code", "request_id"), SERVER_BREAKAGES)
def test_every_server_constraint_is_enforced(
    base: Any, broken: Any, code: ErrorCode, request_id: int | None
) -> None:
    decode_server_frame(msgspec.msgpack.encode(base))
    with pytest.raises(FrameError) as info:
        decode_server_frame(msgspec.msgpack.encode(broken))
    assert info.value.code is ErrorCode.BAD_FRAME  # this direction has no too_large
    assert info.value.request_id is None


# ------------------------------------------------ hypothesis strategies


def _text(t: mi.StrType, cap: int) -> st.SearchStrategy[str]:
    low, high = t.min_length or 0, min(t.max_length if t.max_length is not None else cap, cap)
    if t.pattern is None:
        return st.text(min_size=low, max_size=high)
    assert t.pattern == ID_PATTERN
    alphabet = st.characters(min_codepoint=0x20, codec="utf-8")
    return st.text(alphabet, min_size=max(low, 1), max_size=high)


def strategy_for(t: mi.Type, cap: int = 40, items: int = 3) -> st.SearchStrategy[Any]:
    """Valid Python values (Structs, enums...) of ``t``. Strings are at most ``cap``
    characters (and sometimes exactly at a field's maximum), lists ``items`` long."""
    if isinstance(t, mi.StrType):
        strategy = _text(t, cap)
        if t.max_length is not None and t.max_length > cap and t.pattern is None:
            # (built lazily: hypothesis reprs strategies, and st.just(<5000 chars>) is long)
            strategy = strategy | st.just(t.max_length).map(lambda n: "é" * n)
        return strategy
    if isinstance(t, mi.IntType):
        low = t.ge if t.ge is not None else -(2**63)
        return st.integers(min_value=low, max_value=t.le if t.le is not None else 2**64 - 1)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.FloatType):
        return st.floats(allow_nan=False)
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.AnyType):  # free-form data: what msgpack round-trips unchanged
        return st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(2**63), 2**64 - 1)
            | st.floats(allow_nan=False)
            | st.text(max_size=cap),
            lambda inner: (
                st.lists(inner, max_size=items)
                | st.dictionaries(st.text(max_size=cap), inner, max_size=items)
            ),
            max_leaves=8,
        )
    if isinstance(t, mi.EnumType):
        return st.sampled_from(list(t.cls))
    if isinstance(t, mi.ListType):
        high = min(items, t.max_length if t.max_length is not None else items)
        return st.lists(
            strategy_for(t.item_type, cap, items), min_size=t.min_length or 0, max_size=high
        )
    if isinstance(t, mi.DictType):
        high = min(items, t.max_length if t.max_length is not None else items)
        return st.dictionaries(
            strategy_for(t.key_type, cap, items),
            strategy_for(t.value_type, cap, items),
            max_size=high,
        )
    if isinstance(t, mi.UnionType):
        return st.one_of([strategy_for(m, cap, items) for m in t.types])
    if isinstance(t, mi.StructType):
        required = {f.name: strategy_for(f.type, cap, items) for f in t.fields if f.required}
        optional = {f.name: strategy_for(f.type, cap, items) for f in t.fields if not f.required}
        cls = t.cls
        return st.fixed_dictionaries(required, optional=optional).map(lambda kw: cls(**kw))
    raise NotImplementedError(f"no strategy for {t!r}")


def frames_strategy(types: tuple[type[Any], ...]) -> st.SearchStrategy[Any]:
    return st.one_of([strategy_for(_struct_info(cls)) for cls in types])
