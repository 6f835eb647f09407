"""The sans-IO connection state machines, driven with bytes and explicit clocks."""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
import pytest

from protocol import (
    MAX_REFUSALS_IN_A_ROW,
    ClientConnection,
    ClientState,
    CloseCode,
    ConnectionState,
    Delivered,
    Error,
    ErrorCode,
    GetConversation,
    Hello,
    HelloReceived,
    Ignored,
    Limits,
    NoticeReceived,
    Ok,
    Ping,
    Pong,
    ProtocolError,
    Refused,
    RequestReceived,
    Role,
    Send,
    ServerConnection,
    ServerEvent,
    TextBody,
    TokenBucket,
    Typing,
    Welcome,
    decode_client_frame,
    decode_server_frame,
    encode,
)
from protocol._connection import _SERVER_TABLE, _Kind
from protocol._limits import (
    FRAMES_BURST,
    FRAMES_PER_SECOND,
    MAX_FRAME_BYTES,
    MAX_INFLIGHT_REQUESTS,
    PROTOCOL_VERSION,
)

HELLO = Hello(v=PROTOCOL_VERSION, token="tok", device="dev-1")
WELCOME = Welcome(
    v=1,
    session="s-1",
    user="cust-1",
    role=Role.CUSTOMER,
    shop="",
    server_time=1,
    heartbeat_ms=20_000,
    idle_timeout_ms=60_000,
    limits=Limits(
        max_frame_bytes=MAX_FRAME_BYTES,
        max_text_chars=5000,
        frames_per_second=50,
        frames_burst=200,
        max_inflight=256,
        history_page=200,
        recall_window_ms=120_000,
    ),
)
BAD_BYTES = b"\xc1"  # not msgpack


def ping(request_id: int) -> bytes:
    return encode(Ping(id=request_id))


TYPING = encode(Typing(conv="c-1"))


def malformed_request(request_id: int) -> bytes:
    """A request that decodes as msgpack but breaks a constraint (conv too long)."""
    return msgspec.msgpack.encode({"t": "get", "id": request_id, "conv": "c" * 500})


def in_state(state: ConnectionState, **kwargs: Any) -> ServerConnection:
    conn = ServerConnection(now=0.0, **kwargs)
    if state is ConnectionState.AWAIT_HELLO:
        return conn
    assert isinstance(conn.receive(encode(HELLO), 0.0), HelloReceived)
    if state is ConnectionState.AUTHENTICATING:
        return conn
    conn.accept(WELCOME)
    if state is ConnectionState.OPEN:
        return conn
    conn.close(CloseCode.NORMAL)
    assert conn.state is state
    return conn


def open_conn(**kwargs: Any) -> ServerConnection:
    return in_state(ConnectionState.OPEN, **kwargs)


def refused(event: ServerEvent) -> Refused:
    assert isinstance(event, Refused), event
    # The bytes to send are exactly the Error frame described.
    assert decode_server_frame(event.data) == event.error
    return event


# ------------------------------------------------------- the server table

