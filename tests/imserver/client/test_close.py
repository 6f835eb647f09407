"""A request racing the server's close frame gets ``ConnectionClosed``, never
wsproto's ``LocalProtocolError`` (issue 10, finding 12: the drain test's flake).

The race: a sender has taken the send lock but not yet written when the reader
takes the server's close (the WebSocket is then "remote closing" and refuses
to encode a message). A scripted peer on a real TCP connection places the
close frame in the client's socket at exactly that moment: it writes it
synchronously just before the request, so the reader and the sender become
runnable in the same scheduler batch, whose order trio picks at random. Many
rounds make the losing order near-certain on a client that has the race.
"""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Message, Request

from imserver.client import Client, ConnectionClosed, connect
from protocol import PROTOCOL_VERSION, Limits, Ping, Role, Welcome, encode

ROUNDS = 40


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


async def _accept(peer: trio.SocketStream) -> WSConnection:
    """The server's side of the upgrade and Hello -> Welcome, nothing more."""
    ws = WSConnection(ConnectionType.SERVER)
    while True:
        ws.receive_data(await peer.receive_some())
        for ev in ws.events():
            if isinstance(ev, Request):
                await peer.send_all(ws.send(AcceptConnection()))
            elif isinstance(ev, BytesMessage) and ev.message_finished:  # the Hello
                welcome = Welcome(
                    v=PROTOCOL_VERSION,
                    session="s1",
                    user="u1",
                    role=Role.CUSTOMER,
                    shop="",
                    server_time=0,
                    heartbeat_ms=20_000,
                    idle_timeout_ms=60_000,
                    limits=Limits(
                        max_frame_bytes=65536,
                        max_text_chars=5000,
                        frames_per_second=50,
                        frames_burst=200,
                        max_inflight=256,
                        history_page=200,
                        recall_window_ms=120_000,
                    ),
                )
                await peer.send_all(ws.send(Message(data=encode(welcome))))
                return ws


async def _ping(client: Client) -> None:
    pending = await client.start_request(Ping(id=0))
    await pending.result()  # (sent before the close was read: no reply comes)


async def test_request_racing_the_close_frame_gets_connection_closed() -> None:
    for _ in range(ROUNDS):
        client_sock, server_sock = _tcp_pair()
        peer = trio.SocketStream(trio.socket.from_stdlib_socket(server_sock))
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(client_sock))
        async with peer, trio.open_nursery() as nursery:
            accepted: list[WSConnection] = []

            async def serve(
                peer: trio.SocketStream = peer, accepted: list[WSConnection] = accepted
            ) -> None:
                accepted.append(await _accept(peer))

            nursery.start_soon(serve)
            async with connect("ws://test/ws", "token", stream=stream) as client:
                await trio.testing.wait_all_tasks_blocked()  # the reader waits on the socket
                # Synchronous: in the client's socket before the request below yields.
                server_sock.send(accepted[0].send(CloseConnection(1001, "server shutting down")))
                with pytest.raises(ConnectionClosed):
                    await _ping(client)
                assert client.close_code == 1001
