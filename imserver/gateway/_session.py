"""One client connection: protocol state machine, auth, dispatch, resume.

Theory of operation
-------------------
A session owns two tasks in its own nursery: the reader (``_read_loop``:
WebSocket frames -> ``protocol.ServerConnection`` -> events) and the writer
(``Outbox.run``); deadlines (handshake, idle timeout, stuck writes) are
checked by the server's sweep (``check``). On plain TCP the bytes are read
and processed synchronously in the server's ``ReadMux`` callback
(``_on_readable``), and the reader task only waits, or takes over while a
full shard queue holds the reading back; TLS connections are read by the
task. When the writer finishes -- close frame written, socket dead, or slow
consumer cut off -- it cancels the nursery, so no task outlives the
connection.

Requests never block the reader. Commands about a conversation are
submitted to the shard queue and answered later by the actor through the
hub (``send_frame``); store reads (history, lists) run as tasks in the
session's nursery, bounded by the protocol's in-flight request cap.

Resume. On Hello the session marks each resumed conversation as catching
up (live events for it are buffered) and registers with the hub, then
replays from the store everything after the client's seq, then flushes the
buffered live events above the last replayed seq, then sends ``Synced``.
Every message is committed before it is fanned out, so the store read plus
the buffer cover everything; if the buffer overflows, the session re-reads
the store instead. The converse also holds -- a message can be committed
(and replayed) before its live event arrives -- so live events at or below
the last replayed seq are dropped until the live stream passes it.
"""

from __future__ import annotations

import enum
import logging
import os
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast

import trio
from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from protocol import (
    PROTOCOL_VERSION,
    AgentEvent,
    AgentInfo,
    AgentList,
    ClientFrameType,
    CloseCode,
    ConversationPage,
    CreateGroup,
    Delivered,
    Error,
    ErrorCode,
    GetConversation,
    Hello,
    HelloReceived,
    History,
    HistoryPage,
    Limits,
    ListAgents,
    ListConversations,
    Message,
    MessageEvent,
    NoticeReceived,
    Notify,
    Ok,
    OpenConversation,
    PluginEvent,
    Pong,
    PresenceList,
    Read,
    Recall,
    Refused,
    Request,
    RequestReceived,
    Role,
    Send,
    ServerConnection,
    ServerEvent,
    ServerFrameType,
    SetAgentStatus,
    Subscribe,
    Synced,
    Topic,
    Typing,
    Unsubscribe,
    Unwatch,
    UpdateConversation,
    UpdateMembers,
    WatchPresence,
    Welcome,
    WorkerAck,
    WorkerEvent,
    WorkerEventKind,
    WorkerJoin,
    WorkerJoined,
    encode,
)
from protocol import AgentStatus as AgentStatusEnum
from protocol import (
    Ping as PingRequest,
)

from .. import policy
from ..auth import TokenError, TokenVerifier
from ..dispatch import Instance
from ..limits import (
    CATCHUP_BUFFER,
    CLOSE_LINGER_S,
    CLOSE_SEND_TIMEOUT_S,
    FRAMES_BURST,
    FRAMES_PER_SECOND,
    HANDSHAKE_TIMEOUT_S,
    HEARTBEAT_INTERVAL_MS,
    IDLE_TIMEOUT_MS,
    MAX_AGENT_LIST,
    MAX_DEVICES_PER_USER,
    MAX_FRAME_BYTES,
    MAX_HISTORY_PAGE,
    MAX_INFLIGHT_REQUESTS,
    MAX_OPEN_CONVERSATIONS_PER_CUSTOMER,
    MAX_SERVER_FRAME_BYTES,
    MAX_TEXT_CHARS,
    MAX_WATCHED_USERS,
    OUTBOUND_BUFFER_BYTES,
    RECALL_WINDOW_MS,
    RECEIVE_CHUNK_BYTES,
    RESUME_BATCH,
    WORKER_FRAMES_BURST,
    WORKER_FRAMES_PER_SECOND,
    WORKER_HEARTBEAT_MS,
    WORKER_IDLE_TIMEOUT_MS,
)
from ..logs import event, now_ms
from ..metrics import METRICS
from ..shards import (
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
    ShardQueue,
    TypingCmd,
    UpdateCmd,
    customer_view,
)
from ..store import PageRead, PutAgent, PutShop, PutStaff, PutUsedToken, Scope, Store
from ._frame import binary_frame, ends_on_frame_boundary, split_plain_frames
from ._ids import direct_conversation_id, group_conversation_id
from ._opens import OpenRate
from ._readmux import ReadMux
from ._websocket import Outbox

if TYPE_CHECKING:
    from ..dispatch import WorkerDispatcher
    from ..fanout import Hub

log = logging.getLogger("imserver.session")


@dataclass
class GatewayContext:
    """What sessions share: the engines and the server's state."""

    store: Store
    shards: ShardQueue
    hub: Hub
    verifier: TokenVerifier
    dispatcher: WorkerDispatcher
    read_mux: ReadMux
    """Reads the plain-TCP connections (TLS ones have a reader task each)."""
    idle_timeout_ms: int = IDLE_TIMEOUT_MS
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    outbound_buffer_bytes: int = OUTBOUND_BUFFER_BYTES
    close_send_timeout_s: float = CLOSE_SEND_TIMEOUT_S
    close_linger_s: float = CLOSE_LINGER_S
    draining: bool = False
    sessions: set[Session] = field(default_factory=set)
    known_shops: set[str] = field(default_factory=set)
    """Shops seen registered (a shop is never unregistered); others are looked up."""
    open_rate: OpenRate = field(default_factory=OpenRate)

    async def shop_registered(self, shop: str) -> bool:
        if shop in self.known_shops:
            return True
        if await self.store.shop_exists(shop):
            self.known_shops.add(shop)
            return True
        return False

    async def register_shops(self, shops: list[str]) -> None:
        """Register ``shops`` (``serve --shops``); known ones change nothing."""
        if shops:
            await self.store.write([PutShop(name=shop, ts=now_ms()) for shop in shops])
            self.known_shops.update(shops)


