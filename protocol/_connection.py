"""Sans-IO connection state machines, for the server side and the client side.

Theory of operation
-------------------
A connection is fed the payload of each WebSocket message it receives
(``receive``) and returns one *event* saying what that message means; it is
asked for the bytes of each frame to send (``send``). It never touches a
socket or a clock: the caller passes ``now`` (seconds, monotonic) where rate
limiting needs it. The WebSocket layer itself (framing, pings, close
handshake) belongs to the transport; only two of its facts reach us: the
message was text (``receive_text``) or too big (checked here by length).

Server side. The state moves along::

    AWAIT_HELLO --Hello--> AUTHENTICATING --accept()--> OPEN --close()--> CLOSED
         \\                      \\--reject()--> CLOSED
          \\--anything else--> CLOSED (error + close code)

and the reaction to each received frame is looked up in ``_SERVER_TABLE`` by
(state, kind of frame). Besides the table, an OPEN connection enforces three
per-connection bounds: a token bucket on inbound frames, a cap on requests
awaiting their reply (and no two in flight with the same id), and a cap on
consecutive refusals, after which the peer is cut off with 1008. Every
refusal is a ``Refused`` event carrying the encoded ``Error`` frame and,
when the connection must end, the close code.

Client side. ``ClientConnection`` mirrors it: ``hello()`` gives the first
frame's bytes, ``receive()`` decodes server frames and tracks the state
(AWAIT_WELCOME -> OPEN -> CLOSED) and the request ids it handed out.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import msgspec

from ._codec import FrameError, decode_client_frame, decode_server_frame, encode
from ._errors import CloseCode, ErrorCode
from ._frames import (
    NOTICE_TYPES,
    ClientFrameType,
    Error,
    Hello,
    Reply,
    Request,
    ServerFrameType,
    Welcome,
)
from ._limits import (
    FRAMES_BURST,
    FRAMES_PER_SECOND,
    MAX_FRAME_BYTES,
    MAX_INFLIGHT_REQUESTS,
    SUPPORTED_VERSIONS,
)

MAX_REFUSALS_IN_A_ROW: Final = 20
"""Consecutive refused frames (bad, over rate, unauthorised) before close 1008."""


class ConnectionState(enum.Enum):
    AWAIT_HELLO = "await_hello"
    AUTHENTICATING = "authenticating"
    OPEN = "open"
    CLOSED = "closed"


# -------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """Authenticate ``hello.token``, then call ``accept`` or ``reject``."""

    hello: Hello


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """Handle it and ``send`` exactly one reply with the same id."""

    request: Request


@dataclass(frozen=True, slots=True)
class NoticeReceived:
    notice: ClientFrameType


@dataclass(frozen=True, slots=True)
class Refused:
    """Send ``data`` (an encoded Error); if ``close`` is set, then close with it."""

    error: Error
    data: bytes
    close: CloseCode | None


@dataclass(frozen=True, slots=True)
class Ignored:
    """The connection is closed; the frame means nothing any more."""


ServerEvent = HelloReceived | RequestReceived | NoticeReceived | Refused | Ignored


class _Kind(enum.Enum):
    HELLO = "hello"
    REQUEST = "request"
    NOTICE = "notice"
    MALFORMED = "malformed"


def _kind_of(frame: ClientFrameType) -> _Kind:
    if isinstance(frame, Hello):
        return _Kind.HELLO
    if isinstance(frame, Request):
        return _Kind.REQUEST
    assert isinstance(frame, NOTICE_TYPES)
    return _Kind.NOTICE


# ------------------------------------------------------------- token bucket


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def take(self, now: float) -> float:
        """Take one token; return 0 on success, else seconds until one is due."""
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


# ----------------------------------------------------------------- server

_Handler = Callable[["ServerConnection", ClientFrameType | FrameError, float], ServerEvent]


class ServerConnection:
    """The server's view of one client connection. See the module docstring."""

    def __init__(
        self,
        *,
        now: float,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        frames_per_second: float = FRAMES_PER_SECOND,
        frames_burst: float = FRAMES_BURST,
        max_inflight: int = MAX_INFLIGHT_REQUESTS,
    ) -> None:
        self.state = ConnectionState.AWAIT_HELLO
        self.max_frame_bytes = max_frame_bytes
        self.max_inflight = max_inflight
        self.bucket = TokenBucket(frames_per_second, frames_burst, now)
        self.inflight: set[int] = set()
        self.refusals_in_a_row = 0
        self.close_code: CloseCode | None = None

    def set_rate(self, frames_per_second: float, frames_burst: float, now: float) -> None:
        """Per-role rates are known only after authentication."""
        self.bucket = TokenBucket(frames_per_second, frames_burst, now)

    # -- inbound

    def receive(self, data: bytes, now: float) -> ServerEvent:
        """Interpret the payload of one binary WebSocket message."""
        if self.state is ConnectionState.CLOSED:
            return Ignored()
        if len(data) > self.max_frame_bytes:
            return self.receive_too_large(len(data))
        try:
            frame: ClientFrameType | FrameError = decode_client_frame(data)
            kind = _kind_of(frame)  # type: ignore[arg-type]
        except FrameError as exc:
            frame, kind = exc, _Kind.MALFORMED
        handler = _SERVER_TABLE[self.state, kind]
        return handler(self, frame, now)

    def receive_too_large(self, size: int) -> ServerEvent:
        """A binary message over ``max_frame_bytes`` began (a WebSocket layer that
        knows a frame's size from its header refuses it before reading it)."""
        if self.state is ConnectionState.CLOSED:
            return Ignored()
        return self._refuse(
            ErrorCode.TOO_LARGE,
            f"frame of {size} bytes is over the limit of {self.max_frame_bytes}",
            None,
            CloseCode.MESSAGE_TOO_BIG,
        )

    def receive_text(self) -> ServerEvent:
        """A text WebSocket message arrived: this protocol is binary only."""
        if self.state is ConnectionState.CLOSED:
            return Ignored()
        return self._refuse(
            ErrorCode.BAD_FRAME,
            "text messages are not part of this protocol; send binary msgpack frames",
            None,
            CloseCode.UNSUPPORTED_DATA,
        )

    # -- decisions the server makes about the Hello

    def accept(self, welcome: Welcome) -> bytes:
        if self.state is not ConnectionState.AUTHENTICATING:
            raise RuntimeError(f"accept() in state {self.state}")
        self.state = ConnectionState.OPEN
        return encode(welcome)

    def reject(self, code: ErrorCode, message: str, close: CloseCode) -> Refused:
        if self.state is not ConnectionState.AUTHENTICATING:
            raise RuntimeError(f"reject() in state {self.state}")
        return self._refuse(code, message, None, close)

    # -- outbound

    def send(self, frame: ServerFrameType) -> bytes:
        """Encode a frame; a reply (or an Error with an id) completes its request."""
        if isinstance(frame, Reply | Error) and frame.id is not None:
            self.inflight.discard(frame.id)
        return encode(frame)

    def complete(self, request_id: int) -> None:
        """Mark a request answered by bytes encoded elsewhere (shared fan-out buffers)."""
        self.inflight.discard(request_id)

    def close(self, code: CloseCode) -> None:
        self.state = ConnectionState.CLOSED
        self.close_code = code

    # -- table actions

    def _refuse(
        self,
        code: ErrorCode,
        message: str,
        request_id: int | None,
        close: CloseCode | None,
        retry_after_ms: int = 0,
        detail: dict[str, str] | None = None,
    ) -> Refused:
        if request_id in self.inflight:
            # A refused frame is never in flight itself: this id belongs to an earlier
            # request still being handled. Releasing it would let a client exceed the
            # in-flight cap, and echoing it would make the client fail that request.
            request_id = None
        self.refusals_in_a_row += 1
        if close is None and self.refusals_in_a_row >= MAX_REFUSALS_IN_A_ROW:
            close = CloseCode.POLICY_VIOLATION
            message = f"{message} (and {self.refusals_in_a_row} refused frames in a row)"
        if close is not None:
            self.close(close)
        error = Error(
            code=code,
            message=message,
            id=request_id,
            retry_after_ms=retry_after_ms,
            detail=detail or {},
        )
        return Refused(error=error, data=encode(error), close=close)

    def _on_hello(self, frame: ClientFrameType | FrameError, now: float) -> ServerEvent:
        assert isinstance(frame, Hello)
        if frame.v not in SUPPORTED_VERSIONS:
            return self._unsupported(frame.v)
        self.state = ConnectionState.AUTHENTICATING
        return HelloReceived(frame)

    def _unsupported(self, version: int) -> Refused:
        return self._refuse(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported; this server speaks "
            f"{sorted(SUPPORTED_VERSIONS)}",
            None,
            CloseCode.UNSUPPORTED_VERSION,
            detail={"supported": ",".join(str(v) for v in sorted(SUPPORTED_VERSIONS))},
        )

    def _before_hello(self, frame: ClientFrameType | FrameError, now: float) -> ServerEvent:
        if isinstance(frame, FrameError):
            if frame.hello_version is not None and frame.hello_version not in SUPPORTED_VERSIONS:
                return self._unsupported(frame.hello_version)
            return self._refuse(
                ErrorCode.BAD_FRAME,
                f"first frame must be a valid hello: {frame.message}",
                None,
                CloseCode.BAD_HANDSHAKE,
            )
        request_id = frame.id if isinstance(frame, Request) else None
        return self._refuse(
            ErrorCode.UNAUTHORIZED,
            "the first frame must be hello",
            request_id,
            CloseCode.UNAUTHORIZED,
        )

    def _while_authenticating(self, frame: ClientFrameType | FrameError, now: float) -> ServerEvent:
        request_id = (
            frame.request_id if isinstance(frame, FrameError) else getattr(frame, "id", None)
        )
        return self._refuse(
            ErrorCode.UNAUTHORIZED,
            "wait for welcome before sending more frames",
            request_id,
            CloseCode.BAD_HANDSHAKE,
        )

    def _hello_again(self, frame: ClientFrameType | FrameError, now: float) -> ServerEvent:
        if (refused := self._rate_check(None, now)) is not None:
            return refused
        return self._refuse(ErrorCode.BAD_FRAME, "already authenticated", None, None)

    def _on_malformed(self, frame: ClientFrameType | FrameError, now: float) -> ServerEvent:
        assert isinstance(frame, FrameError)
        # Bad frames cost a token too, or junk could be sent at any rate between good frames.
        if (refused := self._rate_check(frame.request_id, now)) is not None:
            return refused
        return self._refuse(frame.code, frame.message, frame.request_id, None)

    def _rate_check(self, request_id: int | None, now: float) -> Refused | None:
        wait = self.bucket.take(now)
        if wait:
            return self._refuse(
                ErrorCode.RATE_LIMITED,
                "too many frames",
                request_id,
                None,
                retry_after_ms=max(1, math.ceil(wait * 1000)),
            )
        return None

    def _on_request(self, frame: ClientFrameType | FrameError, now: float) -> ServerEvent:
        assert isinstance(frame, Request)
        if (refused := self._rate_check(frame.id, now)) is not None:
            return refused
        if frame.id in self.inflight:
            # The Error carries no id (_refuse drops it): the first request owns this id.
            return self._refuse(
                ErrorCode.BAD_FRAME,
                f"request id {frame.id} is already in flight",
                frame.id,
                None,
            )
        if len(self.inflight) >= self.max_inflight:
            return self._refuse(
                ErrorCode.RATE_LIMITED,
                f"more than {self.max_inflight} requests awaiting replies",
                frame.id,
                None,
                retry_after_ms=100,
            )
        self.inflight.add(frame.id)
        self.refusals_in_a_row = 0
        return RequestReceived(frame)

    def _on_notice(self, frame: ClientFrameType | FrameError, now: float) -> ServerEvent:
        assert not isinstance(frame, FrameError)
        if (refused := self._rate_check(None, now)) is not None:
            return refused
        self.refusals_in_a_row = 0
        return NoticeReceived(frame)

    def _closed(self, frame: ClientFrameType | FrameError, now: float) -> ServerEvent:
        return Ignored()


