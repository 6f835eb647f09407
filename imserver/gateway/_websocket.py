"""WebSocket transport on a trio stream: the HTTP upgrade, and a coalescing outbox.

Theory of operation
-------------------
``accept`` reads the HTTP request head (bounded size, bounded time by the
caller) and parses it with h11. A WebSocket upgrade is validated and
completed by the sans-I/O ``websockets.server.ServerProtocol``, which then
frames the connection (it parses a client frame about three times faster than
wsproto, measured in bench; wsproto stays in the trio client SDK). Any other
request is plain HTTP, answered by h11 through the ``http_handler`` callback
(``/metrics``, ``/healthz``) or with ``426 Upgrade Required``. Bytes that
arrived after the request head (a client that sends its Hello without
waiting for the 101) are handed to the session, not lost.

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
from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple

import h11
import trio
from websockets.http11 import Request as WsRequest
from websockets.server import ServerProtocol

from protocol import MAX_FRAME_BYTES, CloseCode

from ..limits import (
    MAX_HTTP_REQUEST_BYTES,
    OUTBOUND_BUFFER_BYTES,
    OUTBOUND_BUFFER_FRAMES,
    OUTBOUND_BUFFER_HARD_BYTES,
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


async def _respond_http(
    stream: trio.abc.Stream, status: int, content_type: str, body: bytes
) -> None:
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


class Upgraded(NamedTuple):
    ws: ServerProtocol
    """Frames the connection from now on (state OPEN)."""
    response: bytes
    """The 101 response, to be written first."""
    early: bytes
    """What the client sent after its request head, to be read first."""


async def accept(
    stream: trio.abc.Stream, http_handler: HttpHandler, *, can_accept: bool = True
) -> Upgraded | None:
    """Complete a WebSocket upgrade, or answer a plain HTTP request (None)."""
    buffer = bytearray()
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HTTP_REQUEST_BYTES:
            await _respond_http(stream, 431, "text/plain", b"request head too large\n")
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise HandshakeFailed("connection closed during the HTTP request")
        buffer += chunk
    head, early = bytes(buffer[: end + 4]), bytes(buffer[end + 4 :])
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(head)
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
            answer = (
                426,
                "text/plain",
                b"this endpoint speaks WebSocket (binary msgpack frames)\n",
            )
        await _respond_http(stream, *answer)
        return None
    if not can_accept:
        await _respond_http(stream, 503, "text/plain", b"server full or draining\n")
        return None
    # The library checks each message's declared size before reading it, so an
    # oversized frame is never buffered (the session reports it: too_large, 1009).
    ws = ServerProtocol(max_size=MAX_FRAME_BYTES)
    ws.receive_data(head)
    events = ws.events_received()
    if len(events) == 1 and isinstance(events[0], WsRequest):
        response = ws.accept(events[0])  # a 4xx response if the upgrade is not valid
        ws.send_response(response)
        data = b"".join(ws.data_to_send())
        if response.status_code == 101:
            return Upgraded(ws, data, early)
        await stream.send_all(data)
        raise HandshakeFailed(f"bad WebSocket upgrade: {response.status_code}")
    await _respond_http(stream, 400, "text/plain", b"bad WebSocket upgrade\n")
    raise HandshakeFailed("bad WebSocket upgrade")


class Outbox:
    """Bounded, coalescing writer of one connection. See the module docstring."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws: ServerProtocol,
        *,
        max_bytes: int = OUTBOUND_BUFFER_BYTES,
        hard_bytes: int = OUTBOUND_BUFFER_HARD_BYTES,
        max_frames: int = OUTBOUND_BUFFER_FRAMES,
    ) -> None:
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
            if (
                size > self.hard_bytes
                or len(self._chunks) >= self.max_frames
                or now - self._over_since > SLOW_CONSUMER_GRACE_S
            ):
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
        # Refused if a close frame was already sent or received: nothing to say then.
        with contextlib.suppress(Exception):
            self._ws.send_close(int(code), reason[:100])
        self._queue_protocol_output(self._ws.data_to_send())
        self._wakeup.set()

    def finish(self, output: Iterable[bytes]) -> None:
        """The WebSocket layer ended the connection (the peer's close frame,
        echoed; or a protocol violation, answered with 1002 or 1009): write
        what it produced and finish."""
        if self.closing is not None:
            return
        self.closing = CloseCode.NORMAL
        self._queue_protocol_output(output)
        self._wakeup.set()

    def _queue_protocol_output(self, output: Iterable[bytes]) -> None:
        for data in output:
            if data:  # b"" is the library's "half-close now": the writer closes anyway
                self._chunks.append(data)
                self._bytes += len(data)

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