class Session:
    def __init__(
        self,
        ctx: GatewayContext,
        stream: trio.abc.Stream,
        ws: ServerProtocol,
        outbox: Outbox,
        early: bytes = b"",
    ) -> None:
        self.ctx = ctx
        self.stream = stream
        self.ws = ws
        self.outbox = outbox
        self._early = early
        """Bytes that came with the HTTP request head: read before the socket."""
        self.id = secrets.token_hex(8)
        self.identity: policy.Identity | None = None
        self.conn = ServerConnection(now=trio.current_time())
        self.last_inbound = self.created_at = trio.current_time()
        self.idle_timeout_ms = ctx.idle_timeout_ms
        self.heartbeat_ms = min(HEARTBEAT_INTERVAL_MS, ctx.idle_timeout_ms // 3)
        self._nursery: trio.Nursery | None = None
        self._catchup: dict[str, list[tuple[int, bytes]] | None] = {}
        self._replayed: dict[str, int] = {}
        """conv -> last seq replayed, until the live stream has passed it."""
        self._reading = True
        self._blocked: list[AnyCommand] = []
        self._frames: deque[Frame] = deque()
        """Received frames not processed yet (reading waits for room meanwhile)."""
        self._partial = bytearray()
        """The fragments of a binary message received so far."""
        self._plain = True
        """The library is at a frame boundary: plain chunks may skip it (``_frame``)."""
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        """Plain TCP (read by the mux); -1 for TLS (read by the session task)."""
        self._mux_wake = trio.Event()
        self._mux_result: _ReadResult = _CONTINUE
        self._worker: Instance | None = None
        self._leaving = False
        """``close`` has scheduled ``_leave``."""
        self._read_scope = trio.CancelScope()
        """Around the read loop: cancelled by ``close`` (see ``run``)."""
        self.quiet = trio.Event()
        """Set when no request awaits its reply (drain waits for it)."""
        outbox.on_overflow = self._slow_consumer

    # -- Peer interface (used by the hub)

    @property
    def user(self) -> str:
        return self.identity.user if self.identity else ""

    def send_frame(self, frame: ServerFrameType) -> None:
        if isinstance(frame, Error):
            METRICS.errors.labels(code=str(frame.code)).inc()
        self.outbox.push(binary_frame(self.conn.send(frame)))
        if not self.conn.inflight:
            self.quiet.set()

    async def wait_quiet(self) -> None:
        """Until every request received so far has its reply queued."""
        while self.conn.inflight:
            self.quiet = trio.Event()
            await self.quiet.wait()

    def push_event(self, conv: str, seq: int, data: bytes) -> None:
        if seq and conv in self._catchup:
            buffered = self._catchup[conv]
            if buffered is not None:
                if len(buffered) < CATCHUP_BUFFER:
                    buffered.append((seq, data))
                else:
                    self._catchup[conv] = None  # overflow: re-read the store instead
            return
        if seq and (floor := self._replayed.get(conv)) is not None:
            # Fan-out runs after the commit, so the replay may have read messages
            # whose live events arrive only now: drop those, once.
            if seq <= floor:
                return
            del self._replayed[conv]  # live events come in seq order: no more late ones
        self.outbox.push(data)

    # -- lifecycle

    async def run(self) -> None:
        METRICS.connections.inc()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write_then_stop, nursery.cancel_scope)
                peer_done = False
                with self._read_scope:  # close() cancels it: a blocked read never holds us
                    peer_done = await self._read_loop()
                self.close(CloseCode.NORMAL)
                await self._linger(peer_done)
                nursery.cancel_scope.cancel()
        finally:
            METRICS.connections.dec()
            self.ctx.sessions.discard(self)
            self._leave()
            if self.identity is not None:
                await self._after_logout(self.identity)
            # Bounded: a TLS close_notify is a write to a peer that may not read.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.ctx.close_send_timeout_s
                await self.stream.aclose()

    def close(self, code: CloseCode, reason: str = "") -> None:
        """Close from our side: queue the close frame, stop reading, leave the
        hub (presence goes offline now, not when the socket is released).
        ``run`` then releases the connection within a bounded time (``_linger``)."""
        if self.outbox.closing is None:
            METRICS.closes.labels(code=str(int(code))).inc()
        self.conn.close(code)
        self.outbox.close(code, reason)
        self._reading = False
        self._read_scope.cancel()
        if not self._leaving:
            # Not synchronously: close() may be called by the hub or the dispatcher
            # while they iterate over their peers (a fan-out that overflows this one).
            self._leaving = True
            trio.lowlevel.current_trio_token().run_sync_soon(self._leave_now)

    def _slow_consumer(self) -> None:
        """The outbox overflowed: close here, not just in the outbox, so that the
        read loop stops and the connection is released in bounded time."""
        METRICS.slow_consumers.inc()
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer: outbound buffer full")

    def _leave_now(self) -> None:
        try:
            self._leave()
        except Exception as exc:  # a bug: it must not reach trio's run loop
            event(log, "leave_failed", level=logging.ERROR, session=self.id, error=repr(exc))

    def _leave(self) -> None:
        """Out of the hub and the worker dispatcher (idempotent)."""
        if self._worker is not None:
            self.ctx.dispatcher.leave(self)
        if self.identity is not None:
            self.ctx.hub.unregister(self)

    def _nursery_cancel(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _write_then_stop(self, scope: trio.CancelScope) -> None:
        await self.outbox.run()
        if self.outbox.closing is None or self.outbox.failed:
            scope.cancel()  # the socket died: nothing left to read or say

    async def _linger(self, peer_done: bool) -> None:
        """After the close: let the writer write the close frame (and what was
        queued before it) for at most ``close_send_timeout_s``; then, unless the
        peer has closed already, read (and ignore) until its close or EOF for at
        most ``close_linger_s``, so that it reads our close frame instead of a
        TCP reset. A peer that never reads, answers or sends FIN holds the
        socket no longer than the two together."""
        ctx = self.ctx
        with trio.move_on_after(ctx.close_send_timeout_s):
            await self.outbox.done.wait()
        if peer_done or not self.outbox.done.is_set() or self.outbox.failed:
            return  # nothing to wait for, or a peer that does not even read
        with trio.move_on_after(ctx.close_linger_s):
            while True:
                try:
                    data = await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                self.ws.receive_data(data)
                if any(frame.opcode is Opcode.CLOSE for frame in _frames(self.ws)):
                    return

    def check(self, now: float) -> None:
        """Deadlines, checked by the server's sweep (one task for all connections,
        not a timer task per connection): Hello in time, idle timeout, a socket
        write stuck because the peer stopped reading."""
        if self.outbox.closing is not None:
            return
        if self.identity is None:
            if now - self.created_at > self.ctx.handshake_timeout_s:
                self.close(CloseCode.BAD_HANDSHAKE, "no hello in time")
            return
        if now - self.last_inbound > self.idle_timeout_ms / 1000:
            self.close(CloseCode.IDLE_TIMEOUT, "idle timeout")
        elif self.outbox.stalled(now):
            event(log, "send_stalled", level=logging.WARNING, session=self.id)
            METRICS.slow_consumers.inc()
            self.close(CloseCode.SLOW_CONSUMER, "not reading")
            self._nursery_cancel()

    async def _read_loop(self) -> bool:
        """Returns True if the peer ended the connection, False if we did.

        Plain TCP connections are read by the server's ``ReadMux`` (no task
        wake per message); this task only takes over while the reading waits
        for room in a shard queue. TLS connections are read here."""
        data, self._early = self._early, b""
        if data:
            result = await self._until_done(self._feed(data))
            if result is not _CONTINUE:
                return result is _PEER_DONE
        if self._fd >= 0:
            return await self._read_via_mux(self.ctx.read_mux)
        while self._reading:
            try:
                data = bytes(
                    await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
                )  # TLS: a bytearray
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return True
            if not data:
                return True
            self.last_inbound = trio.current_time()
            result = await self._until_done(self._feed(data))
            if result is not _CONTINUE:
                return result is _PEER_DONE
        return False

    async def _read_via_mux(self, mux: ReadMux) -> bool:
        while self._reading:
            self._mux_result = _CONTINUE
            self._mux_wake = trio.Event()
            try:
                mux.add(self._fd, self._on_readable)
            except trio.ClosedResourceError:  # the server is stopping
                return True
            try:
                await self._mux_wake.wait()
            finally:
                mux.remove(self._fd)
            result = await self._until_done(self._mux_result)
            if result is not _CONTINUE:
                return result is _PEER_DONE
        return False

    def _on_readable(self) -> None:
        """The mux's callback: read once, process, and hand over to the session
        task when reading must wait or is over."""
        result = _WE_CLOSED
        try:
            if self._reading:
                try:
                    data = os.read(self._fd, RECEIVE_CHUNK_BYTES)
                except BlockingIOError:
                    return
                except OSError:  # reset by peer
                    data = b""
                if data:
                    self.last_inbound = trio.current_time()
                    result = self._feed(data)
                    if result is _CONTINUE:
                        return
                else:
                    result = _PEER_DONE
        except Exception as exc:  # a bug must not take the mux (every connection) down
            event(log, "read_failed", level=logging.ERROR, session=self.id, error=repr(exc))
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
            result = _WE_CLOSED
        self._mux_result = result
        self._mux_wake.set()

    async def _until_done(self, result: _ReadResult) -> _ReadResult:
        """Wait for room for the commands the frames produced (backpressure: no
        reading meanwhile), then go on with the frames left."""
        while result is _BLOCKED:
            while self._blocked:
                await self.ctx.shards.put(self._blocked.pop(0))
            result = self._process_frames()
        return result

    def _feed(self, data: bytes) -> _ReadResult:
        """Bytes from the socket: parse and process their frames."""
        ws = self.ws
        if self._plain and ws.current_size is None:
            payloads = split_plain_frames(data, MAX_FRAME_BYTES)
            if payloads is not None:  # the common case (see _frame): no library parse
                return self._process_payloads(payloads)
            # The library takes this chunk; it stays at a frame boundary (so the
            # plain path may resume) only if the chunk ends on one.
            self._plain = ends_on_frame_boundary(data)
        ws.receive_data(data)
        self._frames.extend(_frames(ws))
        return self._process_frames()

    def _process_payloads(self, payloads: list[bytes]) -> _ReadResult:
        for index, payload in enumerate(payloads):
            result = self._deliver(payload)
            if result is not _CONTINUE:
                # Keep the rest as frames for _process_frames (after the wait).
                self._frames.extend(Frame(Opcode.BINARY, p) for p in payloads[index + 1 :])
                return result
        return _CONTINUE

    def _deliver(self, payload: bytes) -> _ReadResult:
        """One whole binary message: a protocol frame."""
        METRICS.hot.frames_in += 1
        self._handle(self.conn.receive(payload, trio.current_time()))
        if self._blocked:  # backpressure: stop reading until queued
            return _BLOCKED
        if self.outbox.closing is not None:  # we refused and closed
            return _WE_CLOSED
        return _CONTINUE

    def _process_frames(self) -> _ReadResult:
        ws = self.ws
        frames = self._frames
        pending = self._partial
        while frames:
            frame = frames.popleft()
            opcode = frame.opcode
            if opcode is Opcode.BINARY or opcode is Opcode.CONT:
                if frame.fin and not pending:
                    frame_bytes = frame.data  # the common case: no copying
                    if type(frame_bytes) is not bytes:
                        frame_bytes = bytes(frame_bytes)
                else:
                    pending += frame.data  # the library bounds the whole message
                    if not frame.fin:
                        continue
                    frame_bytes = bytes(pending)
                    pending.clear()
                result = self._deliver(frame_bytes)
                if result is not _CONTINUE:
                    return result
            elif opcode is Opcode.TEXT:
                self._handle(self.conn.receive_text())
                return _WE_CLOSED
            elif opcode is Opcode.CLOSE:  # the library has queued its echo
                self.conn.close(CloseCode.NORMAL)
                self.outbox.finish(ws.data_to_send())
                return _PEER_DONE
            # PING: the library has queued the PONG; PONG: nothing to do.
        failure = ws.parser_exc
        if failure is not None:  # a protocol violation: the library closes (1002, 1009)
            if isinstance(failure, PayloadTooBig):  # our Error first, then its 1009
                self._handle(self.conn.receive_too_large(failure.size or 0))
            else:
                self.conn.close(CloseCode.PROTOCOL_ERROR)
            self.outbox.finish(ws.data_to_send())
            return _PEER_DONE
        for reply in ws.data_to_send():  # pongs
            if reply:
                self.outbox.push(reply)
        return _CONTINUE

    # -- protocol events

    def _handle(self, ev: ServerEvent) -> None:
        if isinstance(ev, RequestReceived):
            if self.ctx.draining:
                self.send_frame(
                    Error(
                        code=ErrorCode.UNAVAILABLE,
                        message="server draining",
                        id=ev.request.id,
                        retry_after_ms=1000,
                    )
                )
                return
            assert self.identity is not None
            if not policy.may_attempt(type(ev.request), self.identity):
                self.send_frame(
                    Error(
                        code=ErrorCode.FORBIDDEN,
                        id=ev.request.id,
                        message=f"a {self.identity.role} may not {ev.request.__struct_config__.tag}",
                    )
                )
                return
            try:
                _REQUEST_HANDLERS[type(ev.request)](self, ev.request)
            except Exception as exc:  # a bug must not take the connection down
                event(log, "request_failed", level=logging.ERROR, error=repr(exc))
                self.send_frame(
                    Error(code=ErrorCode.INTERNAL, message="internal error", id=ev.request.id)
                )
        elif isinstance(ev, NoticeReceived):
            self._notice(ev.notice)
        elif isinstance(ev, HelloReceived):
            self._hello(ev.hello)
        elif isinstance(ev, Refused):
            METRICS.errors.labels(code=str(ev.error.code)).inc()
            self.outbox.push(binary_frame(ev.data))
            if not self.conn.inflight:
                self.quiet.set()
            if ev.close is not None:
                self.close(ev.close, ev.error.message)

    def _hello(self, hello: Hello) -> None:
        try:
            claims = self.ctx.verifier.verify(hello.token)
        except TokenError as exc:
            self._handle(self.conn.reject(ErrorCode.UNAUTHORIZED, str(exc), CloseCode.UNAUTHORIZED))
            return
        if self.ctx.draining:
            self._handle(
                self.conn.reject(ErrorCode.UNAVAILABLE, "server draining", CloseCode.GOING_AWAY)
            )
            return
        who = policy.Identity(
            user=claims.sub,
            role=claims.role,
            shop=claims.shop,
            session=self.id,
            device=hello.device,
            plugin=claims.plugin,
        )
        self.identity = who
        assert self._nursery is not None
        if claims.once:  # refused from memory from now on; stored for after a restart
            self._nursery.start_soon(self._store_used_token, claims.jti, claims.exp)
        if who.role in (Role.AGENT, Role.SUPERVISOR):  # the shop's agents (assignees)
            self._nursery.start_soon(self._store_staff, who)
        if who.role in (Role.WORKER, Role.ADMIN):
            self.conn.set_rate(WORKER_FRAMES_PER_SECOND, WORKER_FRAMES_BURST, trio.current_time())
        if who.role is Role.WORKER:
            self.idle_timeout_ms = min(self.idle_timeout_ms, WORKER_IDLE_TIMEOUT_MS)
            self.heartbeat_ms = min(self.heartbeat_ms, WORKER_HEARTBEAT_MS)
        welcome = Welcome(
            v=PROTOCOL_VERSION,
            session=self.id,
            user=who.user,
            role=who.role,
            shop=who.shop,
            server_time=now_ms(),
            heartbeat_ms=self.heartbeat_ms,
            idle_timeout_ms=self.idle_timeout_ms,
            limits=Limits(
                max_frame_bytes=MAX_FRAME_BYTES,
                max_text_chars=MAX_TEXT_CHARS,
                frames_per_second=self.conn.bucket.rate
                if who.role in (Role.WORKER, Role.ADMIN)
                else FRAMES_PER_SECOND,  # type: ignore[arg-type]
                frames_burst=self.conn.bucket.burst
                if who.role in (Role.WORKER, Role.ADMIN)
                else FRAMES_BURST,  # type: ignore[arg-type]
                max_inflight=MAX_INFLIGHT_REQUESTS,
                history_page=MAX_HISTORY_PAGE,
                recall_window_ms=RECALL_WINDOW_MS,
            ),
        )
        self.outbox.push(binary_frame(self.conn.accept(welcome)))
        # Catch-up marks must be in place before registering: from here on every
        # live message event for these conversations is buffered, not lost.
        for conv in hello.resume:
            self._catchup[conv] = []
        others = self.ctx.hub.register(self)
        for other in others:
            if (
                isinstance(other, Session)
                and other.identity
                and other.identity.device == who.device
            ):
                other.close(CloseCode.SESSION_REPLACED, "logged in again from the same device")
        live = [o for o in others if isinstance(o, Session) and o.outbox.closing is None]
        for oldest in live[: max(0, len(live) + 1 - MAX_DEVICES_PER_USER)]:
            oldest.close(CloseCode.SESSION_REPLACED, "too many devices")
        event(
            log,
            "login",
            user=who.user,
            role=who.role.value,
            session=self.id,
            device=hello.device,
            resume=len(hello.resume),
        )
        assert self._nursery is not None
        self._nursery.start_soon(self._resume, dict(hello.resume))

    async def _store_used_token(self, jti: str, exp: int) -> None:
        try:
            await self.ctx.store.write([PutUsedToken(jti=jti, exp=exp)])
        except Exception as exc:  # the in-memory refusal still holds until a restart
            event(log, "used_token_not_stored", level=logging.ERROR, error=repr(exc))

    async def _store_staff(self, who: policy.Identity) -> None:
        try:
            await self.ctx.store.write(
                [PutStaff(shop=who.shop, user=who.user, role=who.role, ts=now_ms())]
            )
        except Exception as exc:
            event(log, "staff_not_stored", level=logging.ERROR, error=repr(exc))

    async def _resume(self, points: dict[str, int]) -> None:
        who = self.identity
        assert who is not None
        synced: dict[str, int] = {}
        for conv_id, after in points.items():
            try:
                last = await self._replay(who, conv_id, after)
            except Exception as exc:
                event(log, "resume_failed", level=logging.ERROR, conv=conv_id, error=repr(exc))
                self.close(CloseCode.INTERNAL_ERROR, "resume failed; reconnect")
                return
            finally:
                self._catchup.pop(conv_id, None)
            if last is not None:
                synced[conv_id] = last
        self.send_frame(Synced(last_seq=synced))

    async def _replay(self, who: policy.Identity, conv_id: str, after: int) -> int | None:
        """Replay ``conv_id`` after ``after``; the last seq sent, or None if not readable."""
        store = self.ctx.store
        last = after
        while True:
            while True:
                page = await store.read_page(
                    conv_id, user=who.user, before=None, after=last, limit=RESUME_BATCH
                )
                if not _readable(who, page):
                    return None
                for message in page.messages:
                    data = binary_frame(encode(MessageEvent(message=message)))
                    if not await self.outbox.push_paced(data):
                        return last  # closing: the client resumes again from what it saw
                    last = message.seq
                if not page.more:
                    break
            buffered = self._catchup.get(conv_id)
            if buffered is None:
                self._catchup[conv_id] = []  # overflowed: read the store again
                continue
            for seq, data in buffered:
                if seq > last:
                    self.outbox.push(data)
                    last = seq
            self._replayed[conv_id] = last
            return last

    async def _after_logout(self, who: policy.Identity) -> None:
        if who.role is not Role.AGENT or self.ctx.hub.is_online(who.user):
            return
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            try:
                await self.ctx.store.write(
                    [
                        PutAgent(
                            shop=who.shop,
                            agent=who.user,
                            status=AgentStatusEnum.OFFLINE,
                            ts=now_ms(),
                        )
                    ]
                )
            except Exception as exc:
                event(log, "agent_offline_failed", level=logging.WARNING, error=repr(exc))
                return
            self._agent_changed(who, AgentStatusEnum.OFFLINE)

    # -- requests

    def _origin(self, request: Request) -> dict[str, Any]:
        assert self.identity is not None
        return {"who": self.identity, "reply": ReplyTo(self.id, request.id)}

    def _submit(self, cmd: AnyCommand) -> None:
        if not self.ctx.shards.submit(cmd):
            self._blocked.append(cmd)  # the read loop waits for room before reading on

    def _spawn(
        self, request: Request, handler: Callable[[Any], Awaitable[ServerFrameType]]
    ) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._guarded, request, handler)

    async def _guarded(
        self, request: Request, handler: Callable[[Any], Awaitable[ServerFrameType]]
    ) -> None:
        try:
            reply = await handler(request)
        except Exception as exc:
            reply = _failure(request, exc)
        self.send_frame(reply)

    def _recall(self, r: Recall) -> None:
        self._submit(RecallCmd(conv=r.conv, seq=r.seq, **self._origin(r)))

    def _read(self, r: Read) -> None:
        self._submit(ReadCmd(conv=r.conv, seq=r.seq, **self._origin(r)))

    def _get(self, r: GetConversation) -> None:
        self._submit(GetCmd(conv=r.conv, **self._origin(r)))

    def _members(self, r: UpdateMembers) -> None:
        self._submit(
            MembersCmd(conv=r.conv, add=r.add, remove=r.remove, role=r.role, **self._origin(r))
        )

    def _update(self, r: UpdateConversation) -> None:
        self._submit(
            UpdateCmd(
                conv=r.conv,
                state=r.state,
                agent=r.agent,
                priority=r.priority,
                tags_add=r.tags_add,
                tags_remove=r.tags_remove,
                note=r.note,
                key=r.key,
                if_state=r.if_state,
                if_agent=r.if_agent,
                **self._origin(r),
            )
        )

    def _spawn_history(self, r: History) -> None:
        self._spawn(r, self._history)

    def _spawn_list(self, r: ListConversations) -> None:
        self._spawn(r, self._list)

    def _spawn_list_agents(self, r: ListAgents) -> None:
        self._spawn(r, self._list_agents)

    def _spawn_agent_status(self, r: SetAgentStatus) -> None:
        self._spawn(r, self._agent_status)

    def _spawn_worker_join(self, r: WorkerJoin) -> None:
        self._spawn(r, self._worker_join)

    def _spawn_notify(self, r: Notify) -> None:
        self._spawn(r, self._notify)

    def _spawn_open(self, r: OpenConversation) -> None:
        self._spawn_submit(r, self._open)

    def _spawn_create_group(self, r: CreateGroup) -> None:
        self._spawn_submit(r, self._create_group)

    def _spawn_subscribe(self, r: Subscribe) -> None:
        self._spawn(r, self._subscribe)

    def _spawn_watch(self, r: WatchPresence) -> None:
        self._spawn(r, self._watch)

    def _spawn_submit(
        self, request: Request, check: Callable[[Any], Awaitable[AnyCommand]]
    ) -> None:
        """Checks that need the store, then a command for an actor (which replies)."""
        assert self._nursery is not None
        self._nursery.start_soon(self._check_then_submit, request, check)

    async def _check_then_submit(
        self, request: Request, check: Callable[[Any], Awaitable[AnyCommand]]
    ) -> None:
        try:
            cmd = await check(request)
        except Exception as exc:
            self.send_frame(_failure(request, exc))
            return
        if not self.ctx.shards.submit(cmd):
            try:
                await self.ctx.shards.put(cmd)
            except (trio.ClosedResourceError, trio.BrokenResourceError):  # stopping
                self.send_frame(
                    Error(code=ErrorCode.UNAVAILABLE, message="server stopping", id=request.id)
                )

    async def _registered(self, shop: str) -> None:
        if not await self.ctx.shop_registered(shop):
            raise _Refuse(ErrorCode.UNKNOWN_SHOP, f"no shop {shop!r} is registered here")

    def _ping(self, request: PingRequest) -> None:
        self.send_frame(Pong(id=request.id, server_time=now_ms()))

    def _send(self, request: Send) -> None:
        self._submit(
            SendCmd(
                conv=request.conv, cmid=request.cmid, body=request.body, **self._origin(request)
            )
        )

    async def _open(self, request: OpenConversation) -> AnyCommand:
        who = self.identity
        assert who is not None
        if not policy.shop_access(OpenConversation, who, request.shop):
            raise _Refuse(ErrorCode.FORBIDDEN, "only customers open direct conversations")
        wait = self.ctx.open_rate.take(who.user, trio.current_time())
        if wait:
            raise _Refuse(
                ErrorCode.RATE_LIMITED,
                "opening conversations too fast",
                retry_after_ms=int(wait * 1000) + 1,
            )
        await self._registered(request.shop)
        conv = direct_conversation_id(request.shop, who.user)
        store = self.ctx.store
        if await store.find_open_direct(request.shop, who.user) is None and (
            await store.count_open_direct(who.user, MAX_OPEN_CONVERSATIONS_PER_CUSTOMER)
            >= MAX_OPEN_CONVERSATIONS_PER_CUSTOMER
        ):
            raise _Refuse(
                ErrorCode.RATE_LIMITED,
                f"{MAX_OPEN_CONVERSATIONS_PER_CUSTOMER} conversations are open already:"
                " close one first",
            )
        return OpenDirectCmd(
            conv=conv, shop=request.shop, channel=request.channel, **self._origin(request)
        )

    async def _create_group(self, request: CreateGroup) -> AnyCommand:
        who = self.identity
        assert who is not None
        if not policy.can_create_group(who, request.shop):
            raise _Refuse(ErrorCode.FORBIDDEN, "only staff of the shop create groups")
        await self._registered(request.shop)
        return CreateGroupCmd(
            conv=group_conversation_id(),
            shop=request.shop,
            title=request.title,
            members=request.members,
            **self._origin(request),
        )

    async def _history(self, request: History) -> ServerFrameType:
        who = self.identity
        assert who is not None
        page = await self.ctx.store.read_page(
            request.conv,
            user=who.user,
            before=request.before,
            after=request.after,
            limit=request.limit,
        )
        if not _readable(who, page):
            raise _Refuse(ErrorCode.NOT_FOUND, f"no conversation {request.conv!r}")
        messages, more = page.messages, page.more
        # Long texts can make a full page too big for one frame: cut it at the far end
        # of the paging direction and say there is more.
        backwards = request.after is None
        budget = MAX_SERVER_FRAME_BYTES - 1024
        kept: list[Message] = []
        for message in reversed(messages) if backwards else messages:
            budget -= len(encode(message))
            if budget < 0:
                more = True
                break
            kept.append(message)
        if backwards:
            kept.reverse()
        return HistoryPage(id=request.id, conv=request.conv, messages=kept, has_more=more)

    async def _list(self, request: ListConversations) -> ServerFrameType:
        who = self.identity
        assert who is not None
        convs, more = await self.ctx.store.list_conversations(
            Scope.for_role(who.role, who.user, who.shop),
            state=request.state,
            updated_before=request.updated_before,
            before_id=request.before_id,
            limit=request.limit,
        )
        if who.role is Role.CUSTOMER:
            convs = [customer_view(c) for c in convs]
        return ConversationPage(id=request.id, conversations=convs, has_more=more)

    async def _agent_status(self, request: SetAgentStatus) -> ServerFrameType:
        who = self.identity
        assert who is not None
        if who.role not in (Role.AGENT, Role.SUPERVISOR):
            raise _Refuse(ErrorCode.FORBIDDEN, "only agents have an agent status")
        await self.ctx.store.write(
            [PutAgent(shop=who.shop, agent=who.user, status=request.status, ts=now_ms())]
        )
        self._agent_changed(who, request.status)
        return Ok(id=request.id)

    async def _list_agents(self, request: ListAgents) -> ServerFrameType:
        who = self.identity
        assert who is not None
        shop = request.shop or who.shop
        if shop in ("", "*"):
            raise _Refuse(ErrorCode.BAD_FRAME, "name the shop")
        if not policy.shop_access(ListAgents, who, shop):
            raise _Refuse(ErrorCode.FORBIDDEN, f"you may not list the agents of {shop}")
        records = await self.ctx.store.list_agents(shop)
        records.sort(key=lambda r: r.agent)
        agents = [
            AgentInfo(
                agent=r.agent,
                status=r.status,
                since=r.ts,
                connected=self.ctx.hub.is_online(r.agent),
            )
            for r in records[:MAX_AGENT_LIST]
        ]
        return AgentList(
            id=request.id, shop=shop, agents=agents, truncated=len(records) > MAX_AGENT_LIST
        )

    def _agent_changed(self, who: policy.Identity, status: AgentStatusEnum) -> None:
        self.ctx.hub.broadcast_shop(
            who.shop, Topic.AGENTS, AgentEvent(shop=who.shop, agent=who.user, status=status)
        )
        self.ctx.dispatcher.broadcast(
            WorkerEventKind.AGENT,
            WorkerEvent(
                event_id=0,
                shard=0,
                kind=WorkerEventKind.AGENT,
                ts=now_ms(),
                agent=who.user,
                agent_status=status,
                shop=who.shop,
            ),
        )

    async def _watch(self, request: WatchPresence) -> ServerFrameType:
        who = self.identity
        assert who is not None
        if self.ctx.hub.watched_count(self) + len(request.users) > MAX_WATCHED_USERS:
            raise _Refuse(ErrorCode.TOO_LARGE, f"more than {MAX_WATCHED_USERS} watched users")
        users = list(dict.fromkeys(request.users))
        related = set() if who.all_shops else await self._shop_users(who.shop, users)
        strangers = [u for u in users if not policy.user_access(WatchPresence, who, u in related)]
        if strangers:
            raise _Refuse(
                ErrorCode.FORBIDDEN, f"not users of your shop: {', '.join(strangers)[:200]}"
            )
        return PresenceList(id=request.id, presences=self.ctx.hub.watch(self, users))

    async def _shop_users(self, shop: str, users: list[str]) -> set[str]:
        """Those of ``users`` who belong to ``shop`` (``policy.users_of_shop``)."""
        return await policy.users_of_shop(shop, users, online=self.ctx.hub, known=self.ctx.store)

    async def _subscribe(self, request: Subscribe) -> ServerFrameType:
        who = self.identity
        assert who is not None
        shop = request.shop or who.shop
        if shop in ("", policy.ALL_SHOPS):
            raise _Refuse(ErrorCode.BAD_FRAME, "name the shop to subscribe to")
        if not policy.shop_access(Subscribe, who, shop, topics=request.topics):
            raise _Refuse(
                ErrorCode.FORBIDDEN,
                f"you may not subscribe to {', '.join(request.topics)} of {shop}",
            )
        await self._registered(shop)
        for topic in request.topics:
            self.ctx.hub.subscribe(self, shop, topic)
        return Ok(id=request.id)

    def _unwatch(self, request: Unwatch) -> None:
        self.ctx.hub.unwatch(self, request.users)
        self.send_frame(Ok(id=request.id))

    def _unsubscribe(self, request: Unsubscribe) -> None:
        who = self.identity
        assert who is not None
        shop = request.shop or who.shop
        for topic in request.topics:
            self.ctx.hub.unsubscribe(self, shop, topic)
        self.send_frame(Ok(id=request.id))

    # -- notices

    def _notice(self, notice: ClientFrameType) -> None:
        who = self.identity
        assert who is not None
        if not policy.may_attempt(type(notice), who):
            self.send_frame(
                Error(
                    code=ErrorCode.FORBIDDEN,
                    message=f"a {who.role} may not send {type(notice).__name__}",
                )
            )
            return
        if isinstance(notice, Typing):
            self._submit(TypingCmd(conv=notice.conv, who=who))
        elif isinstance(notice, Delivered):
            self._submit(DeliveredCmd(conv=notice.conv, seq=notice.seq, who=who))
        elif isinstance(notice, WorkerAck):
            self.ctx.dispatcher.ack(self, notice.ids)

    # -- workers

    async def _worker_join(self, request: WorkerJoin) -> ServerFrameType:
        who = self.identity
        assert who is not None
        if not policy.self_access(WorkerJoin, who, plugin=request.plugin):
            raise _Refuse(
                ErrorCode.FORBIDDEN,
                f"this token may join plugin {who.plugin!r} only"
                if who.plugin
                else "this token names no plugin to join",
            )
        if self._worker is not None:
            raise _Refuse(ErrorCode.CONFLICT, "this connection already joined a plugin")
        self._worker = await self.ctx.dispatcher.join(
            self, request.plugin, request.kinds, shop=who.shop
        )
        return WorkerJoined(
            id=request.id,
            instance=self._worker.id,
            shards=self._worker.shards,
            shard_count=self.ctx.dispatcher.shard_count,
        )

    async def _notify(self, request: Notify) -> ServerFrameType:
        who = self.identity
        assert who is not None
        targets = [t for t in (request.conv, request.user, request.shop) if t is not None]
        if len(targets) != 1:
            raise _Refuse(ErrorCode.BAD_FRAME, "name exactly one of conv, user, shop")
        plugin = self._worker.plugin if self._worker else who.user
        frame = PluginEvent(plugin=plugin, kind=request.kind, data=request.data, conv=request.conv)
        hub = self.ctx.hub
        store = self.ctx.store
        if request.conv is not None:
            conv = await store.get_conversation(request.conv)
            members = await store.get_members(request.conv) if conv is not None else {}
            if conv is None or not policy.can_read(who, conv, members):
                raise _Refuse(ErrorCode.NOT_FOUND, f"no conversation {request.conv!r}")
            if not policy.conversation_access(Notify, who, conv, members):
                raise _Refuse(ErrorCode.FORBIDDEN, "you may not notify this conversation")
            hub.publish(conv, members, frame, topic=None)
        elif request.user is not None:
            related = who.all_shops or request.user in await self._shop_users(
                who.shop, [request.user]
            )
            if not policy.user_access(Notify, who, related):
                raise _Refuse(ErrorCode.FORBIDDEN, "not a user of your shop")
            hub.send_to_user(request.user, frame)
        else:
            assert request.shop is not None
            if not policy.shop_access(Notify, who, request.shop):
                raise _Refuse(ErrorCode.FORBIDDEN, "not a worker of that shop")
            hub.broadcast_shop(request.shop, Topic.DASHBOARD, frame)
        return Ok(id=request.id)


