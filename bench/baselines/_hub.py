"""The routing core shared by the baseline relays: imserver's protocol subset, in memory.

Theory of operation
-------------------
A baseline must accept exactly the bytes the load generator sends to
imserver, so that all targets are measured with identical payloads; it must
do no more than a bare relay does, so that what it costs is the floor
(transport + codec + routing) imserver's figures are compared with.

The hub is sans-IO and synchronous. An I/O layer (trio + wsproto, or asyncio
+ websockets) wraps each connection in a ``Peer`` (``push`` encoded frame
bytes to it, ``close`` it), calls ``open_session`` on connect,
``Session.on_message`` for each binary WebSocket message and
``Session.closed`` on disconnect. Every reaction is computed and pushed
before ``on_message`` returns; the I/O layer decides how pushes reach the
socket (the trio relay coalesces them per connection, the websockets relay
writes each one to its transport).

What is implemented, and how little:

* ``Hello``: the token is *not verified*. Its claims part (see
  ``imserver.auth``) is decoded without checking the signature, only to learn
  the user, role and shop; then ``Welcome``. A second session with the same
  user and device replaces the first (closed with 4010), as in imserver.
  ``resume`` replays what the in-memory log still holds, then ``Synced``.
* ``OpenConversation``: the customer's conversation with a shop, id derived
  deterministically (``d:<shop>:<user>``), members {customer}.
* ``GetConversation`` -> ``ConversationInfo`` (with ``last_seq``).
* ``UpdateConversation`` with ``agent``: the agent joins (replacing the
  previous agent) -> ``Ok``. ``CreateGroup`` / ``UpdateMembers``: in-memory
  member sets.
* ``Send``: sender must be a member. The ``cmid`` is deduplicated (bounded
  window) so that a retry after a reconnect returns the original seq, as
  imserver promises; otherwise ``seq`` += 1, ``Sent`` goes back at once and
  one encoded ``MessageEvent`` is pushed to every other connection of every
  member (the sender's other devices included).
* ``Ping`` -> ``Pong``; notices are ignored; any other request gets an
  ``Error`` saying the relay does not implement it.

Nothing is durable and nothing is rate limited: no auth, no storage.
Memory per conversation is bounded by ``LOG_RING`` and ``DEDUP_WINDOW``.
"""

from __future__ import annotations

import base64
import itertools
import time
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

import msgspec

from imserver.auth import Claims
from protocol import (
    FRAMES_BURST,
    FRAMES_PER_SECOND,
    HEARTBEAT_INTERVAL_MS,
    IDLE_TIMEOUT_MS,
    MAX_FRAME_BYTES,
    MAX_HISTORY_PAGE,
    MAX_INFLIGHT_REQUESTS,
    MAX_TEXT_CHARS,
    PROTOCOL_VERSION,
    RECALL_WINDOW_MS,
    ClientFrame,
    CloseCode,
    Conversation,
    ConversationInfo,
    ConvKind,
    ConvState,
    CreateGroup,
    Delivered,
    Error,
    ErrorCode,
    FrameError,
    GetConversation,
    Hello,
    Limits,
    Message,
    MessageEvent,
    Ok,
    OpenConversation,
    Ping,
    Pong,
    Request,
    Role,
    Send,
    Sent,
    Synced,
    Typing,
    UpdateConversation,
    UpdateMembers,
    Welcome,
    decode_client_frame,
    encode,
)

LOG_RING: Final = 10_000
"""Recent encoded MessageEvents kept per conversation, for resume."""

DEDUP_WINDOW: Final = 10_000
"""Client message ids remembered per conversation (imserver's DEDUP_WINDOW)."""

OUTBOUND_LIMIT_BYTES: Final = 1024 * 1024
"""Unsent bytes one connection may accumulate before it is cut off as a slow
consumer (imserver's OUTBOUND_BUFFER_BYTES). The I/O layers enforce it."""

WS_PATH: Final = "/ws"
"""The only path a WebSocket upgrade is accepted on."""

_claims_decoder: Final = msgspec.json.Decoder(Claims)


class Peer(Protocol):
    """One client connection, as the I/O layer exposes it to the hub."""

    def push(self, data: bytes) -> None:
        """Queue one encoded server frame (one binary WebSocket message)."""

    def close(self, code: int) -> None:
        """Close the connection with this WebSocket close code."""


def identity_from_token(token: str) -> tuple[str, Role, str] | None:
    """(user, role, shop) from a token's claims, without verifying it (no auth)."""
    _, _, rest = token.partition(".")  # a JWT: header.claims.signature
    body, _, _ = rest.partition(".")
    try:
        claims = _claims_decoder.decode(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, msgspec.DecodeError):
        return None
    return claims.sub, claims.role, claims.shop


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Conv:
    __slots__ = ("cmid_order", "cmids", "info", "log", "members", "seq")

    def __init__(self, info: Conversation, members: set[str]) -> None:
        self.info = info
        self.members = members
        self.seq = 0
        self.log: deque[tuple[int, bytes]] = deque(maxlen=LOG_RING)
        self.cmids: dict[str, tuple[int, int]] = {}  # cmid -> (seq, ts)
        self.cmid_order: deque[str] = deque()