S, K = ConnectionState, _Kind
# (state, kind) -> (event type, state after, close code, error code, request id in the Error)
EXPECTED: dict[
    tuple[ConnectionState, _Kind],
    tuple[type[Any], ConnectionState, CloseCode | None, ErrorCode | None, int | None],
] = {
    (S.AWAIT_HELLO, K.HELLO): (HelloReceived, S.AUTHENTICATING, None, None, None),
    (S.AWAIT_HELLO, K.REQUEST): (
        Refused,
        S.CLOSED,
        CloseCode.UNAUTHORIZED,
        ErrorCode.UNAUTHORIZED,
        5,
    ),
    (S.AWAIT_HELLO, K.NOTICE): (
        Refused,
        S.CLOSED,
        CloseCode.UNAUTHORIZED,
        ErrorCode.UNAUTHORIZED,
        None,
    ),
    (S.AWAIT_HELLO, K.MALFORMED): (
        Refused,
        S.CLOSED,
        CloseCode.BAD_HANDSHAKE,
        ErrorCode.BAD_FRAME,
        None,
    ),
    (S.AUTHENTICATING, K.HELLO): (
        Refused,
        S.CLOSED,
        CloseCode.BAD_HANDSHAKE,
        ErrorCode.UNAUTHORIZED,
        None,
    ),
    (S.AUTHENTICATING, K.REQUEST): (
        Refused,
        S.CLOSED,
        CloseCode.BAD_HANDSHAKE,
        ErrorCode.UNAUTHORIZED,
        5,
    ),
    (S.AUTHENTICATING, K.NOTICE): (
        Refused,
        S.CLOSED,
        CloseCode.BAD_HANDSHAKE,
        ErrorCode.UNAUTHORIZED,
        None,
    ),
    (S.AUTHENTICATING, K.MALFORMED): (
        Refused,
        S.CLOSED,
        CloseCode.BAD_HANDSHAKE,
        ErrorCode.UNAUTHORIZED,
        5,
    ),
    (S.OPEN, K.HELLO): (Refused, S.OPEN, None, ErrorCode.BAD_FRAME, None),
    (S.OPEN, K.REQUEST): (RequestReceived, S.OPEN, None, None, None),
    (S.OPEN, K.NOTICE): (NoticeReceived, S.OPEN, None, None, None),
    (S.OPEN, K.MALFORMED): (Refused, S.OPEN, None, ErrorCode.TOO_LARGE, 5),
    (S.CLOSED, K.HELLO): (Ignored, S.CLOSED, CloseCode.NORMAL, None, None),
    (S.CLOSED, K.REQUEST): (Ignored, S.CLOSED, CloseCode.NORMAL, None, None),
    (S.CLOSED, K.NOTICE): (Ignored, S.CLOSED, CloseCode.NORMAL, None, None),
    (S.CLOSED, K.MALFORMED): (Ignored, S.CLOSED, CloseCode.NORMAL, None, None),
}
FRAME_OF_KIND = {
    K.HELLO: encode(HELLO),
    K.REQUEST: ping(5),
    K.NOTICE: TYPING,
    K.MALFORMED: malformed_request(5),
}


def test_the_table_and_these_expectations_cover_every_pair() -> None:
    pairs = set(itertools.product(ConnectionState, _Kind))
    assert set(_SERVER_TABLE) == pairs
    assert set(EXPECTED) == pairs


@pytest.mark.parametrize(("state", "kind"), sorted(EXPECTED, key=str), ids=str)
def test_server_table(state: ConnectionState, kind: _Kind) -> None:
    event_type, after, close, code, request_id = EXPECTED[state, kind]
    conn = in_state(state)
    event = conn.receive(FRAME_OF_KIND[kind], 0.0)
    assert type(event) is event_type
    assert conn.state is after
    assert conn.close_code is close
    if isinstance(event, Refused):
        refused(event)
        assert event.close is close
        assert event.error.code == code
        assert event.error.id == request_id
    elif isinstance(event, HelloReceived):
        assert event.hello == HELLO
    elif isinstance(event, RequestReceived):
        assert event.request == Ping(id=5)
        assert conn.inflight == {5}
    elif isinstance(event, NoticeReceived):
        assert event.notice == Typing(conv="c-1")
    # Once closed, nothing means anything any more.
    if conn.state is ConnectionState.CLOSED:
        for data in FRAME_OF_KIND.values():
            assert isinstance(conn.receive(data, 0.0), Ignored)
        assert isinstance(conn.receive_text(), Ignored)
        assert isinstance(conn.receive(b"x" * (MAX_FRAME_BYTES + 1), 0.0), Ignored)


@pytest.mark.parametrize("state", [S.AWAIT_HELLO, S.AUTHENTICATING, S.OPEN])
def test_garbage_bytes_in_every_live_state(state: ConnectionState) -> None:
    conn = in_state(state)
    event = refused(conn.receive(BAD_BYTES, 0.0))
    assert event.error.id is None
    if state is S.OPEN:
        assert event.error.code == ErrorCode.BAD_FRAME
        assert event.close is None
        assert conn.state is S.OPEN
    else:
        assert event.close is CloseCode.BAD_HANDSHAKE
        assert conn.state is S.CLOSED


