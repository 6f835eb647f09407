"""A protocol client for load generation: one WebSocket connection + ``ClientConnection``.

Theory of operation
-------------------
The client must cost as little CPU per message as possible: the load worker
shares the host with the server it measures. So a connection is no task and
no stream, only a plain ``asyncio.Protocol`` (``_Link``) made with
``loop.create_connection`` (uvloop's, in the load workers): everything
happens synchronously in its transport callbacks, with no future per
message. The ``websockets`` *sans-I/O* client (``ClientProtocol``) does the
WebSocket work -- the HTTP upgrade, control frames (it answers pings), text
and fragmented messages, protocol errors, the close handshake -- except on
the hot path: an unfragmented binary data frame is framed and parsed here
(an RFC 6455 header and ``websockets``' C ``apply_mask``), because its
generator-based parser cost about a fifth of the load worker's CPU. The
protocol only ever sees whole frames, so it is always at a frame boundary
when the fast path takes over again.

``ImClient.connect`` opens the TCP connection; the link sends the upgrade
request (no compression, no proxy, no User-Agent, no library pings: the
protocol has its own heartbeat), checks the ``101`` response (anything else:
``ConnectFailed``), sends ``Hello`` with a freshly minted token and waits for
``Welcome`` -- all within ``within_s`` (else ``TimeoutError``; the half-made
connection is aborted either way). When ``Welcome`` is decoded the link
becomes the client's current connection *at once*, inside ``data_received``
(``connects`` counted, ``synced`` cleared, request ids restarted), so frames
that came in the same read (a resume replay) are dispatched as the session's;
``connect`` then returns the ``Welcome``.

Every read is cut into frames (an incomplete one waits for the next read);
each binary message is decoded with ``ClientConnection.receive``, the receive
time taken (``monotonic_ns``) right after, and dispatched:

* ``MessageEvent`` -> ``handler.on_message`` (the hot path: no futures);
* a reply whose id was registered by ``request`` -> that future (setup
  requests: open, assign, create group);
* any other reply or request-bound ``Error`` -> ``handler.on_reply`` (the
  hot path for ``Sent`` and ``Pong``: the scenario keeps its own id table);
* ``Synced`` -> ``synced`` event; any other event (``ConversationEvent``...)
  -> the ``on_event`` callback if one was given, else counted and dropped
  (so are text messages and undecodable ones, in ``other_frames``).

What the protocol has to write back (a pong, the echo of a close frame) is
written at once. A message over ``MAX_INBOUND_BYTES`` fails the connection
(close 1009); once a close frame went either way, the server has
``CLOSE_TIMEOUT_S`` to drop the TCP connection before it is aborted. When
the connection is lost, the requests still waiting fail with
``ConnectionError`` and ``closed`` is set (if the link is still the client's
current connection).

Writes are synchronous (one masked frame, one transport write, no
``await``), so one scheduler task can pace thousands of connections without
being held up by any of them; a write to a connection that is not open is
refused (``write`` returns False) and the caller decides what that means.
Flow control is a bound, not a wait: when the server stops reading and a
connection's unsent bytes pass ``MAX_WRITE_BUFFER`` (``pause_writing``), its
writes are refused until they drain to half that (``resume_writing``).

``abort`` drops the TCP connection without a close handshake (a network
failure, as in a reconnect storm) and refuses writes from then on;
``connect`` may then be called again on the same client, typically with
``resume``. Request ids restart with each connection. ``close`` sends a close
frame and waits up to ``CLOSE_WAIT_S`` for the connection to go.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Final, NamedTuple, Protocol, cast

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidURI
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import BytesLike
from websockets.uri import parse_uri

try:
    from websockets.speedups import apply_mask
except ImportError:  # a build without the C extension
    from websockets.utils import apply_mask

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
"""Largest server message accepted (history pages can exceed the 64 KiB client limit)."""
MAX_WRITE_BUFFER: Final = 256 * 1024
"""Bytes a connection may have unsent before writes are refused (the server stopped reading:
at the 45 frames/s a person may send, some 20 s of them)."""
CLOSE_TIMEOUT_S: Final = 1.0
"""After a close frame went either way: wait this long for the server to drop TCP, then abort."""
CLOSE_WAIT_S: Final = 2.0
"""``close``: longest wait for the connection to be gone."""
MAX_RESPONSE_HEAD: Final = 64 * 1024
"""Longest upgrade response head buffered before handing it all to the protocol (to fail)."""
TOKEN_TTL_S: Final = 3600
CLIENT_AGENT: Final = "imserver-bench-loadgen/1"

_OPEN: Final = State.OPEN
_FIN_BINARY: Final = 0x82
"""First header byte of an unfragmented binary frame (FIN, no RSV bits, opcode 2)."""
_HEAD_SHORT: Final = struct.Struct("!BB")
_HEAD_MEDIUM: Final = struct.Struct("!BBH")
_HEAD_LONG: Final = struct.Struct("!BBQ")
_BINARY: Final = Opcode.BINARY
_TEXT: Final = Opcode.TEXT
_CONT: Final = Opcode.CONT

# _Link stages
_UPGRADING: Final = 0
"""HTTP upgrade request sent, waiting for the 101."""
_HELLO: Final = 1
"""Hello sent, waiting for Welcome."""
_SESSION: Final = 2
"""Welcome received: the client's connection, frames are dispatched."""
_DONE: Final = 3
"""Handshake failed, closing or lost: frames are ignored."""


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


