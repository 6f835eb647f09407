"""The Python client SDK for trio.

Theory of operation
-------------------
``connect`` opens TCP (TLS for ``wss://``), upgrades with wsproto, sends
Hello and waits for Welcome. A reader task then decodes every server frame
(``protocol.ClientConnection``): replies wake the request that waits for
their id, events go to a bounded channel (``client.events``). If the
application stops reading events, the channel fills, the reader stops
reading the socket and the server eventually cuts the client off as a slow
consumer -- backpressure, never unbounded memory.

One ``_Incoming`` (sans-IO: bytes in; the upgrade's outcome, frames, pings
and the close out, in order) lives for the whole connection. The upgrade,
the wait for Welcome and the reader all take items from it, so whatever a
read carried past the end of one phase -- the resume replay and ``Synced``
in the same read as Welcome, half a frame -- is the next phase's first item,
never lost between them.

Whether the connection may still send is the WebSocket state machine's
answer (``ws.state``), read under the send lock right before encoding: the
reader may have taken the server's close frame while a sender was between
taking the lock and writing, and that sender then gets ``ConnectionClosed``.

``Client`` tracks the last seq the application has received per
conversation (``last_seq``; it moves when the application takes an event
from ``client.events``, never for one still buffered): pass it as ``resume``
to the next ``connect`` and the server replays exactly what was missed.
``ReconnectingClient`` does that by itself, with backoff, and carries sends
across reconnects with their client message ids.
"""

from __future__ import annotations

import contextlib
import ssl
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import msgspec
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
)

from protocol import (
    MAX_SERVER_FRAME_BYTES,
    PROTOCOL_VERSION,
    AnyBody,
    ClientConnection,
    CloseCode,
    Error,
    Hello,
    MessageEvent,
    ProtocolError,
    Reply,
    Send,
    Sent,
    ServerFrameType,
    TextBody,
    Welcome,
)

EVENT_BUFFER = 10_000
"""Events buffered for the application before the reader stops reading."""

RECEIVE_BYTES = 65536
"""Read size from the socket."""

REQUEST_TIMEOUT_S = 30.0
SEND_RETRIES = 5

R = TypeVar("R", bound=ServerFrameType)


class ServerError(Exception):
    """The server answered a request with an Error frame."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error
        self.code = error.code


class ConnectionClosed(Exception):
    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}) {reason}".strip())
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Broken:
    """The server's bytes made no sense: close with ``code``."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class _Eof:
    """The socket closed (no close frame, or nothing after it)."""


_Item = (
    AcceptConnection | RejectConnection | Ping | CloseConnection | ServerFrameType | _Broken | _Eof
)


class _Incoming:
    """Sans-IO: the server's bytes in, in arrival order; items out one at a time.

    Complete WebSocket messages are decoded into frames (the partial one is
    kept across reads, bounded by ``MAX_SERVER_FRAME_BYTES``); pings, the
    close and the upgrade's outcome come out as wsproto events. After a
    ``_Broken`` or ``_Eof`` nothing more is read.
    """

    def __init__(self, ws: WSConnection, conn: ClientConnection) -> None:
        self._ws = ws
        self._conn = conn
        self._partial = bytearray()
        self._items: deque[_Item] = deque()
        self._ended = False

    def pop(self) -> _Item | None:
        return self._items.popleft() if self._items else None

    def feed(self, data: bytes | bytearray) -> None:
        """Bytes read from the socket; ``b""`` is the end of the stream."""
        if self._ended:
            return
        if not data:
            self._end(_Eof())
            return
        self._ws.receive_data(data)  # type: ignore[arg-type]  # bytearray is fine
        for ev in self._ws.events():
            if isinstance(ev, BytesMessage):
                self._partial += ev.data
                if len(self._partial) > MAX_SERVER_FRAME_BYTES:
                    self._end(_Broken(CloseCode.MESSAGE_TOO_BIG, "server frame too big"))
                    return
                if ev.message_finished:
                    try:
                        frame = self._conn.receive(bytes(self._partial))
                    except ProtocolError as exc:
                        self._end(_Broken(CloseCode.PROTOCOL_ERROR, str(exc)[:100]))
                        return
                    self._partial.clear()
                    self._items.append(frame)
            elif isinstance(ev, AcceptConnection | RejectConnection | Ping):
                self._items.append(ev)
            elif isinstance(ev, CloseConnection):
                self._end(ev)
                return
            # Pongs, rejection bodies and text messages carry nothing for us.

    def _end(self, item: _Item) -> None:
        self._items.append(item)
        self._ended = True

    async def next(self, stream: trio.abc.Stream) -> _Item:
        """The next item, reading the socket only when none is buffered."""
        while (item := self.pop()) is None:
            self.feed(await stream.receive_some(RECEIVE_BYTES))
        return item


