"""Property tests: no input makes the protocol raise, and valid frames round-trip.

The valid-frame strategies are derived from the msgspec schema of the frame
catalogue (see ``test_codec.strategy_for``), so new frames and fields are
fuzzed without changes here.
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protocol import (
    ClientConnection,
    ClientState,
    CloseCode,
    ConnectionState,
    Hello,
    HelloReceived,
    Ignored,
    NoticeReceived,
    ProtocolError,
    Refused,
    Request,
    RequestReceived,
    ServerConnection,
    ServerEvent,
    decode_client_frame,
    decode_server_frame,
    encode,
)
from protocol._limits import MAX_FRAME_BYTES

from .test_codec import CLIENT_TYPES, SERVER_TYPES, WELCOME_SAMPLE, frames_strategy

EVENT_TYPES = (HelloReceived, RequestReceived, NoticeReceived, Refused, Ignored)
HELLO = encode(Hello(v=1, token="t", device="d"))

client_frames = frames_strategy(CLIENT_TYPES)
server_frames = frames_strategy(SERVER_TYPES)

# msgpack-shaped junk: maps with plausible tags and keys, and any values.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8) | st.integers(0, 9), inner, max_size=3)
    ),
    max_leaves=10,
)
_tags = st.sampled_from(
    [c.__struct_config__.tag for c in CLIENT_TYPES + SERVER_TYPES] + ["", "nope"]
)
_keys = st.sampled_from(
    [
        "id",
        "conv",
        "seq",
        "cmid",
        "body",
        "k",
        "text",
        "v",
        "token",
        "device",
        "resume",
        "users",
        "topics",
        "limit",
        "state",
        "x",
    ]
)
junk_maps = st.builds(
    lambda tag, fields: {"t": tag, **fields},
    _tags,
    st.dictionaries(_keys, _values | st.sampled_from(["text", "x" * 300, 7, 2**32]), max_size=6),
)


def _open_server(**kwargs: Any) -> ServerConnection:
    conn = ServerConnection(now=0.0, **kwargs)
    assert isinstance(conn.receive(HELLO, 0.0), HelloReceived)
    conn.accept(WELCOME_SAMPLE)
    return conn


def _check(conn: ServerConnection, event: ServerEvent) -> None:
    """What must hold after any event."""
    assert isinstance(event, EVENT_TYPES)
    if isinstance(event, Refused):
        assert decode_server_frame(event.data) == event.error
        if event.close is not None:
            assert conn.state is ConnectionState.CLOSED
            assert conn.close_code is event.close
    assert (conn.state is ConnectionState.CLOSED) == (conn.close_code is not None)
    assert len(conn.inflight) <= conn.max_inflight


def _fresh_and_open() -> list[ServerConnection]:
    return [ServerConnection(now=0.0), _open_server()]


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_give_events(data: bytes) -> None:
    for conn in _fresh_and_open():
        _check(conn, conn.receive(data, 0.0))


@given(junk_maps)
def test_msgpack_junk_only_ever_gives_events(frame: dict[Any, Any]) -> None:
    data = msgspec.msgpack.encode(frame)
    for conn in _fresh_and_open():
        _check(conn, conn.receive(data, 0.0))


@given(client_frames, st.data())
def test_mutated_valid_frames_only_ever_give_events(frame: Any, data: st.DataObject) -> None:
    raw = bytearray(encode(frame))
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(raw)))
        how = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if how == "flip" and where < len(raw):
            raw[where] ^= data.draw(st.integers(1, 255))
        elif how == "cut":
            del raw[where : where + data.draw(st.integers(1, 8))]
        else:
            raw[where:where] = data.draw(st.binary(min_size=1, max_size=8))
    for conn in _fresh_and_open():
        _check(conn, conn.receive(bytes(raw), 0.0))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.binary(max_size=60)
        | junk_maps.map(msgspec.msgpack.encode)
        | client_frames.map(encode)
        | st.just(b"")
        | st.builds(bytes, st.just(MAX_FRAME_BYTES + 1)),
        max_size=40,
    ),
    st.floats(0, 0.05),
)
def test_sequences_keep_the_invariants(frames: list[bytes], step: float) -> None:
    conn = _open_server(max_inflight=4, frames_burst=10)
    now = 0.0
    closed_with: CloseCode | None = None
    for data in frames:
        now += step
        event = conn.receive(data, now)
        _check(conn, event)
        if closed_with is not None:
            assert isinstance(event, Ignored)
            assert conn.close_code is closed_with
        closed_with = conn.close_code


@given(st.binary(max_size=200) | junk_maps.map(msgspec.msgpack.encode))
def test_client_side_only_raises_protocol_error(data: bytes) -> None:
    client = ClientConnection()
    try:
        frame = client.receive(data)
    except ProtocolError:
        assert client.state is ClientState.AWAIT_WELCOME
    else:
        assert isinstance(frame, SERVER_TYPES)


@given(client_frames)
def test_valid_client_frames_round_trip(frame: Any) -> None:
    data = encode(frame)
    decoded = decode_client_frame(data)
    assert type(decoded) is type(frame)
    assert decoded == frame
    assert encode(decoded) == data


@given(server_frames)
def test_valid_server_frames_round_trip(frame: Any) -> None:
    data = encode(frame)
    decoded = decode_server_frame(data)
    assert type(decoded) is type(frame)
    assert decoded == frame
    assert encode(decoded) == data


@given(client_frames)
def test_valid_client_frames_are_accepted_when_open(frame: Any) -> None:
    data = encode(frame)
    assume(len(data) <= MAX_FRAME_BYTES)
    conn = _open_server()
    event = conn.receive(data, 0.0)
    if isinstance(frame, Hello):
        assert isinstance(event, Refused)
        assert event.close is None
    elif isinstance(frame, Request):
        assert isinstance(event, RequestReceived)
        assert event.request == frame
        assert conn.inflight == {frame.id}
    else:
        assert isinstance(event, NoticeReceived)
        assert event.notice == frame


@settings(max_examples=60)
@given(st.integers(0, 20_000), st.sampled_from([b"\x91", b"\x81\xa1x"]), st.booleans())
def test_deep_nesting_only_ever_gives_events(depth: int, opener: bytes, typed: bool) -> None:
    """msgspec bounds nesting with a RecursionError; it must surface as bad_frame."""
    head = msgspec.msgpack.encode({"t": "send", "id": 1, "conv": "c", "cmid": "m"})
    key = msgspec.msgpack.encode("body" if typed else "pad")
    data = b"\x85" + head[1:] + key + opener * depth + b"\xc0"
    assert len(data) <= MAX_FRAME_BYTES
    for conn in _fresh_and_open():
        _check(conn, conn.receive(data, 0.0))
