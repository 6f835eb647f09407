"""A protocol client for load generation: one ``websockets`` connection + ``ClientConnection``.

Theory of operation
-------------------
``ImClient.connect`` opens the WebSocket (no compression, no proxy, no
library pings: the protocol has its own heartbeat), sends ``Hello`` with a
freshly minted token and waits for ``Welcome``; then one reader task decodes
every server frame with ``protocol.ClientConnection`` and dispatches it:

* ``MessageEvent`` -> ``handler.on_message`` (the hot path: no futures);
* a reply whose id was registered by ``request`` -> that future (setup
  requests: open, assign, create group);
* any other reply or request-bound ``Error`` -> ``handler.on_reply`` (the
  hot path for ``Sent`` and ``Pong``: the scenario keeps its own id table);
* ``Synced`` -> ``synced`` event; any other event (``ConversationEvent``...)
  -> the ``on_event`` callback if one was given, else counted and dropped.

Writes are synchronous (``websockets``' ``broadcast`` primitive: frame
encoding plus one transport write, no ``await``), so one scheduler task can
pace thousands of connections without being held up by any of them; a
write to a connection that is not open is refused (``write`` returns False)
and the caller decides what that means.

``abort`` drops the TCP connection without a close handshake (a network
failure, as in a reconnect storm); ``connect`` may then be called again,
typically with ``resume``. Request ids restart with each connection.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Final, NamedTuple, Protocol

from websockets.asyncio.client import ClientConnection as WsConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.connection import broadcast
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from imserver.auth import mint_token
from protocol import (
    PROTOCOL_VERSION,
    ClientConnection,
    Error,
    Hello,
    Message,
    MessageEvent,
    ProtocolError,
    Request,
    Role,
    ServerFrameType,
    Synced,
    Welcome,
)

CONNECT_TIMEOUT_S: Final = 15.0
"""TCP connect + WebSocket upgrade + Hello -> Welcome."""
REQUEST_TIMEOUT_S: Final = 15.0
"""Default wait for the reply of a setup request."""
MAX_INBOUND_BYTES: Final = 1024 * 1024
"""Largest server frame accepted (history pages can exceed the 64 KiB client limit)."""
MAX_QUEUE: Final = 1024
"""Received messages websockets buffers before it stops reading the socket."""
TOKEN_TTL_S: Final = 3600
CLIENT_AGENT: Final = "imserver-bench-loadgen/1"


class Identity(NamedTuple):
    user: str
    role: Role
    shop: str
    device: str


class Handler(Protocol):
    def on_message(self, client: ImClient, message: Message, now_ns: int) -> None: ...

    def on_reply(self, client: ImClient, frame: ServerFrameType, now_ns: int) -> None: ...


EventCallback = Callable[["ImClient", ServerFrameType, int], None]
"""(client, event frame, receive time ns): events other than MessageEvent and Synced."""


class RequestFailed(Exception):
    """A setup request was answered with an Error frame."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


class ConnectFailed(Exception):
    """The server refused the Hello or the connection could not be made."""


