"""Baseline relay on imserver's own stack: trio + wsproto, no auth, no storage.

Usage: ``python -m bench.baselines.trio_wsproto_relay --port 0`` prints
``trio_wsproto_relay listening on ws://127.0.0.1:PORT/ws`` once it accepts.

Theory of operation
-------------------
One task reads each connection: ``receive_some`` (up to ``RECEIVE_CHUNK_BYTES``),
feed wsproto, and hand every complete binary message to the shared routing
core (``_hub``), which pushes its reactions to peers synchronously.

Following bench notes (shared/notes/relay-measurements.md), outbound frames
are *coalesced* per connection: ``push`` only appends the wsproto-encoded
frame to the connection's byte buffer and sets its wake-up event; a second
task per connection wakes at most once per scheduler pass and writes
everything accumulated with one ``send_all``. Under load a connection thus
gets one write (one syscall, one task switch) per batch, not per message,
which is the strongest simple form of this stack and the fair floor for
imserver. A connection whose unsent bytes exceed ``OUTBOUND_LIMIT_BYTES`` is
a slow consumer and is cut off (imserver closes those with 4008).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from typing import Final

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
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ._hub import OUTBOUND_LIMIT_BYTES, WS_PATH, RelayHub, Session

NAME: Final = "trio_wsproto_relay"
HOST: Final = "127.0.0.1"
RECEIVE_CHUNK_BYTES: Final = 64 * 1024
"""Read size (imserver's RECEIVE_CHUNK_BYTES)."""
MAX_MESSAGE_BYTES: Final = 64 * 1024
"""Largest reassembled WebSocket message (the protocol's MAX_FRAME_BYTES)."""
LISTEN_BACKLOG: Final = 4096
"""Pending TCP connections (reconnect storms arrive all at once)."""


class TrioPeer:
    """One connection: wsproto state, coalescing outbox, close handling."""

    __slots__ = ("_buffer", "_closing", "_scope", "_stream", "_wake", "ws")

    def __init__(self, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        self.ws = WSConnection(ConnectionType.SERVER)
        self._stream = stream
        self._scope = scope
        self._buffer = bytearray()
        self._wake = trio.Event()
        self._closing = False

    # -- the hub's Peer interface

    def push(self, data: bytes) -> None:
        if self._closing or self.ws.state is not ConnectionState.OPEN:
            return  # pushed by another connection's task after this one ended
        self._buffer += self.ws.send(Message(data=data))
        if len(self._buffer) > OUTBOUND_LIMIT_BYTES:
            self._scope.cancel()  # slow consumer: drop it
            return
        self._wake.set()

    def close(self, code: int) -> None:
        if self._closing:
            return
        with contextlib.suppress(LocalProtocolError):
            self._buffer += self.ws.send(CloseConnection(code=code))
        self._closing = True
        self._wake.set()

    # -- tasks

    def send_raw(self, data: bytes) -> None:
        self._buffer += data
        self._wake.set()

    async def writer(self) -> None:
        """Write whatever has accumulated, one ``send_all`` per wake-up."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self._buffer:
                data = bytes(self._buffer)
                self._buffer.clear()
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._closing = True
                    self._scope.cancel()
                    return
            if self._closing and not self._buffer:
                self._scope.cancel()
                return


async def _reader(
    peer: TrioPeer, stream: trio.SocketStream, open_session: Callable[[TrioPeer], Session]
) -> None:
    ws = peer.ws
    session: Session | None = None
    parts: list[bytes] = []
    size = 0
    while True:
        try:
            data = await stream.receive_some(RECEIVE_CHUNK_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # reset by peer
        try:
            ws.receive_data(data or None)
        except RemoteProtocolError:
            return  # a bad HTTP upgrade request
        for event in ws.events():
            if isinstance(event, BytesMessage):
                if session is None:
                    continue
                if not event.message_finished or parts:
                    parts.append(bytes(event.data))
                    size += len(event.data)
                    if size > MAX_MESSAGE_BYTES:
                        peer.close(1009)
                        return
                    if not event.message_finished:
                        continue
                    payload, parts, size = b"".join(parts), [], 0
                else:
                    payload = bytes(event.data)
                session.on_message(payload)
            elif isinstance(event, Request):
                if event.target != WS_PATH:
                    peer.send_raw(ws.send(RejectConnection(status_code=404)))
                    return
                peer.send_raw(ws.send(AcceptConnection()))
                session = open_session(peer)
            elif isinstance(event, TextMessage):
                if session is not None and event.message_finished:
                    session.on_text()
            elif isinstance(event, Ping):
                peer.send_raw(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    peer.send_raw(ws.send(event.response()))
                return
        if not data:
            return


async def _handle(stream: trio.SocketStream, hub: RelayHub) -> None:
    sessions: list[Session] = []

    def open_session(peer: TrioPeer) -> Session:
        session = hub.open_session(peer)
        sessions.append(session)
        return session

    try:
        async with trio.open_nursery() as nursery:
            peer = TrioPeer(stream, nursery.cancel_scope)
            nursery.start_soon(peer.writer)
            await _reader(peer, stream, open_session)
            peer.close(1000)  # no-op if a close is already under way
    except* (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
        pass  # one connection's failure must never reach serve_listeners
    finally:
        for session in sessions:
            session.closed()
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            await stream.aclose()


async def serve(port: int) -> None:
    hub = RelayHub()
    listeners = await trio.open_tcp_listeners(port, host=HOST, backlog=LISTEN_BACKLOG)
    bound = listeners[0].socket.getsockname()[1]
    print(f"{NAME} listening on ws://{HOST}:{bound}{WS_PATH}", flush=True)

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, hub)

    await trio.serve_listeners(handler, listeners)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args.port)


if __name__ == "__main__":
    main()