class _Events(trio.abc.ReceiveChannel[ServerFrameType]):
    """The application's end of the event channel: taking a ``MessageEvent``
    is what moves ``last_seq`` (kept in recency order, most recent last)."""

    def __init__(
        self, inner: trio.MemoryReceiveChannel[ServerFrameType], last_seq: dict[str, int]
    ) -> None:
        self._inner = inner
        self._last_seq = last_seq

    async def receive(self) -> ServerFrameType:
        frame = await self._inner.receive()
        if isinstance(frame, MessageEvent):
            conv, seq = frame.message.conv, frame.message.seq
            if seq > self._last_seq.get(conv, 0):
                self._last_seq.pop(conv, None)
                self._last_seq[conv] = seq
        return frame

    async def aclose(self) -> None:
        await self._inner.aclose()


class PendingReply:
    def __init__(self, client: Client, request_id: int) -> None:
        self.client = client
        self.id = request_id
        self.done = trio.Event()
        self.slot: list[ServerFrameType] = []

    async def result(self) -> Any:
        """The reply (``REQUEST_TIMEOUT_S`` at most; wrap in ``trio.fail_after`` for less)."""
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                await self.done.wait()
        finally:
            self.client._waiting.pop(self.id, None)
        if not self.slot:  # woken by the reader's end
            raise ConnectionClosed(self.client.close_code, self.client.close_reason)
        reply = self.slot[0]
        if isinstance(reply, Error):
            raise ServerError(reply)
        return reply