class _ReadResult(enum.Enum):
    CONTINUE = "continue"
    BLOCKED = "blocked"
    """A shard queue is full: wait for room, then process the frames left."""
    PEER_DONE = "peer done"
    WE_CLOSED = "we closed"


_CONTINUE: Final = _ReadResult.CONTINUE
_BLOCKED: Final = _ReadResult.BLOCKED
_PEER_DONE: Final = _ReadResult.PEER_DONE
_WE_CLOSED: Final = _ReadResult.WE_CLOSED


def _frames(ws: ServerProtocol) -> list[Frame]:
    """The frames received (after the upgrade the library produces nothing else)."""
    return cast(list[Frame], ws.events_received())


def _readable(who: policy.Identity, page: PageRead) -> bool:
    conv = page.conversation
    members = {} if page.member_role is None else {who.user: page.member_role}
    return conv is not None and policy.can_read(who, conv, members)


class _Refuse(Exception):
    def __init__(self, code: ErrorCode, message: str, *, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


def _failure(request: Request, exc: Exception) -> Error:
    """The reply to a request whose handler raised: its refusal, or an internal error (logged)."""
    if isinstance(exc, _Refuse):
        return Error(
            code=exc.code, message=exc.message, id=request.id, retry_after_ms=exc.retry_after_ms
        )
    event(
        log,
        "request_failed",
        level=logging.ERROR,
        request=type(request).__name__,
        error=repr(exc),
    )
    return Error(code=ErrorCode.INTERNAL, message="internal error", id=request.id)


# Request type -> handler. One table for every session (a per-session table of
# bound methods would cost kilobytes per connection).
_REQUEST_HANDLERS: dict[type, Callable[[Session, Any], None]] = {
    PingRequest: Session._ping,
    Send: Session._send,
    Recall: Session._recall,
    Read: Session._read,
    GetConversation: Session._get,
    OpenConversation: Session._spawn_open,
    CreateGroup: Session._spawn_create_group,
    UpdateMembers: Session._members,
    UpdateConversation: Session._update,
    History: Session._spawn_history,
    ListConversations: Session._spawn_list,
    SetAgentStatus: Session._spawn_agent_status,
    ListAgents: Session._spawn_list_agents,
    WatchPresence: Session._spawn_watch,
    Subscribe: Session._spawn_subscribe,
    Unwatch: Session._unwatch,
    Unsubscribe: Session._unsubscribe,
    WorkerJoin: Session._spawn_worker_join,
    Notify: Session._spawn_notify,
}
