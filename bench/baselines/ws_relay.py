"""Baseline relay on asyncio + uvloop + ``websockets``: no auth, no storage.

Usage: ``python -m bench.baselines.ws_relay --port 0`` prints
``ws_relay listening on ws://127.0.0.1:PORT/ws`` once it accepts.

Theory of operation
-------------------
``websockets``' asyncio server runs one handler task per connection; the
handler iterates over incoming messages and hands each binary one to the
shared routing core (``_hub``). The core's pushes are written synchronously
with the library's ``broadcast`` primitive (frame encoding + one
``transport.write``; uvloop attempts the socket write at once and buffers the
rest), which is how websockets recommends fanning out without a task or an
``await`` per recipient. There is no coalescing beyond what the transport
does. A connection whose transport buffer exceeds ``OUTBOUND_LIMIT_BYTES`` is
a slow consumer and is aborted, as in the trio relay.

Options chosen for a like-for-like comparison with wsproto: no
permessage-deflate, no library keepalive pings (the protocol has its own
heartbeats), frames up to the protocol's 64 KiB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
from typing import Final

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from ._hub import OUTBOUND_LIMIT_BYTES, WS_PATH, RelayHub

NAME: Final = "ws_relay"
HOST: Final = "127.0.0.1"
MAX_MESSAGE_BYTES: Final = 64 * 1024
"""Largest WebSocket message (the protocol's MAX_FRAME_BYTES)."""
MAX_QUEUE: Final = 1024
"""Received messages websockets buffers per connection before it stops reading."""
LISTEN_BACKLOG: Final = 4096
"""Pending TCP connections (reconnect storms arrive all at once)."""


class WsPeer:
    """The hub's view of one websockets connection."""

    __slots__ = ("_targets", "conn")

    def __init__(self, conn: ServerConnection) -> None:
        self.conn = conn
        self._targets = (conn,)

    def push(self, data: bytes) -> None:
        conn = self.conn
        if conn.protocol.state is not State.OPEN:
            return
        broadcast(self._targets, data)
        if conn.transport.get_write_buffer_size() > OUTBOUND_LIMIT_BYTES:
            conn.transport.abort()  # slow consumer

    def close(self, code: int) -> None:
        if self.conn.protocol.state is State.OPEN:
            asyncio.get_running_loop().create_task(self.conn.close(code))


def _only_ws_path(conn: ServerConnection, request: Request) -> Response | None:
    if request.path != WS_PATH:
        return conn.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
    return None


async def run(port: int) -> None:
    hub = RelayHub()

    async def handler(conn: ServerConnection) -> None:
        session = hub.open_session(WsPeer(conn))
        try:
            async for message in conn:
                if isinstance(message, str):
                    session.on_text()
                else:
                    session.on_message(message)
        except ConnectionClosed:
            pass
        finally:
            session.closed()

    async with serve(
        handler,
        HOST,
        port,
        process_request=_only_ws_path,
        compression=None,
        ping_interval=None,
        max_size=MAX_MESSAGE_BYTES,
        max_queue=MAX_QUEUE,
        backlog=LISTEN_BACKLOG,
    ) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"{NAME} listening on ws://{HOST}:{bound}{WS_PATH}", flush=True)
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run(args.port))


if __name__ == "__main__":
    main()