class Session:
    """The hub's state for one connection."""

    __slots__ = ("device", "hub", "peer", "role", "shop", "user")

    def __init__(self, hub: RelayHub, peer: Peer) -> None:
        self.hub = hub
        self.peer = peer
        self.user = ""
        self.role = Role.CUSTOMER
        self.shop = ""
        self.device = ""

    def on_message(self, data: bytes) -> None:
        """One binary WebSocket message from the client."""
        self.hub.on_message(self, data)

    def on_text(self) -> None:
        """A text WebSocket message: this protocol is binary only."""
        self.peer.push(encode(Error(code=ErrorCode.BAD_FRAME, message="binary frames only")))
        self.peer.close(CloseCode.UNSUPPORTED_DATA)

    def closed(self) -> None:
        """The connection is gone."""
        self.hub.forget(self)


_Handler = Callable[["RelayHub", Session, ClientFrame], None]


class RelayHub:
    """Conversations, members and online sessions. See the module docstring."""

    def __init__(self) -> None:
        self._convs: dict[str, _Conv] = {}
        self._online: dict[str, dict[str, Session]] = {}  # user -> device -> session
        self._sessions = itertools.count(1)
        self._groups = itertools.count(1)
        self._limits = Limits(
            max_frame_bytes=MAX_FRAME_BYTES,
            max_text_chars=MAX_TEXT_CHARS,
            frames_per_second=FRAMES_PER_SECOND,
            frames_burst=FRAMES_BURST,
            max_inflight=MAX_INFLIGHT_REQUESTS,
            history_page=MAX_HISTORY_PAGE,
            recall_window_ms=RECALL_WINDOW_MS,
        )

    # ------------------------------------------------------------ sessions

    def open_session(self, peer: Peer) -> Session:
        return Session(self, peer)

    def forget(self, session: Session) -> None:
        devices = self._online.get(session.user)
        if devices is not None and devices.get(session.device) is session:
            del devices[session.device]
            if not devices:
                del self._online[session.user]

    # ------------------------------------------------------------ dispatch

    def on_message(self, session: Session, data: bytes) -> None:
        try:
            frame = decode_client_frame(data)
        except FrameError as exc:
            error = Error(code=exc.code, message=exc.message, id=exc.request_id)
            session.peer.push(encode(error))
            if not session.user:
                session.peer.close(CloseCode.BAD_HANDSHAKE)
            return
        if not session.user:
            if isinstance(frame, Hello):
                self._hello(session, frame)
            else:
                session.peer.push(encode(Error(code=ErrorCode.UNAUTHORIZED, message="hello first")))
                session.peer.close(CloseCode.UNAUTHORIZED)
            return
        handler = _HANDLERS.get(type(frame))
        if handler is not None:
            handler(self, session, frame)
        elif isinstance(frame, Request):
            session.peer.push(
                encode(
                    Error(
                        code=ErrorCode.BAD_FRAME,
                        id=frame.id,
                        message=f"{type(frame).__name__} is not implemented by the baseline relay",
                    )
                )
            )

    # ------------------------------------------------------------ handlers

    def _hello(self, session: Session, hello: Hello) -> None:
        identity = identity_from_token(hello.token)
        if identity is None:
            session.peer.push(
                encode(Error(code=ErrorCode.UNAUTHORIZED, message="unreadable token"))
            )
            session.peer.close(CloseCode.UNAUTHORIZED)
            return
        session.user, session.role, session.shop = identity
        session.device = hello.device
        devices = self._online.setdefault(session.user, {})
        previous = devices.get(hello.device)
        devices[hello.device] = session
        if previous is not None:
            previous.peer.close(CloseCode.SESSION_REPLACED)
        push = session.peer.push
        push(
            encode(
                Welcome(
                    v=PROTOCOL_VERSION,
                    session=f"relay-{next(self._sessions)}",
                    user=session.user,
                    role=session.role,
                    shop=session.shop,
                    server_time=_now_ms(),
                    heartbeat_ms=HEARTBEAT_INTERVAL_MS,
                    idle_timeout_ms=IDLE_TIMEOUT_MS,
                    limits=self._limits,
                )
            )
        )
        if not hello.resume:
            return
        last_seq: dict[str, int] = {}
        for conv_id, after in hello.resume.items():
            conv = self._convs.get(conv_id)
            if conv is None or session.user not in conv.members:
                continue
            if conv.log:
                first = conv.log[0][0]
                for _seq, event in itertools.islice(conv.log, max(0, after + 1 - first), None):
                    push(event)
            last_seq[conv_id] = conv.seq
        push(encode(Synced(last_seq=last_seq)))

    def _ping(self, session: Session, frame: ClientFrame) -> None:
        assert isinstance(frame, Ping)
        session.peer.push(encode(Pong(id=frame.id, server_time=_now_ms())))

    def _open(self, session: Session, frame: ClientFrame) -> None:
        assert isinstance(frame, OpenConversation)
        conv_id = f"d:{frame.shop}:{session.user}"
        conv = self._convs.get(conv_id)
        if conv is None:
            now = _now_ms()
            info = Conversation(
                id=conv_id,
                kind=ConvKind.DIRECT,
                shop=frame.shop,
                state=ConvState.BOT,
                channel=frame.channel,
                customer=session.user,
                created_at=now,
                updated_at=now,
            )
            conv = self._convs[conv_id] = _Conv(info, {session.user})
        session.peer.push(encode(ConversationInfo(id=frame.id, conversation=conv.info)))

    def _update(self, session: Session, frame: ClientFrame) -> None:
        assert isinstance(frame, UpdateConversation)
        conv = self._convs.get(frame.conv)
        if conv is None:
            session.peer.push(
                encode(Error(code=ErrorCode.NOT_FOUND, message="no such conversation", id=frame.id))
            )
            return
        if frame.agent is not None:
            if conv.info.agent is not None and conv.info.agent != conv.info.customer:
                conv.members.discard(conv.info.agent)
            conv.members.add(frame.agent)
            conv.info.agent = frame.agent
        if frame.state is not None:
            conv.info.state = frame.state
        session.peer.push(encode(Ok(id=frame.id)))

    def _get(self, session: Session, frame: ClientFrame) -> None:
        assert isinstance(frame, GetConversation)
        conv = self._convs.get(frame.conv)
        if conv is None or session.user not in conv.members:
            session.peer.push(
                encode(Error(code=ErrorCode.NOT_FOUND, message="no such conversation", id=frame.id))
            )
            return
        conv.info.last_seq = conv.seq
        session.peer.push(encode(ConversationInfo(id=frame.id, conversation=conv.info)))

    def _create_group(self, session: Session, frame: ClientFrame) -> None:
        assert isinstance(frame, CreateGroup)
        conv_id = f"g:{frame.shop}:{next(self._groups)}"
        now = _now_ms()
        info = Conversation(
            id=conv_id,
            kind=ConvKind.GROUP,
            shop=frame.shop,
            state=ConvState.ASSIGNED,
            title=frame.title,
            created_at=now,
            updated_at=now,
        )
        conv = self._convs[conv_id] = _Conv(info, {session.user, *frame.members})
        session.peer.push(encode(ConversationInfo(id=frame.id, conversation=conv.info)))

    def _members(self, session: Session, frame: ClientFrame) -> None:
        assert isinstance(frame, UpdateMembers)
        conv = self._convs.get(frame.conv)
        if conv is None:
            session.peer.push(
                encode(Error(code=ErrorCode.NOT_FOUND, message="no such conversation", id=frame.id))
            )
            return
        conv.members.update(frame.add)
        conv.members.difference_update(frame.remove)
        session.peer.push(encode(Ok(id=frame.id)))

    def _send(self, session: Session, frame: ClientFrame) -> None:
        assert isinstance(frame, Send)
        push = session.peer.push
        conv = self._convs.get(frame.conv)
        if conv is None or session.user not in conv.members:
            push(encode(Error(code=ErrorCode.FORBIDDEN, message="not a member", id=frame.id)))
            return
        seen = conv.cmids.get(frame.cmid)
        if seen is not None:
            push(
                encode(
                    Sent(
                        id=frame.id,
                        conv=frame.conv,
                        cmid=frame.cmid,
                        seq=seen[0],
                        ts=seen[1],
                        duplicate=True,
                    )
                )
            )
            return
        conv.seq += 1
        seq, ts = conv.seq, _now_ms()
        conv.cmids[frame.cmid] = (seq, ts)
        conv.cmid_order.append(frame.cmid)
        if len(conv.cmid_order) > DEDUP_WINDOW:
            del conv.cmids[conv.cmid_order.popleft()]
        event = encode(
            MessageEvent(
                message=Message(
                    conv=frame.conv,
                    seq=seq,
                    sender=session.user,
                    sender_role=session.role,
                    cmid=frame.cmid,
                    ts=ts,
                    body=frame.body,
                )
            )
        )
        conv.log.append((seq, event))
        push(encode(Sent(id=frame.id, conv=frame.conv, cmid=frame.cmid, seq=seq, ts=ts)))
        online = self._online
        for member in conv.members:
            devices = online.get(member)
            if devices is None:
                continue
            for other in devices.values():
                if other is not session:
                    other.peer.push(event)

    def _ignore(self, session: Session, frame: ClientFrame) -> None:
        pass


_HANDLERS: Final[dict[type[ClientFrame], _Handler]] = {
    Send: RelayHub._send,
    Ping: RelayHub._ping,
    OpenConversation: RelayHub._open,
    UpdateConversation: RelayHub._update,
    CreateGroup: RelayHub._create_group,
    UpdateMembers: RelayHub._members,
    GetConversation: RelayHub._get,
    Typing: RelayHub._ignore,
    Delivered: RelayHub._ignore,
}