_S = ConnectionState
_K = _Kind
_SERVER_TABLE: Final[dict[tuple[ConnectionState, _Kind], _Handler]] = {
    (_S.AWAIT_HELLO, _K.HELLO): ServerConnection._on_hello,
    (_S.AWAIT_HELLO, _K.REQUEST): ServerConnection._before_hello,
    (_S.AWAIT_HELLO, _K.NOTICE): ServerConnection._before_hello,
    (_S.AWAIT_HELLO, _K.MALFORMED): ServerConnection._before_hello,
    (_S.AUTHENTICATING, _K.HELLO): ServerConnection._while_authenticating,
    (_S.AUTHENTICATING, _K.REQUEST): ServerConnection._while_authenticating,
    (_S.AUTHENTICATING, _K.NOTICE): ServerConnection._while_authenticating,
    (_S.AUTHENTICATING, _K.MALFORMED): ServerConnection._while_authenticating,
    (_S.OPEN, _K.HELLO): ServerConnection._hello_again,
    (_S.OPEN, _K.REQUEST): ServerConnection._on_request,
    (_S.OPEN, _K.NOTICE): ServerConnection._on_notice,
    (_S.OPEN, _K.MALFORMED): ServerConnection._on_malformed,
    (_S.CLOSED, _K.HELLO): ServerConnection._closed,
    (_S.CLOSED, _K.REQUEST): ServerConnection._closed,
    (_S.CLOSED, _K.NOTICE): ServerConnection._closed,
    (_S.CLOSED, _K.MALFORMED): ServerConnection._closed,
}