def test_first_frame_malformed_hello_is_bad_handshake() -> None:
    conn = ServerConnection(now=0.0)
    data = msgspec.msgpack.encode({"t": "hello", "v": 1, "token": "", "device": "d"})
    event = refused(conn.receive(data, 0.0))
    assert (event.error.code, event.close) == (ErrorCode.BAD_FRAME, CloseCode.BAD_HANDSHAKE)
    assert "hello" in event.error.message


@pytest.mark.parametrize("version", [0, 2, 65535])
def test_unsupported_version(version: int) -> None:
    conn = ServerConnection(now=0.0)
    event = refused(conn.receive(encode(Hello(v=version, token="t", device="d")), 0.0))
    assert event.error.code == ErrorCode.UNSUPPORTED_VERSION
    assert event.close is CloseCode.UNSUPPORTED_VERSION
    assert event.error.detail == {"supported": "1"}
    assert conn.state is S.CLOSED


@pytest.mark.parametrize("state", [S.AWAIT_HELLO, S.AUTHENTICATING, S.OPEN])
def test_text_message_closes_with_1003(state: ConnectionState) -> None:
    conn = in_state(state)
    event = refused(conn.receive_text())
    assert event.close is CloseCode.UNSUPPORTED_DATA
    assert event.error.code == ErrorCode.BAD_FRAME
    assert conn.state is S.CLOSED
    assert conn.close_code is CloseCode.UNSUPPORTED_DATA


def _padded_ping(request_id: int, size: int) -> bytes:
    """A valid Ping of exactly ``size`` bytes (padded with an unknown key)."""
    for pad in range(size, 0, -1):
        data = msgspec.msgpack.encode({"t": "ping", "id": request_id, "pad": "x" * pad})
        if len(data) == size:
            return data
    raise AssertionError("unreachable")


@pytest.mark.parametrize("state", [S.AWAIT_HELLO, S.AUTHENTICATING, S.OPEN])
def test_oversized_frame_closes_with_1009(state: ConnectionState) -> None:
    conn = in_state(state)
    event = refused(conn.receive(_padded_ping(1, MAX_FRAME_BYTES + 1), 0.0))
    assert event.close is CloseCode.MESSAGE_TOO_BIG
    assert event.error.code == ErrorCode.TOO_LARGE
    assert conn.state is S.CLOSED


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    conn = open_conn()
    data = _padded_ping(1, MAX_FRAME_BYTES)
    assert len(data) == MAX_FRAME_BYTES
    event = conn.receive(data, 0.0)
    assert isinstance(event, RequestReceived)
    assert event.request == Ping(id=1)


def test_a_stricter_frame_limit() -> None:
    conn = open_conn(max_frame_bytes=100)
    assert isinstance(conn.receive(_padded_ping(1, 100), 0.0), RequestReceived)
    assert refused(conn.receive(_padded_ping(2, 101), 0.0)).close is CloseCode.MESSAGE_TOO_BIG


# ------------------------------------------------------ accept and reject


@pytest.mark.parametrize("state", [S.AWAIT_HELLO, S.OPEN, S.CLOSED])
def test_accept_and_reject_outside_authenticating_raise(state: ConnectionState) -> None:
    conn = in_state(state)
    with pytest.raises(RuntimeError):
        conn.accept(WELCOME)
    with pytest.raises(RuntimeError):
        conn.reject(ErrorCode.UNAUTHORIZED, "no", CloseCode.UNAUTHORIZED)
    assert conn.state is state


def test_accept_opens_and_returns_the_welcome() -> None:
    conn = in_state(S.AUTHENTICATING)
    data = conn.accept(WELCOME)
    assert decode_server_frame(data) == WELCOME
    assert conn.state is S.OPEN
    assert conn.close_code is None


