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

``Client`` tracks the last seq it has seen per conversation (``last_seq``):
pass it as ``resume`` to the next ``connect`` and the server replays exactly
what was missed. ``ReconnectingClient`` does that by itself, with backoff,
and carries sends across reconnects with their client message ids.
"""

from __future__ import annotations

import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import msgspec
import trio
from wsproto import ConnectionType, WSConnection
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
    PROTOCOL_VERSION,
    AnyBody,
    ClientConnection,
    Error,
    Hello,
    MessageEvent,
    Reply,
    Send,
    Sent,
    ServerFrameType,
    TextBody,
    Welcome,
)

EVENT_BUFFER = 10_000
"""Events buffered for the application before the reader stops reading."""

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
    def __init__(self, stream: trio.abc.Stream, ws: WSConnection, welcome: Welcome,
                 conn: ClientConnection, leftover: list[ServerFrameType]) -> None:
        self._stream = stream
        self._ws = ws
        self._conn = conn
        self.welcome = welcome
        self._send_lock = trio.Lock()
        self._waiting: dict[int, tuple[trio.Event, list[ServerFrameType]]] = {}
        self._events_in, self.events = trio.open_memory_channel[ServerFrameType](EVENT_BUFFER)
        self.last_seq: dict[str, int] = {}
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = trio.Event()
        for frame in leftover:
            self._dispatch_nowait(frame)

    # -- sending

    async def _send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            if self.closed.is_set():
                raise ConnectionClosed(self.close_code, self.close_reason)
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

    async def send(self, conv: str, body: AnyBody, *, cmid: str | None = None,
                   retries: int = SEND_RETRIES) -> Sent:
        """Send a message; retried with the same cmid on ``unavailable`` (the server
        dedups, so a retry never stores it twice)."""
        cmid = cmid or uuid.uuid4().hex
        for attempt in range(retries + 1):
            try:
                sent: Sent = await self.request(Send(id=0, conv=conv, cmid=cmid, body=body))
                return sent
            except ServerError as exc:
                if exc.code not in ("unavailable", "rate_limited", "internal") or attempt == retries:
                    raise
                await trio.sleep(max(exc.error.retry_after_ms, 50) / 1000)
        raise AssertionError("unreachable")

    async def send_text(self, conv: str, text: str, *, cmid: str | None = None) -> Sent:
        return await self.send(conv, TextBody(text=text), cmid=cmid)

    async def aclose(self, code: int = 1000) -> None:
        if not self.closed.is_set():
            with contextlib.suppress(Exception):  # already gone: nothing to say
                async with self._send_lock:
                    await self._stream.send_all(self._ws.send(CloseConnection(code=code)))
        await self._stream.aclose()

    # -- receiving

    def _dispatch_nowait(self, frame: ServerFrameType) -> bool:
        """Hand a frame to its waiter; returns False if it is an event to queue."""
        if isinstance(frame, Reply | Error) and frame.id is not None and frame.id in self._waiting:
            done, slot = self._waiting[frame.id]
            slot.append(frame)
            done.set()
            return True
        if isinstance(frame, MessageEvent):
            message = frame.message
            if message.seq > self.last_seq.get(message.conv, 0):
                self.last_seq[message.conv] = message.seq
        return False

    async def _reader(self) -> None:
        pending = bytearray()
        try:
            while True:
                data = await self._stream.receive_some(65536)
                if not data:
                    return
                self._ws.receive_data(data)  # type: ignore[arg-type]  # bytearray is fine
                for ev in self._ws.events():
                    if isinstance(ev, BytesMessage):
                        pending += ev.data
                        if ev.message_finished:
                            frame = self._conn.receive(bytes(pending))
                            pending.clear()
                            if not self._dispatch_nowait(frame):
                                await self._events_in.send(frame)
                    elif isinstance(ev, Ping):
                        async with self._send_lock:
                            await self._stream.send_all(self._ws.send(ev.response()))
                    elif isinstance(ev, CloseConnection):
                        self.close_code, self.close_reason = ev.code, ev.reason or ""
                        with contextlib.suppress(Exception):
                            async with self._send_lock:
                                await self._stream.send_all(self._ws.send(ev.response()))
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            self.closed.set()
            self._events_in.close()
            for done, _ in self._waiting.values():
                done.set()


async def _open_stream(url: str, ssl_context: ssl.SSLContext | None) -> tuple[trio.abc.Stream, str, str]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if parts.scheme == "wss":
        stream = trio.SSLStream(stream, ssl_context or ssl.create_default_context(),
                                server_hostname=host)
    return stream, f"{host}:{port}", parts.path or "/ws"


@asynccontextmanager
async def connect(
    url: str,
    token: str,
    *,
    device: str = "py-client",
    resume: dict[str, int] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    handshake_timeout_s: float = 10.0,
) -> AsyncIterator[Client]:
    """Connect, authenticate, and run the reader for the duration of the block.
    Raises ``ServerError`` if the Hello is refused."""
    stream, netloc, path = await _open_stream(url, ssl_context)
    try:
        ws = WSConnection(ConnectionType.CLIENT)
        conn = ClientConnection()
        with trio.fail_after(handshake_timeout_s):
            await stream.send_all(ws.send(Request(host=netloc, target=path)))
            await _await_upgrade(stream, ws)
            await stream.send_all(ws.send(Message(data=conn.hello(Hello(
                v=PROTOCOL_VERSION, token=token, device=device, resume=resume or {},
                agent="imserver-py/0.1")))))
            welcome, leftover = await _await_welcome(stream, ws, conn)
        client = Client(stream, ws, welcome, conn, leftover)
        client.last_seq.update(resume or {})
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


async def _await_upgrade(stream: trio.abc.Stream, ws: WSConnection) -> None:
    while True:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionClosed(None, "closed during the upgrade")
        ws.receive_data(data)  # type: ignore[arg-type]  # bytearray is fine
        for ev in ws.events():
            if isinstance(ev, RejectConnection):
                raise ConnectionClosed(ev.status_code, "upgrade rejected")
            if isinstance(ev, AcceptConnection):
                return


async def _await_welcome(stream: trio.abc.Stream, ws: WSConnection,
                         conn: ClientConnection) -> tuple[Welcome, list[ServerFrameType]]:
    pending = bytearray()
    welcome: Welcome | None = None
    leftover: list[ServerFrameType] = []
    while welcome is None:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionClosed(None, "closed during handshake")
        ws.receive_data(data)  # type: ignore[arg-type]  # bytearray is fine
        for ev in ws.events():
            if isinstance(ev, RejectConnection):
                raise ConnectionClosed(ev.status_code, "upgrade rejected")
            if isinstance(ev, AcceptConnection):
                continue
            if isinstance(ev, BytesMessage):
                pending += ev.data
                if not ev.message_finished:
                    continue
                frame = conn.receive(bytes(pending))
                pending.clear()
                if isinstance(frame, Error):
                    raise ServerError(frame)
                if isinstance(frame, Welcome):
                    welcome = frame
                else:
                    leftover.append(frame)
            elif isinstance(ev, CloseConnection):
                raise ConnectionClosed(ev.code, ev.reason or "")
    return welcome, leftover


RECONNECT_BACKOFF_S: Final = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
MAX_RESUMED_CONVERSATIONS: Final = 1000  # protocol.MAX_RESUME_POINTS


class ReconnectingClient:
    """A client that stays connected: it reconnects with backoff and resumes from
    the last seq it saw in every conversation, so the application sees one
    gapless stream across disconnects. ``send`` survives reconnects too (it
    retries with the same client message id, which the server deduplicates).

    Run it in a nursery: ``await nursery.start(client.run)``.
    """

    def __init__(self, url: str, token: Callable[[], str], *, device: str = "py-client",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.url = url
        self.token = token
        self.device = device
        self.ssl_context = ssl_context
        self.last_seq: dict[str, int] = {}
        self.connections = 0
        self._current: Client | None = None
        self._changed = trio.Event()
        self._events_in, self.events = trio.open_memory_channel[ServerFrameType](EVENT_BUFFER)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        failures = 0
        started = False
        while True:
            resume = dict(list(self.last_seq.items())[-MAX_RESUMED_CONVERSATIONS:])
            try:
                async with connect(self.url, self.token(), device=self.device, resume=resume,
                                   ssl_context=self.ssl_context) as client:
                    failures = 0
                    self.connections += 1
                    self._set_current(client)
                    if not started:
                        started = True
                        task_status.started()
                    async for frame in client.events:
                        if isinstance(frame, MessageEvent):
                            message = frame.message
                            if message.seq <= self.last_seq.get(message.conv, 0):
                                continue  # already seen before a reconnect
                            self.last_seq[message.conv] = message.seq
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
