"""Baseline relay: trio + the sans-I/O layer of ``websockets``, no auth, no storage.

Usage: ``python -m bench.baselines.trio_sansio_relay --port 0`` prints
``trio_sansio_relay listening on ws://127.0.0.1:PORT/ws`` once it accepts.

Theory of operation
-------------------
imserver's own I/O stack without imserver: trio streams, and the same
WebSocket layer imserver's gateway uses (``websockets.server.ServerProtocol``,
sans-I/O) instead of wsproto. Otherwise as ``trio_wsproto_relay``: one task
reads each connection and hands every complete binary message to the shared
routing core (``_hub``); outbound frames are coalesced per connection and a
second task per connection writes them with one ``send_all`` per wake-up.
Control frames (pings, the close handshake) are the library's. It is the
bare relay imserver's peak-sale ceiling is compared with (issue 9: "ceiling
at p99 < 500 ms >= the trio + websockets-sans-I/O relay of the same run").
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Final

import trio
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from ._hub import OUTBOUND_LIMIT_BYTES, WS_PATH, RelayHub, Session

NAME: Final = "trio_sansio_relay"
HOST: Final = "127.0.0.1"
RECEIVE_CHUNK_BYTES: Final = 64 * 1024
MAX_MESSAGE_BYTES: Final = 64 * 1024
LISTEN_BACKLOG: Final = 4096
_DATA: Final = (Opcode.BINARY, Opcode.TEXT, Opcode.CONT)


class SansIoPeer:
    """One connection: the protocol state, a coalescing outbox, its writer task."""

    __slots__ = ("_buffer", "_closing", "_scope", "_stream", "_wake", "ws")

    def __init__(self, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        self.ws = ServerProtocol(max_size=MAX_MESSAGE_BYTES)
        self._stream = stream
        self._scope = scope
        self._buffer = bytearray()
        self._wake = trio.Event()
        self._closing = False

    def push(self, data: bytes) -> None:
        if self.ws.state is not State.OPEN:
            return
        self.ws.send_binary(data)
        self.flush()
        if len(self._buffer) > OUTBOUND_LIMIT_BYTES:
            self._scope.cancel()  # slow consumer: drop it

    def close(self, code: int) -> None:
        if self._closing:
            return
        self._closing = True
        if self.ws.state is State.OPEN:
            with contextlib.suppress(InvalidState):
                self.ws.send_close(code)
        self.flush()

    def flush(self) -> None:
        for data in self.ws.data_to_send():
            self._buffer += data
        self._wake.set()

    async def writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self._buffer:
                data = bytes(self._buffer)
                self._buffer.clear()
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._scope.cancel()
                    return
            if self._closing and not self._buffer:
                self._scope.cancel()
                return


async def _reader(peer: SansIoPeer, stream: trio.SocketStream, hub: RelayHub) -> None:
    ws = peer.ws
    session: Session | None = None
    parts: list[bytes] = []
    try:
        while ws.state is not State.CLOSED:
            try:
                data = await stream.receive_some(RECEIVE_CHUNK_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if data:
                ws.receive_data(data)
            else:
                ws.receive_eof()
            for event in ws.events_received():
                if isinstance(event, Request):
                    response = (
                        ws.accept(event) if event.path == WS_PATH else ws.reject(404, "not found\n")
                    )
                    ws.send_response(response)
                    if response.status_code == 101:
                        session = hub.open_session(peer)
                    continue
                if session is None or not isinstance(event, Frame) or event.opcode not in _DATA:
                    continue  # control frames: the protocol answers them
                parts.append(bytes(event.data))
                if not event.fin:
                    continue
                payload, parts = b"".join(parts), []
                if event.opcode is Opcode.TEXT:
                    session.on_text()
                else:
                    session.on_message(payload)
            peer.flush()
            if not data or ws.close_expected():
                return
    finally:
        if session is not None:
            session.closed()


async def _handle(stream: trio.SocketStream, hub: RelayHub) -> None:
    try:
        async with trio.open_nursery() as nursery:
            peer = SansIoPeer(stream, nursery.cancel_scope)
            nursery.start_soon(peer.writer)
            await _reader(peer, stream, hub)
            peer.close(1000)  # the writer cancels the nursery once it is written
            await trio.sleep_forever()
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # one connection's failure must never reach serve_listeners
    finally:
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