def test_reject_closes() -> None:
    conn = in_state(S.AUTHENTICATING)
    event = refused(conn.reject(ErrorCode.UNAUTHORIZED, "token expired", CloseCode.UNAUTHORIZED))
    assert (event.error.code, event.error.message, event.error.id) == (
        ErrorCode.UNAUTHORIZED,
        "token expired",
        None,
    )
    assert event.close is CloseCode.UNAUTHORIZED
    assert conn.state is S.CLOSED
    assert conn.close_code is CloseCode.UNAUTHORIZED
    with pytest.raises(RuntimeError):
        conn.accept(WELCOME)


def test_a_frame_while_authenticating_ends_the_connection_and_accept_then_raises() -> None:
    """Clients must wait for Welcome; a server that finishes authenticating after
    such a frame finds the connection closed."""
    conn = in_state(S.AUTHENTICATING)
    refused(conn.receive(ping(1), 0.0))
    with pytest.raises(RuntimeError):
        conn.accept(WELCOME)


def test_close_from_open() -> None:
    conn = open_conn()
    conn.close(CloseCode.GOING_AWAY)
    assert (conn.state, conn.close_code) == (S.CLOSED, CloseCode.GOING_AWAY)
    assert isinstance(conn.receive(ping(1), 0.0), Ignored)


def test_hello_again_is_refused_but_not_fatal() -> None:
    conn = open_conn()
    event = refused(conn.receive(encode(HELLO), 0.0))
    assert event.close is None
    assert "already" in event.error.message
    assert isinstance(conn.receive(ping(1), 0.0), RequestReceived)


# ---------------------------------------------------------- rate limiting


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=4, burst=2, now=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(10.0) == 0.0
    assert bucket.take(10.0) == 0.25  # one token every 1/4 s
    assert bucket.take(10.125) == 0.125  # half a token accrued
    assert bucket.take(10.25) == 0.0
    # A clock that goes backwards adds nothing.
    assert bucket.take(9.0) == 0.25
    # Saving is capped at the burst.
    assert bucket.take(1000.0) == 0.0
    assert bucket.take(1000.0) == 0.0
    assert bucket.take(1000.0) > 0


def test_rate_limit_burst_refusal_and_refill() -> None:
    conn = open_conn(frames_per_second=4, frames_burst=2)
    assert isinstance(conn.receive(TYPING, 0.0), NoticeReceived)
    assert isinstance(conn.receive(ping(1), 0.0), RequestReceived)
    event = refused(conn.receive(ping(2), 0.0))
    assert event.error.code == ErrorCode.RATE_LIMITED
    assert event.error.retry_after_ms == 250
    assert event.error.id == 2
    assert event.close is None
    assert conn.inflight == {1}  # the refused request is not in flight
    # A notice over the rate is refused too, without an id.
    event = refused(conn.receive(TYPING, 0.125))
    assert (event.error.code, event.error.id, event.error.retry_after_ms) == (
        ErrorCode.RATE_LIMITED,
        None,
        125,
    )
    # One token refilled by 0.25 s: one frame passes, the next does not.
    assert isinstance(conn.receive(ping(2), 0.25), RequestReceived)
    assert refused(conn.receive(ping(3), 0.25)).error.code == ErrorCode.RATE_LIMITED
    # Long quiet: the full burst (and no more) is available again.
    assert isinstance(conn.receive(ping(3), 60.0), RequestReceived)
    assert isinstance(conn.receive(ping(4), 60.0), RequestReceived)
    assert refused(conn.receive(ping(5), 60.0)).error.code == ErrorCode.RATE_LIMITED


def test_default_rate_limit_numbers() -> None:
    conn = open_conn()
    for _ in range(FRAMES_BURST):
        assert isinstance(conn.receive(TYPING, 5.0), NoticeReceived)
    event = refused(conn.receive(TYPING, 5.0))
    assert event.error.retry_after_ms == 1000 // FRAMES_PER_SECOND
    assert (
        refused(conn.receive(TYPING, 5.0 + 0.5 / FRAMES_PER_SECOND)).error.code
        == ErrorCode.RATE_LIMITED
    )
    assert isinstance(conn.receive(TYPING, 5.0 + 1.5 / FRAMES_PER_SECOND), NoticeReceived)