# ----------------------------------------------------------------- client


class ClientState(enum.Enum):
    AWAIT_WELCOME = "await_welcome"
    OPEN = "open"
    CLOSED = "closed"


class ProtocolError(Exception):
    """The server sent something this client cannot make sense of."""


class ClientConnection:
    """The client's view: builds frames, decodes replies and events.

    ``receive`` returns the decoded frame after updating the state; replies
    are matched to requests by the caller through ``frame.id``.
    """

    def __init__(self) -> None:
        self.state = ClientState.AWAIT_WELCOME
        self.welcome: Welcome | None = None
        self._next_id = 1

    def hello(self, hello: Hello) -> bytes:
        return encode(hello)

    def next_request_id(self) -> int:
        request_id = self._next_id
        self._next_id = 1 if self._next_id >= 2**32 - 1 else self._next_id + 1
        return request_id

    def send(self, frame: msgspec.Struct) -> bytes:
        if self.state is not ClientState.OPEN:
            raise ProtocolError(f"cannot send {type(frame).__name__} in state {self.state}")
        return encode(frame)

    def receive(self, data: bytes) -> ServerFrameType:
        try:
            frame = decode_server_frame(data)
        except FrameError as exc:
            raise ProtocolError(str(exc)) from None
        if self.state is ClientState.AWAIT_WELCOME:
            if isinstance(frame, Welcome):
                self.state = ClientState.OPEN
                self.welcome = frame
            elif isinstance(frame, Error):
                self.state = ClientState.CLOSED
            else:
                raise ProtocolError(f"expected welcome, got {type(frame).__name__}")
        return frame