class ImClient:
    """One protocol session at a time; see the module docstring."""

    def __init__(self, url: str, identity: Identity, secret: bytes, handler: Handler,
                 on_event: EventCallback | None = None) -> None:
        self.url = url
        self.identity = identity
        self.secret = secret
        self.handler = handler
        self.on_event = on_event
        self.welcome: Welcome | None = None
        self.synced = asyncio.Event()
        self.closed = asyncio.Event()
        self.closed.set()
        self.other_frames: Counter[str] = Counter()
        self.connects = 0
        self._ws: WsConnection | None = None
        self._targets: tuple[WsConnection, ...] = ()
        self._conn = ClientConnection()
        self._pending: dict[int, asyncio.Future[ServerFrameType]] = {}
        self._reader: asyncio.Task[None] | None = None

    @property
    def user(self) -> str:
        return self.identity.user

    @property
    def is_open(self) -> bool:
        ws = self._ws
        return ws is not None and ws.protocol.state is State.OPEN

    async def connect(self, resume: dict[str, int] | None = None,
                      within_s: float = CONNECT_TIMEOUT_S) -> Welcome:
        """Connect, Hello, Welcome; start the reader. Raises ConnectFailed."""
        async with asyncio.timeout(within_s):
            try:
                ws = await ws_connect(
                    self.url, compression=None, proxy=None, ping_interval=None,
                    max_size=MAX_INBOUND_BYTES, max_queue=MAX_QUEUE, open_timeout=None,
                    close_timeout=1, user_agent_header=None,
                )
            except (OSError, ConnectionClosed) as exc:
                raise ConnectFailed(f"{self.user}: {exc!r}") from exc
            except Exception as exc:  # websockets.InvalidStatus, InvalidHandshake...
                raise ConnectFailed(f"{self.user}: {exc!r}") from exc
            conn = ClientConnection()
            identity = self.identity
            token = mint_token(self.secret, user=identity.user, role=identity.role,
                               shop=identity.shop, ttl_s=TOKEN_TTL_S)
            hello = Hello(v=PROTOCOL_VERSION, token=token, device=identity.device,
                          resume=resume or {}, agent=CLIENT_AGENT)
            try:
                await ws.send(conn.hello(hello))
                first = await ws.recv()
            except ConnectionClosed as exc:
                raise ConnectFailed(f"{self.user}: closed during hello: {exc}") from exc
            if isinstance(first, str):
                raise ConnectFailed(f"{self.user}: text frame during hello")
            frame = conn.receive(first)
            if not isinstance(frame, Welcome):
                await ws.close()
                raise ConnectFailed(f"{self.user}: hello refused: {frame!r}")
        self._ws, self._targets, self._conn = ws, (ws,), conn
        self.welcome = frame
        self.synced.clear()
        self.closed.clear()
        self.connects += 1
        self._pending = {}
        self._reader = asyncio.get_running_loop().create_task(self._read(ws, conn, self._pending))
        return frame

    def next_id(self) -> int:
        return self._conn.next_request_id()

    def write(self, data: bytes) -> bool:
        """Send one encoded frame now; False if the connection is not open."""
        ws = self._ws
        if ws is None or ws.protocol.state is not State.OPEN:
            return False
        broadcast(self._targets, data)
        return True

    def send_request(self, make: Callable[[int], Request]) -> int | None:
        """Build a request with a fresh id and write it; the id, or None if not open."""
        request_id = self._conn.next_request_id()
        return request_id if self.write(self._conn.send(make(request_id))) else None

    async def request(self, make: Callable[[int], Request],
                      within_s: float = REQUEST_TIMEOUT_S) -> ServerFrameType:
        """A request whose reply is awaited; raises RequestFailed on an Error reply."""
        request_id = self._conn.next_request_id()
        future: asyncio.Future[ServerFrameType] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        if not self.write(self._conn.send(make(request_id))):
            self._pending.pop(request_id, None)
            raise ConnectionError(f"{self.user}: not connected")
        async with asyncio.timeout(within_s):
            reply = await future
        if isinstance(reply, Error):
            raise RequestFailed(reply)
        return reply

    def abort(self) -> None:
        """Drop the TCP connection at once, no close handshake (a network failure)."""
        ws = self._ws
        if ws is not None:
            ws.transport.abort()

    async def close(self) -> None:
        ws = self._ws
        if ws is not None:
            try:
                await ws.close()
            except Exception:  # already gone
                ws.transport.abort()
        if self._reader is not None:
            await asyncio.wait([self._reader], timeout=2)

    async def _read(self, ws: WsConnection, conn: ClientConnection,
                    pending: dict[int, asyncio.Future[ServerFrameType]]) -> None:
        handler = self.handler
        monotonic_ns = time.monotonic_ns
        try:
            async for data in ws:
                if isinstance(data, str):
                    self.other_frames["text"] += 1
                    continue
                try:
                    frame = conn.receive(data)
                except ProtocolError:
                    self.other_frames["undecodable"] += 1
                    continue
                now = monotonic_ns()
                if type(frame) is MessageEvent:
                    handler.on_message(self, frame.message, now)
                    continue
                request_id = getattr(frame, "id", None)
                if request_id is not None:
                    future = pending.pop(request_id, None)
                    if future is not None:
                        if not future.done():
                            future.set_result(frame)
                    else:
                        handler.on_reply(self, frame, now)
                elif type(frame) is Synced:
                    self.synced.set()
                elif self.on_event is not None:
                    self.on_event(self, frame, now)
                else:
                    name = frame.code if isinstance(frame, Error) else type(frame).__name__
                    self.other_frames[name] += 1
        except ConnectionClosed:
            pass
        finally:
            for future in pending.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"{self.user}: connection lost"))
            pending.clear()
            if self._ws is ws:
                self.closed.set()