def test_retry_after_is_never_too_early() -> None:
    """Obeying retry_after_ms exactly must succeed (it is rounded up, not down)."""
    conn = open_conn(frames_per_second=3, frames_burst=1)
    assert isinstance(conn.receive(TYPING, 0.0), NoticeReceived)
    wait_ms = refused(conn.receive(TYPING, 0.0)).error.retry_after_ms
    assert wait_ms == 334  # 1/3 s, rounded up
    assert isinstance(conn.receive(TYPING, wait_ms / 1000), NoticeReceived)


def test_malformed_frames_cost_tokens_too() -> None:
    conn = open_conn(frames_per_second=1, frames_burst=2)
    assert refused(conn.receive(BAD_BYTES, 0.0)).error.code == ErrorCode.BAD_FRAME
    assert refused(conn.receive(encode(HELLO), 0.0)).error.code == ErrorCode.BAD_FRAME
    event = refused(conn.receive(ping(1), 0.0))
    assert event.error.code == ErrorCode.RATE_LIMITED
    assert refused(conn.receive(BAD_BYTES, 0.0)).error.code == ErrorCode.RATE_LIMITED


def test_set_rate_replaces_the_bucket() -> None:
    conn = open_conn(frames_per_second=1, frames_burst=1)
    assert isinstance(conn.receive(TYPING, 0.0), NoticeReceived)
    assert refused(conn.receive(TYPING, 0.0)).error.code == ErrorCode.RATE_LIMITED
    conn.set_rate(1000, 3, now=0.0)
    for _ in range(3):
        assert isinstance(conn.receive(TYPING, 0.0), NoticeReceived)
    assert refused(conn.receive(TYPING, 0.0)).error.retry_after_ms == 1


# ------------------------------------------------------ in-flight requests


def test_max_inflight_requests() -> None:
    conn = open_conn(max_inflight=3)
    for request_id in (1, 2, 3):
        assert isinstance(conn.receive(ping(request_id), 0.0), RequestReceived)
    event = refused(conn.receive(ping(4), 0.0))
    assert (event.error.code, event.error.id, event.close) == (ErrorCode.RATE_LIMITED, 4, None)
    assert event.error.retry_after_ms > 0
    assert conn.inflight == {1, 2, 3}
    # A reply frees a slot...
    assert decode_server_frame(conn.send(Ok(id=2))) == Ok(id=2)
    assert conn.inflight == {1, 3}
    assert isinstance(conn.receive(ping(4), 0.0), RequestReceived)
    # ...so does an Error answering a request, and complete() for bytes encoded elsewhere.
    conn.send(Error(code=ErrorCode.NOT_FOUND, message="no", id=1))
    conn.complete(3)
    assert conn.inflight == {4}
    # Events and id-less errors free nothing.
    conn.send(Error(code=ErrorCode.RATE_LIMITED, message="x"))
    conn.send(Pong(id=99, server_time=1))
    assert conn.inflight == {4}


def test_default_max_inflight() -> None:
    conn = open_conn(frames_burst=10_000)
    for request_id in range(MAX_INFLIGHT_REQUESTS):
        assert isinstance(conn.receive(ping(request_id), 0.0), RequestReceived)
    assert (
        refused(conn.receive(ping(MAX_INFLIGHT_REQUESTS), 0.0)).error.code == ErrorCode.RATE_LIMITED
    )


def test_duplicate_inflight_id() -> None:
    conn = open_conn()
    assert isinstance(conn.receive(ping(7), 0.0), RequestReceived)
    event = refused(conn.receive(encode(GetConversation(id=7, conv="c")), 0.0))
    assert event.error.code == ErrorCode.BAD_FRAME
    assert event.error.id is None  # the id belongs to the first request
    assert event.close is None
    assert conn.inflight == {7}
    conn.send(Pong(id=7, server_time=1))
    assert isinstance(conn.receive(ping(7), 0.0), RequestReceived)