class _Link(asyncio.Protocol):
    """One TCP connection: the WebSocket (sans-I/O protocol + data-frame fast path), one session."""

    def __init__(
        self,
        client: ImClient,
        ws: ClientProtocol,
        conn: ClientConnection,
        hello: bytes,
        welcome: asyncio.Future[Welcome],
    ) -> None:
        self.client = client
        self.ws = ws
        self.conn = conn
        self.hello = hello
        self.welcome = welcome
        """Resolved with the Welcome, or failed with ConnectFailed (connect's waiter)."""
        self.transport: asyncio.Transport | None = None
        self.stage = _UPGRADING
        self.fast = False
        """Frames are scanned here (hello or session stage, ``ws`` at a frame boundary, OPEN)."""
        self.rest: bytearray | None = None
        """Bytes of an incomplete frame (or response head), waiting for more."""
        self.need = 0
        """Length ``rest`` must reach before it is worth scanning again."""
        self.head_fed = False
        """The upgrade response head was given to ``ws``: from now on it sees frames."""
        self.writable = False
        """Session open, no close frame either way, write buffer under its bound."""
        self.paused = False
        self.lost = False
        self.pending: dict[int, asyncio.Future[ServerFrameType]] = {}
        self.handler: Handler = client.handler
        self.fragments: list[bytes] | None = None
        self.fragments_text = False
        self.close_timer: asyncio.TimerHandle | None = None
        self.lost_waiter: asyncio.Future[None] | None = None

    # -- transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=MAX_WRITE_BUFFER, low=MAX_WRITE_BUFFER // 2)
        ws = self.ws
        ws.send_request(ws.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        fast = self.fast  # (a local: mypy would hold the attribute narrowed through the loop)
        if not fast:
            self._slow_data(data)
            return
        rest = self.rest
        if rest is not None:
            rest += data
            if len(rest) < self.need:
                return
            data, self.rest = bytes(rest), None
        pos, end = 0, len(data)
        while end - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            if b1 < 126:
                start, length = pos + 2, b1
            elif b1 == 126:
                if end - pos < 4:
                    break
                start, length = pos + 4, (data[pos + 2] << 8) | data[pos + 3]
            elif b1 == 127:
                if end - pos < 10:
                    break
                start, length = pos + 10, int.from_bytes(data[pos + 2 : pos + 10])
            else:  # a masked frame: the protocol fails the connection
                self._to_protocol(data[pos:])
                return
            stop = start + length
            if b0 == _FIN_BINARY and length <= MAX_INBOUND_BYTES and self.fragments is None:
                if stop > end:
                    break
                self._message(data[start:stop])
            elif length > MAX_INBOUND_BYTES:  # the protocol fails the connection (1009)
                self._to_protocol(data[pos:])
                return
            elif stop > end:
                break
            else:  # control frame, fragment, text...: the sans-I/O protocol, one whole frame
                self._to_protocol(data[pos:stop])
            pos = stop
            if not self.fast:
                if pos < end and self.stage != _DONE:
                    self._to_protocol(data[pos:])
                return
        if pos < end:
            self.rest = bytearray(data[pos:])
            self.need = _frame_size(self.rest)

    def eof_received(self) -> bool | None:
        self.fast = False
        self.ws.receive_eof()
        self._flush()
        self._closing()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.fast = self.writable = False
        self.stage = _DONE
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        client = self.client
        if not self.welcome.done():
            reason = f": {exc!r}" if exc is not None else ""
            self.welcome.set_exception(ConnectFailed(f"{client.user}: closed during hello{reason}"))
        pending = self.pending
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionError(f"{client.user}: connection lost"))
        pending.clear()
        if client._link is self:
            client.closed.set()
        if self.lost_waiter is not None and not self.lost_waiter.done():
            self.lost_waiter.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True
        self.writable = False

    def resume_writing(self) -> None:
        self.paused = False
        self._update_writable()

    # -- reading

    def _message(self, data: BytesLike) -> None:
        """One whole binary message: the session's hot path, or the reply to Hello."""
        if self.stage != _SESSION:
            if self.stage == _HELLO:
                self._hello_reply(data)
            return
        client = self.client
        try:
            frame = self.conn.receive(data)  # type: ignore[arg-type]  # msgspec takes buffers
        except ProtocolError:
            client.other_frames["undecodable"] += 1
            return
        now = time.monotonic_ns()
        if type(frame) is MessageEvent:
            self.handler.on_message(client, frame.message, now)
            return
        request_id = getattr(frame, "id", None)
        if request_id is not None:
            future = self.pending.pop(request_id, None)
            if future is not None:
                if not future.done():
                    future.set_result(frame)
            else:
                self.handler.on_reply(client, frame, now)
        elif type(frame) is Synced:
            client.synced.set()
        elif client.on_event is not None:
            client.on_event(client, frame, now)
        else:
            name = frame.code if isinstance(frame, Error) else type(frame).__name__
            client.other_frames[name] += 1

    def _hello_reply(self, data: BytesLike) -> None:
        user = self.client.user
        try:
            frame = self.conn.receive(bytes(data))
        except ProtocolError as exc:
            self._fail_opening(ConnectFailed(f"{user}: hello refused: {exc}"))
            return
        if not isinstance(frame, Welcome):
            self._fail_opening(ConnectFailed(f"{user}: hello refused: {frame!r}"))
            return
        if self.welcome.done():  # connect gave up meanwhile
            self.stage = _DONE
            self.fast = False
            return
        self.stage = _SESSION
        self.client._start(self, frame)
        self._update_writable()
        self.welcome.set_result(frame)

    def _slow_data(self, data: bytes) -> None:
        """Everything but the fast path: the upgrade, and the end of the connection."""
        if not self.head_fed:
            # The sans-I/O protocol gets the response head alone, so that the frames
            # after it start on a frame boundary for the fast path.
            if self.rest is not None:
                data, self.rest = bytes(self.rest) + data, None
            end = data.find(b"\r\n\r\n")
            if end < 0 and len(data) <= MAX_RESPONSE_HEAD:
                self.rest = bytearray(data)
                return
            end = len(data) if end < 0 else end + 4  # (too long: the protocol fails it)
            self.head_fed = True
            self._to_protocol(data[:end])
            data = data[end:]
            if self.fast:
                if data:
                    self.data_received(data)
                return
        if data and not self.lost:
            self._to_protocol(data)  # a refusal's body; the close handshake; a failure

    def _to_protocol(self, data: bytes | bytearray) -> None:
        """Feed the sans-I/O protocol and handle what it makes of it."""
        ws = self.ws
        ws.receive_data(data)
        events = ws.events_received()
        self._flush()  # pong, close echo, close on error, EOF
        for event in events:
            if type(event) is Frame:
                message = self._assemble(event)
                if message is not None:
                    self._message(message)
            elif isinstance(event, Response) and self.stage == _UPGRADING:
                self._upgraded(event)
            if self.stage == _DONE:
                break
        if ws.state is not _OPEN:
            self.fast = False
            self._closing()

    def _upgraded(self, response: Response) -> None:
        exc = self.ws.handshake_exc
        if exc is not None or response.status_code != 101:
            self._fail_opening(ConnectFailed(f"{self.client.user}: {exc!r}"))
            return
        self.stage = _HELLO
        self.fast = True
        self._send(self.hello)
        self.hello = b""

    def _assemble(self, frame: Frame) -> BytesLike | None:
        """A whole binary message, or None (control frame, text, incomplete fragments)."""
        opcode = frame.opcode
        if opcode is _BINARY or opcode is _TEXT:
            if frame.fin:
                if opcode is _BINARY:
                    return frame.data
                self.client.other_frames["text"] += 1
                return None
            self.fragments, self.fragments_text = [bytes(frame.data)], opcode is _TEXT
            return None
        if opcode is not _CONT or self.fragments is None:
            return None  # ping (answered by the protocol), pong, close
        self.fragments.append(bytes(frame.data))
        if not frame.fin:
            return None
        data, self.fragments = b"".join(self.fragments), None
        if self.fragments_text:
            self.client.other_frames["text"] += 1
            return None
        return data

    def _fail_opening(self, exc: ConnectFailed) -> None:
        """Handshake failed: close politely when possible, and tell connect."""
        self.stage = _DONE
        self.fast = False
        if self.ws.state is _OPEN:
            self.ws.send_close(1000)
            self._flush()
            self._closing()
        else:
            self.abort()
        if not self.welcome.done():
            self.welcome.set_exception(exc)

    # -- writing, closing

    def _send(self, data: bytes) -> None:
        """One binary frame, masked, written now (the state was checked by the caller)."""
        length = len(data)
        if length < 126:
            head = _HEAD_SHORT.pack(_FIN_BINARY, 0x80 | length)
        elif length < 65536:
            head = _HEAD_MEDIUM.pack(_FIN_BINARY, 0x80 | 126, length)
        else:
            head = _HEAD_LONG.pack(_FIN_BINARY, 0x80 | 127, length)
        mask = _masks.next()
        assert self.transport is not None
        self.transport.write(b"".join((head, mask, apply_mask(data, mask))))

    def _flush(self) -> None:
        writes = self.ws.data_to_send()
        transport = self.transport
        if not writes or transport is None or transport.is_closing():
            return
        for data in writes:
            if data:
                transport.write(data)
            elif transport.can_write_eof():  # SEND_EOF: half-close, the protocol is done sending
                with contextlib.suppress(OSError, RuntimeError):  # uvloop: RuntimeError if closed
                    transport.write_eof()
            else:
                transport.close()

    def _update_writable(self) -> None:
        self.writable = (
            self.stage == _SESSION and not self.lost and not self.paused and self.ws.state is _OPEN
        )

    def _closing(self) -> None:
        """A close frame went either way (or the protocol failed): not writable; arm the timer."""
        self._update_writable()
        if self.ws.state is not _OPEN:
            self.fast = False
            if self.stage == _SESSION:
                self.stage = _DONE
        if (
            self.close_timer is None
            and not self.lost
            and self.transport is not None
            and self.ws.close_expected()
        ):
            self.close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, self.abort)

    def close(self) -> None:
        """Start the close handshake (a normal closure)."""
        if self.ws.state is _OPEN and not self.lost:
            self.ws.send_close(1000)
            self._flush()
        self._closing()

    def abort(self) -> None:
        self.fast = self.writable = False
        self.stage = _DONE
        if self.transport is not None:
            self.transport.abort()

    async def wait_lost(self, within_s: float) -> None:
        if self.lost:
            return
        if self.lost_waiter is None:
            self.lost_waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(within_s):
                await asyncio.shield(self.lost_waiter)
        except TimeoutError:
            self.abort()


