"""WebSocket transport on a trio stream: the HTTP upgrade, and a coalescing outbox.

Theory of operation
-------------------
``accept`` reads the HTTP request head (bounded size, bounded time by the
caller). A WebSocket upgrade is completed by wsproto; any other request is
plain HTTP, answered by h11 through the ``http_handler`` callback
(``/metrics``, ``/healthz``) or with ``426 Upgrade Required``.

``SocketReader`` reads a connection. On plain TCP it waits for readability
*first* and then makes one ``recv``: trio's ``receive_some`` tries the
``recv`` first, which on a connection that carries a message every few
milliseconds fails (one more system call and one ``BlockingIOError`` per
message) before it waits anyway. After a read that filled the whole buffer,
more is probably waiting, so the next read is tried at once. TLS streams use
``receive_some``.

``Outbox`` is the only writer of a connection's socket. Producers (replies,
fan-out, control frames) hand it already framed bytes without awaiting. When
nothing is queued and no write is in flight, the bytes go to the (non-blocking)
socket at once -- no task wake-up at all; otherwise, or for what the kernel
did not take, they are queued and one writer task joins whatever has
accumulated into a single ``send_all``: under load, many frames per system
call and per wake-up.
The outbox is bounded: a soft byte bound that may be exceeded for
``SLOW_CONSUMER_GRACE_S`` (a burst of large messages), and hard bounds in
bytes and frames. A producer that would break them marks the peer a slow
consumer instead of waiting for it, and the connection is closed (4008) --
the client resumes without loss. Producers never wait (except bulk replays,
``push_paced``), so one slow reader never delays anyone else.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request

from protocol import CloseCode

from ..limits import (
    MAX_HTTP_REQUEST_BYTES,
    OUTBOUND_BUFFER_BYTES,
    OUTBOUND_BUFFER_FRAMES,
    OUTBOUND_BUFFER_HARD_BYTES,
    RECEIVE_CHUNK_BYTES,
    SEND_TIMEOUT_S,
    SLOW_CONSUMER_GRACE_S,
)

log = logging.getLogger("imserver.gateway")

HttpResponse = tuple[int, str, bytes]
"""(status, content type, body)"""

HttpHandler = Callable[[str], Awaitable[HttpResponse | None]]


class HandshakeFailed(Exception):
    pass


def _is_upgrade(request: h11.Request) -> bool:
    for name, value in request.headers:
        if name == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


async def _respond_http(stream: trio.abc.Stream, status: int, content_type: str, body: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    # h11 needs to have seen a request before it will send a response.
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    if status == 426:
        headers.append(("upgrade", "websocket"))
    data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def accept(
    stream: trio.abc.Stream, http_handler: HttpHandler, *, can_accept: bool = True
) -> tuple[WSConnection, bytes] | None:
    """Complete a WebSocket upgrade; returns wsproto's connection and the bytes
    of the 101 response, or None if the request was plain HTTP (answered)."""
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HTTP_REQUEST_BYTES:
            await _respond_http(stream, 431, "text/plain", b"request head too large\n")
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise HandshakeFailed("connection closed during the HTTP request")
        buffer += chunk
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(bytes(buffer))
    try:
        request = parser.next_event()
    except h11.RemoteProtocolError as exc:
        await _respond_http(stream, 400, "text/plain", b"bad HTTP request\n")
        raise HandshakeFailed(f"bad HTTP: {exc}") from None
    if not isinstance(request, h11.Request):
        await _respond_http(stream, 400, "text/plain", b"bad HTTP request\n")
        raise HandshakeFailed("no HTTP request")
    target = request.target.decode("latin-1")
    if not _is_upgrade(request):
        answer = await http_handler(target)
        if answer is None:
            answer = (426, "text/plain", b"this endpoint speaks WebSocket (binary msgpack frames)\n")
        await _respond_http(stream, *answer)
        return None
    if not can_accept:
        await _respond_http(stream, 503, "text/plain", b"server full or draining\n")
        return None
    ws = WSConnection(ConnectionType.SERVER)
    ws.receive_data(bytes(buffer))
    for ev in ws.events():
        if isinstance(ev, Request):
            return ws, ws.send(AcceptConnection())
        break
    await _respond_http(stream, 400, "text/plain", b"bad WebSocket upgrade\n")
    raise HandshakeFailed("bad WebSocket upgrade")


class SocketReader:
    """The receiving side of one connection. See the module docstring."""

    __slots__ = ("_fd", "_more_likely", "_socket", "_stream")

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        # Plain TCP only: TLS must go through the SSL stream.
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._fd = self._socket.fileno() if self._socket is not None else -1
        self._more_likely = False

    async def receive(self) -> bytes:
        """The next bytes; b"" at end of stream. Raises trio.BrokenResourceError
        (reset) or trio.ClosedResourceError (closed here meanwhile)."""
        fd = self._fd
        if fd < 0:
            return bytes(await self._stream.receive_some(RECEIVE_CHUNK_BYTES))
        if self._more_likely:
            await trio.lowlevel.checkpoint()
            assert self._socket is not None
            if self._socket.fileno() != fd:  # closed meanwhile: never read a reused fd
                raise trio.ClosedResourceError("the connection was closed")
        else:
            await trio.lowlevel.wait_readable(fd)
        while True:
            try:
                data = os.read(fd, RECEIVE_CHUNK_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            except OSError as exc:  # reset by peer, or the fd was closed under us
                raise trio.BrokenResourceError(str(exc)) from exc
            self._more_likely = len(data) == RECEIVE_CHUNK_BYTES
            return data


class Outbox:
    """Bounded, coalescing writer of one connection. See the module docstring."""

    def __init__(self, stream: trio.abc.Stream, ws: WSConnection, *,
                 max_bytes: int = OUTBOUND_BUFFER_BYTES,
                 hard_bytes: int = OUTBOUND_BUFFER_HARD_BYTES,
                 max_frames: int = OUTBOUND_BUFFER_FRAMES) -> None:
        self._stream = stream
        self._ws = ws
        # Plain TCP only: TLS must go through the SSL stream.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._chunks: deque[bytes] = deque()
        self._bytes = 0
        self.max_bytes = max_bytes
        self.hard_bytes = max(hard_bytes, max_bytes)
        self._over_since: float | None = None
        self.max_frames = max_frames
        self._wakeup = trio.Event()
        self._drained = trio.Event()
        self._drained.set()
        self.closing: CloseCode | None = None
        self.done = trio.Event()
        """Set when the writer has finished (close frame written, or the socket died)."""
        self.on_overflow: Callable[[], None] = lambda: None
        self.failed = False
        self.write_started: float | None = None
        """When the socket write in progress began (None: not writing)."""
        """The socket broke or a write timed out (nothing more can be sent)."""

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def push(self, data: bytes) -> bool:
        """Queue framed bytes; False if the connection is closing or overflowed."""
        if self.closing is not None:
            return False
        if self._fd >= 0 and not self._chunks and self.write_started is None:
            # Nothing queued and no write in flight: try the socket now, so that the
            # common case costs no wake-up of the writer task. What the kernel does
            # not take (a full socket buffer) is queued for the writer as usual.
            try:
                written = os.write(self._fd, data)
            except OSError:  # EAGAIN, or a dead peer: the writer finds out
                written = 0
            if written == len(data):
                return True
            data = data[written:]
        size = self._bytes + len(data)
        if size > self.max_bytes:
            now = trio.current_time()
            if self._over_since is None:
                self._over_since = now
            if (size > self.hard_bytes or len(self._chunks) >= self.max_frames
                    or now - self._over_since > SLOW_CONSUMER_GRACE_S):
                self.on_overflow()
                self.close(CloseCode.SLOW_CONSUMER, "slow consumer: outbound buffer full")
                return False
        self._chunks.append(data)
        self._bytes += len(data)
        if self._drained.is_set():
            self._drained = trio.Event()
        self._wakeup.set()
        return True

    async def push_paced(self, data: bytes) -> bool:
        """Queue bytes, first waiting for the buffer to drain below half (for
        bulk replays that must not trip the slow-consumer cut-off)."""
        while self.closing is None and self._bytes > self.max_bytes // 2:
            await self._drained.wait()
        return self.push(data)

    def close(self, code: CloseCode, reason: str = "") -> None:
        """Discard what is queued if the peer is not reading; send a close frame."""
        if self.closing is not None:
            return
        self.closing = code
        if code == CloseCode.SLOW_CONSUMER:
            self._chunks.clear()
            self._bytes = 0
        # wsproto refuses if the peer already closed: then there is nothing to say.
        with contextlib.suppress(Exception):
            self._chunks.append(self._ws.send(CloseConnection(code=int(code), reason=reason[:100])))
        self._wakeup.set()

    def answer_close(self, peer_close: CloseConnection) -> None:
        """The peer sent a close frame (or wsproto saw a protocol error): echo it and finish."""
        if self.closing is not None:
            return
        self.closing = CloseCode.NORMAL
        with contextlib.suppress(Exception):  # wsproto already answered on its own
            self._chunks.append(self._ws.send(peer_close.response()))
        self._wakeup.set()

    def stalled(self, now: float) -> bool:
        """A write has been blocked for over ``SEND_TIMEOUT_S``: the peer stopped reading."""
        return self.write_started is not None and now - self.write_started > SEND_TIMEOUT_S

    async def run(self) -> None:
        """The writer task. Returns after the close frame is written, or when the socket fails."""
        try:
            while True:
                if not self._chunks:
                    if self.closing is not None:
                        return
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    continue
                data = b"".join(self._chunks)
                self._chunks.clear()
                self._bytes = 0
                # No per-write timeout scope (it costs more than the write on a hot
                # path): the session's watchdog reads ``write_started`` instead.
                self.write_started = trio.current_time()
                await self._stream.send_all(data)
                self.write_started = None
                if not self._chunks:
                    self._drained.set()
                if self._bytes <= self.max_bytes:
                    self._over_since = None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.failed = True
        finally:
            self.write_started = None
            self._drained.set()
            self.done.set()