def test_refusals_never_release_or_answer_for_an_inflight_id() -> None:
    """Regression: a malformed (or rate-limited) frame reusing the id of a request in
    flight released that id, so a client could exceed the in-flight cap without bound,
    and the Error carried the id, failing the first request at the client."""
    conn = open_conn(max_inflight=2)
    assert isinstance(conn.receive(ping(1), 0.0), RequestReceived)
    event = refused(conn.receive(malformed_request(1), 0.0))
    assert (event.error.code, event.error.id) == (ErrorCode.TOO_LARGE, None)
    assert conn.inflight == {1}
    assert isinstance(conn.receive(ping(2), 0.0), RequestReceived)
    assert refused(conn.receive(ping(3), 0.0)).error.code == ErrorCode.RATE_LIMITED
    assert conn.inflight == {1, 2}
    # A malformed request with a fresh id is answered with that id.
    assert refused(conn.receive(malformed_request(9), 0.0)).error.id == 9

    limited = open_conn(frames_per_second=1, frames_burst=1)
    assert isinstance(limited.receive(ping(1), 0.0), RequestReceived)
    event = refused(limited.receive(ping(1), 0.0))
    assert (event.error.code, event.error.id) == (ErrorCode.RATE_LIMITED, None)
    assert limited.inflight == {1}


# ------------------------------------------------- consecutive refusals


def test_consecutive_refusals_close_with_1008() -> None:
    conn = open_conn()
    for _ in range(MAX_REFUSALS_IN_A_ROW - 1):
        assert refused(conn.receive(BAD_BYTES, 0.0)).close is None
    event = refused(conn.receive(BAD_BYTES, 0.0))
    assert event.close is CloseCode.POLICY_VIOLATION
    assert event.error.code == ErrorCode.BAD_FRAME
    assert conn.state is S.CLOSED
    assert conn.close_code is CloseCode.POLICY_VIOLATION
    assert isinstance(conn.receive(ping(1), 0.0), Ignored)


@pytest.mark.parametrize("good", [ping(1), TYPING], ids=["request", "notice"])
def test_an_accepted_frame_resets_the_refusal_count(good: bytes) -> None:
    conn = open_conn()
    for _ in range(MAX_REFUSALS_IN_A_ROW - 1):
        refused(conn.receive(BAD_BYTES, 0.0))
    assert not isinstance(conn.receive(good, 0.0), Refused)
    for _ in range(MAX_REFUSALS_IN_A_ROW - 1):
        assert refused(conn.receive(BAD_BYTES, 0.0)).close is None
    assert refused(conn.receive(BAD_BYTES, 0.0)).close is CloseCode.POLICY_VIOLATION


def test_ignored_rate_limit_closes_with_1008() -> None:
    conn = open_conn(frames_per_second=1, frames_burst=1)
    assert isinstance(conn.receive(TYPING, 0.0), NoticeReceived)
    closes = [refused(conn.receive(TYPING, 0.0)).close for _ in range(MAX_REFUSALS_IN_A_ROW)]
    assert closes == [None] * (MAX_REFUSALS_IN_A_ROW - 1) + [CloseCode.POLICY_VIOLATION]


def test_repeated_duplicate_ids_close_with_1008() -> None:
    """Regression: duplicate-id refusals were counted but never closed the connection."""
    conn = open_conn(frames_burst=1000)
    assert isinstance(conn.receive(ping(1), 0.0), RequestReceived)
    closes = [refused(conn.receive(ping(1), 0.0)).close for _ in range(MAX_REFUSALS_IN_A_ROW)]
    assert closes[-1] is CloseCode.POLICY_VIOLATION
    assert closes[:-1] == [None] * (MAX_REFUSALS_IN_A_ROW - 1)


# ------------------------------------------------------------ client side