def _frame_size(data: bytearray) -> int:
    """Bytes needed before the frame at the start of ``data`` can be handled (its header
    first, then all of it; frames over MAX_INBOUND_BYTES only need their header)."""
    if len(data) < 2:
        return 2
    b1 = data[1] & 0x7F
    if b1 < 126:
        return 2 + b1
    head = 4 if b1 == 126 else 10
    if len(data) < head:
        return head
    length = int.from_bytes(data[2:head])
    return head if length > MAX_INBOUND_BYTES else head + length


class _Masks:
    """Masking keys from a pool of ``os.urandom`` bytes (one system call per 1024 frames)."""

    def __init__(self) -> None:
        self.pool = b""
        self.pos = 0

    def next(self) -> bytes:
        pos = self.pos
        if pos >= len(self.pool):
            self.pool, pos = os.urandom(4096), 0
        self.pos = pos + 4
        return self.pool[pos : pos + 4]


_masks = _Masks()


class ImClient:
    """One protocol session at a time; see the module docstring."""

    def __init__(
        self,
        url: str,
        identity: Identity,
        secret: bytes,
        handler: Handler,
        on_event: EventCallback | None = None,
    ) -> None:
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
        self._link: _Link | None = None
        self._conn = ClientConnection()
        self._pending: dict[int, asyncio.Future[ServerFrameType]] = {}

    @property
    def user(self) -> str:
        return self.identity.user

    @property
    def is_open(self) -> bool:
        link = self._link
        return (
            link is not None and not link.lost and link.stage == _SESSION and link.ws.state is _OPEN
        )

    async def connect(
        self, resume: dict[str, int] | None = None, within_s: float = CONNECT_TIMEOUT_S
    ) -> Welcome:
        """Connect, upgrade, Hello, Welcome. Raises ConnectFailed (TimeoutError after within_s)."""
        loop = asyncio.get_running_loop()
        try:
            uri = parse_uri(self.url)
        except InvalidURI as exc:
            raise ConnectFailed(f"{self.user}: {exc}") from exc
        conn = ClientConnection()
        identity = self.identity
        token = mint_token(
            self.secret,
            user=identity.user,
            role=identity.role,
            shop=identity.shop,
            ttl_s=TOKEN_TTL_S,
        )
        hello = conn.hello(
            Hello(
                v=PROTOCOL_VERSION,
                token=token,
                device=identity.device,
                resume=resume or {},
                agent=CLIENT_AGENT,
            )
        )
        ws = ClientProtocol(uri, max_size=MAX_INBOUND_BYTES)
        waiter: asyncio.Future[Welcome] = loop.create_future()
        link = _Link(self, ws, conn, hello, waiter)
        try:
            async with asyncio.timeout(within_s):
                try:
                    await loop.create_connection(
                        lambda: link, uri.host, uri.port, ssl=True if uri.secure else None
                    )
                except OSError as exc:
                    raise ConnectFailed(f"{self.user}: {exc!r}") from exc
                return await waiter
        except BaseException:
            if not waiter.done():
                waiter.cancel()
            link.abort()  # half-made, or made just as the time ran out
            raise

    def _start(self, link: _Link, welcome: Welcome) -> None:
        """Called by the link when Welcome arrives: it is now the current connection."""
        self._link, self._conn, self._pending = link, link.conn, link.pending
        self.welcome = welcome
        self.synced.clear()
        self.closed.clear()
        self.connects += 1

    def next_id(self) -> int:
        return self._conn.next_request_id()

    def write(self, data: bytes) -> bool:
        """Send one encoded frame now; False if the connection is not open (or the server
        has stopped reading it: MAX_WRITE_BUFFER)."""
        link = self._link
        if link is None or not link.writable:
            return False
        link._send(data)
        return True

    def send_request(self, make: Callable[[int], Request]) -> int | None:
        """Build a request with a fresh id and write it; the id, or None if not open."""
        request_id = self._conn.next_request_id()
        return request_id if self.write(self._conn.send(make(request_id))) else None

    async def request(
        self, make: Callable[[int], Request], within_s: float = REQUEST_TIMEOUT_S
    ) -> ServerFrameType:
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
        link = self._link
        if link is not None:
            link.abort()

    async def close(self) -> None:
        """Close handshake, then wait up to CLOSE_WAIT_S for the connection to go."""
        link = self._link
        if link is not None:
            link.close()
            await link.wait_lost(CLOSE_WAIT_S)