class Client:
    def __init__(
        self,
        stream: trio.abc.Stream,
        ws: WSConnection,
        welcome: Welcome,
        conn: ClientConnection,
        incoming: _Incoming,
        resume: dict[str, int] | None = None,
    ) -> None:
        self._stream = stream
        self._ws = ws
        self._conn = conn
        self._incoming = incoming
        self.welcome = welcome
        self._send_lock = trio.Lock()
        self._waiting: dict[int, tuple[trio.Event, list[ServerFrameType]]] = {}
        self.last_seq: dict[str, int] = dict(resume or {})
        self._events_in, events_out = trio.open_memory_channel[ServerFrameType](EVENT_BUFFER)
        self.events: trio.abc.ReceiveChannel[ServerFrameType] = _Events(events_out, self.last_seq)
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = trio.Event()

    # -- sending

    async def _send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            # Asked here, under the lock, with no checkpoint before the write:
            # the reader may have taken the server's close while we waited.
            if self.closed.is_set() or self._ws.state is not ConnectionState.OPEN:
                raise ConnectionClosed(self.close_code, self.close_reason or "closing")
            try:
                await self._stream.send_all(self._ws.send(Message(data=data)))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionClosed(self.close_code, "socket closed") from exc

    async def notify(self, frame: msgspec.Struct) -> None:
        """Send a notice (Typing, Delivered): no reply."""
        await self._send_raw(self._conn.send(frame))

    async def request(self, frame: Any) -> Any:
        """Send a request (its ``id`` is assigned here) and return its reply.
        Raises ``ServerError`` for an Error reply."""
        pending = await self.start_request(frame)
        return await pending.result()

    async def start_request(self, frame: Any) -> PendingReply:
        """Send a request now and return a handle to await its reply later:
        pipelining, with send order kept on the wire."""
        frame = msgspec.structs.replace(frame, id=self._conn.next_request_id())
        pending = PendingReply(self, frame.id)
        self._waiting[frame.id] = (pending.done, pending.slot)
        try:
            await self._send_raw(self._conn.send(frame))
        except BaseException:
            self._waiting.pop(frame.id, None)
            raise
        return pending

    async def send(
        self, conv: str, body: AnyBody, *, cmid: str | None = None, retries: int = SEND_RETRIES
    ) -> Sent:
        """Send a message; retried with the same cmid on ``unavailable`` (the server
        dedups, so a retry never stores it twice)."""
        cmid = cmid or uuid.uuid4().hex
        for attempt in range(retries + 1):
            try:
                sent: Sent = await self.request(Send(id=0, conv=conv, cmid=cmid, body=body))
                return sent
            except ServerError as exc:
                if (
                    exc.code not in ("unavailable", "rate_limited", "internal")
                    or attempt == retries
                ):
                    raise
                await trio.sleep(max(exc.error.retry_after_ms, 50) / 1000)
        raise AssertionError("unreachable")

    async def send_text(self, conv: str, text: str, *, cmid: str | None = None) -> Sent:
        return await self.send(conv, TextBody(text=text), cmid=cmid)

    async def aclose(self, code: int = 1000) -> None:
        await self._send_close(code, "")
        await self._stream.aclose()

    async def _send_close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):  # already gone: nothing to say
            async with self._send_lock:
                if self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                    await self._stream.send_all(self._ws.send(CloseConnection(code, reason)))

    # -- receiving

    def _wake_waiter(self, frame: ServerFrameType) -> bool:
        """Hand a reply to its request; False if the frame is an event."""
        if isinstance(frame, Reply | Error) and frame.id is not None and frame.id in self._waiting:
            done, slot = self._waiting[frame.id]
            slot.append(frame)
            done.set()
            return True
        return False

    async def _reader(self) -> None:
        try:
            while True:
                item = await self._incoming.next(self._stream)
                if isinstance(item, Ping):
                    async with self._send_lock:
                        if self._ws.state is ConnectionState.OPEN:
                            await self._stream.send_all(self._ws.send(item.response()))
                elif isinstance(item, CloseConnection):
                    self.close_code, self.close_reason = item.code, item.reason or ""
                    await self._send_close(item.code, "")
                    return
                elif isinstance(item, _Broken):
                    self.close_code, self.close_reason = item.code, item.reason
                    await self._send_close(item.code, item.reason)
                    return
                elif isinstance(item, _Eof):
                    return
                elif isinstance(item, AcceptConnection | RejectConnection):
                    continue  # (only ever the first item: taken by the upgrade)
                elif not self._wake_waiter(item):
                    await self._events_in.send(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            self.closed.set()
            self._events_in.close()
            for done, _ in self._waiting.values():
                done.set()


async def _open_stream(url: str, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if parts.scheme == "wss":
        stream = trio.SSLStream(
            stream, ssl_context or ssl.create_default_context(), server_hostname=host
        )
    return stream


def _target(url: str) -> tuple[str, str]:
    """(Host header, request path) for ``url``."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    return f"{host}:{port}", parts.path or "/ws"


@asynccontextmanager
async def connect(
    url: str,
    token: str,
    *,
    device: str = "py-client",
    resume: dict[str, int] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    handshake_timeout_s: float = 10.0,
    stream: trio.abc.Stream | None = None,
) -> AsyncIterator[Client]:
    """Connect, authenticate, and run the reader for the duration of the block.
    Raises ``ServerError`` if the Hello is refused.

    ``stream``: an already open byte stream to the server (a proxy, a Unix
    socket, a test harness) to use instead of dialling ``url``; ``url`` then
    only names the Host and path of the upgrade. It is closed on exit."""
    if stream is None:
        stream = await _open_stream(url, ssl_context)
    netloc, path = _target(url)
    try:
        ws = WSConnection(ConnectionType.CLIENT)
        conn = ClientConnection()
        incoming = _Incoming(ws, conn)
        with trio.fail_after(handshake_timeout_s):
            await stream.send_all(ws.send(Request(host=netloc, target=path)))
            await _await_upgrade(stream, incoming)
            await stream.send_all(
                ws.send(
                    Message(
                        data=conn.hello(
                            Hello(
                                v=PROTOCOL_VERSION,
                                token=token,
                                device=device,
                                resume=resume or {},
                                agent="imserver-py/0.1",
                            )
                        )
                    )
                )
            )
            welcome = await _await_welcome(stream, ws, incoming)
        client = Client(stream, ws, welcome, conn, incoming, resume)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._reader)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader never raises, so this is the caller's own exception:
            # give it back as it was raised, not wrapped in a group.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _await_upgrade(stream: trio.abc.Stream, incoming: _Incoming) -> None:
    while True:
        item = await incoming.next(stream)
        if isinstance(item, AcceptConnection):
            return
        if isinstance(item, RejectConnection):
            raise ConnectionClosed(item.status_code, "upgrade rejected")
        if isinstance(item, _Eof):
            raise ConnectionClosed(None, "closed during the upgrade")


async def _await_welcome(stream: trio.abc.Stream, ws: WSConnection, incoming: _Incoming) -> Welcome:
    """Items up to Welcome; what came after it stays in ``incoming`` for the reader."""
    while True:
        item = await incoming.next(stream)
        if isinstance(item, Welcome):
            return item
        if isinstance(item, Error):
            raise ServerError(item)
        if isinstance(item, CloseConnection):
            raise ConnectionClosed(item.code, item.reason or "")
        if isinstance(item, _Broken):
            raise ConnectionClosed(item.code, item.reason)
        if isinstance(item, _Eof):
            raise ConnectionClosed(None, "closed during handshake")
        if isinstance(item, Ping):
            await stream.send_all(ws.send(item.response()))
        # Anything else before Welcome is refused by ClientConnection (a _Broken).


RECONNECT_BACKOFF_S: Final = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
MAX_RESUMED_CONVERSATIONS: Final = 1000  # protocol.MAX_RESUME_POINTS


class ReconnectingClient:
    """A client that stays connected: it reconnects with backoff and resumes from
    the last seq the application received in every conversation, so the
    application sees one gapless stream across disconnects. ``send`` survives
    reconnects too (it retries with the same client message id, which the
    server deduplicates).

    ``last_seq`` moves only when the application takes an event from
    ``events`` (persist it to resume in a later process). Reconnects resume
    from the highest seq queued for the application per conversation: what
    is buffered will still be taken, and a replay never queues it twice.
    ``open_stream`` dials the server instead of ``url`` (a proxy, a Unix socket).

    Run it in a nursery: ``await nursery.start(client.run)``.
    """

    def __init__(
        self,
        url: str,
        token: Callable[[], str],
        *,
        device: str = "py-client",
        ssl_context: ssl.SSLContext | None = None,
        open_stream: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.device = device
        self.ssl_context = ssl_context
        self.open_stream = open_stream
        self.last_seq: dict[str, int] = {}
        self._queued: dict[str, int] = {}
        self.connections = 0
        self._current: Client | None = None
        self._changed = trio.Event()
        self._events_in, events_out = trio.open_memory_channel[ServerFrameType](EVENT_BUFFER)
        self.events: trio.abc.ReceiveChannel[ServerFrameType] = _Events(events_out, self.last_seq)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        failures = 0
        started = False
        while True:
            for conv, seq in self.last_seq.items():  # (the application may have set some)
                if seq > self._queued.get(conv, 0):
                    self._queued[conv] = seq
            # From what is queued, not only what was taken: the rest is in the buffer.
            resume = dict(list(self._queued.items())[-MAX_RESUMED_CONVERSATIONS:])
            try:
                stream = await self.open_stream() if self.open_stream is not None else None
                async with connect(
                    self.url,
                    self.token(),
                    device=self.device,
                    resume=resume,
                    ssl_context=self.ssl_context,
                    stream=stream,
                ) as client:
                    failures = 0
                    self.connections += 1
                    self._set_current(client)
                    if not started:
                        started = True
                        task_status.started()
                    async for frame in client.events:
                        if isinstance(frame, MessageEvent):
                            message = frame.message
                            if message.seq <= self._queued.get(message.conv, 0):
                                continue  # replayed, but already queued for the application
                            await self._events_in.send(frame)
                            self._queued.pop(message.conv, None)  # most recent last
                            self._queued[message.conv] = message.seq
                        else:
                            await self._events_in.send(frame)
            except (OSError, ConnectionClosed, trio.BrokenResourceError, trio.TooSlowError):
                failures += 1
            except ServerError as exc:
                if exc.code == "unauthorized":
                    raise  # a new token will not come from retrying
                failures += 1
            finally:
                self._set_current(None)
            await trio.sleep(RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)])

    def _set_current(self, client: Client | None) -> None:
        self._current = client
        self._changed.set()
        self._changed = trio.Event()

    async def client(self) -> Client:
        """The live connection, waiting for one if needed."""
        while True:
            current = self._current
            if current is not None and not current.closed.is_set():
                return current
            await self._changed.wait()

    async def request(self, frame: Any) -> Any:
        while True:
            client = await self.client()
            try:
                return await client.request(frame)
            except ConnectionClosed:
                continue

    async def send(self, conv: str, body: AnyBody, *, cmid: str | None = None) -> Sent:
        cmid = cmid or uuid.uuid4().hex
        while True:
            client = await self.client()
            try:
                return await client.send(conv, body, cmid=cmid)
            except ConnectionClosed:
                continue  # same cmid on the next connection: never stored twice

    async def send_text(self, conv: str, text: str, *, cmid: str | None = None) -> Sent:
        return await self.send(conv, TextBody(text=text), cmid=cmid)