def test_client_connection_starts_awaiting_welcome() -> None:
    client = ClientConnection()
    assert client.state is ClientState.AWAIT_WELCOME
    assert client.welcome is None


def test_client_connection_happy_path() -> None:
    client = ClientConnection()
    with pytest.raises(ProtocolError):
        client.send(Ping(id=1))
    assert decode_client_frame(client.hello(HELLO)) == HELLO
    frame = client.receive(encode(WELCOME))
    assert frame == WELCOME
    assert client.welcome == WELCOME
    assert client.state is ClientState.OPEN
    request = Send(id=client.next_request_id(), conv="c", cmid="m", body=TextBody(text="hi"))
    assert decode_client_frame(client.send(request)) == request
    # Any server frame is fine once open; replies are matched by the caller.
    assert client.receive(encode(Ok(id=1))) == Ok(id=1)
    error = Error(code="some_future_code", message="x", id=1)
    assert client.receive(encode(error)) == error
    assert client.state is ClientState.OPEN


def test_client_connection_refused_handshake() -> None:
    client = ClientConnection()
    error = Error(code=ErrorCode.UNAUTHORIZED, message="token expired")
    assert client.receive(encode(error)) == error
    assert client.state is ClientState.CLOSED
    assert client.welcome is None
    with pytest.raises(ProtocolError):
        client.send(Ping(id=1))


def test_client_connection_rejects_other_frames_before_welcome() -> None:
    client = ClientConnection()
    with pytest.raises(ProtocolError):
        client.receive(encode(Pong(id=1, server_time=2)))
    assert client.state is ClientState.AWAIT_WELCOME
    with pytest.raises(ProtocolError):
        client.receive(BAD_BYTES)
    with pytest.raises(ProtocolError):
        client.receive(encode(Ping(id=1)))  # a client frame is no server frame
    assert client.state is ClientState.AWAIT_WELCOME


def test_client_request_ids() -> None:
    client = ClientConnection()
    assert [client.next_request_id() for _ in range(3)] == [1, 2, 3]
    client._next_id = 2**32 - 1
    assert client.next_request_id() == 2**32 - 1
    assert client.next_request_id() == 1  # wraps, skipping 0


def test_client_and_server_talk() -> None:
    """Both machines end to end, bytes only."""
    client, server = ClientConnection(), ServerConnection(now=0.0)
    event = server.receive(client.hello(HELLO), 0.0)
    assert isinstance(event, HelloReceived)
    client.receive(server.accept(WELCOME))
    assert client.state is ClientState.OPEN
    request_id = client.next_request_id()
    event = server.receive(client.send(Ping(id=request_id)), 0.1)
    assert isinstance(event, RequestReceived)
    assert server.inflight == {request_id}
    reply = client.receive(server.send(Pong(id=event.request.id, server_time=5)))
    assert reply == Pong(id=request_id, server_time=5)
    assert server.inflight == set()
    event = server.receive(client.send(Delivered(conv="c", seq=3)), 0.2)
    assert isinstance(event, NoticeReceived)
    assert event.notice == Delivered(conv="c", seq=3)
    event = server.receive(
        client.send(
            Send(id=client.next_request_id(), conv="c", cmid="m", body=TextBody(text="x" * 5001))
        ),
        0.3,
    )
    error = client.receive(refused(event).data)
    assert isinstance(error, Error)
    assert (error.code, error.id) == (ErrorCode.TOO_LARGE, 2)


def test_future_shaped_hello_is_told_unsupported_version() -> None:
    """A v2 Hello may have fields v1 cannot validate; it still learns the version is wrong."""
    import msgspec

    from protocol import CloseCode, ErrorCode, Refused, ServerConnection

    conn = ServerConnection(now=0.0)
    data = msgspec.msgpack.encode({"t": "hello", "v": 2, "token": 17, "device": ["new", "shape"]})
    event = conn.receive(data, 0.0)
    assert isinstance(event, Refused)
    assert event.error.code == ErrorCode.UNSUPPORTED_VERSION
    assert event.close == CloseCode.UNSUPPORTED_VERSION
