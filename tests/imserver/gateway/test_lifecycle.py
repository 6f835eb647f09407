"""Every server-initiated close frees the connection within a bounded linger,
whether or not the peer answers the close, reads, or ever sends FIN; presence
goes offline at the close, not at the release (issue 10, finding 6).

The peers here are raw sockets that go silent: they never read, never answer
a close frame and never shut their side down, as a dead phone on a mobile
network does. The server's open descriptors (this process's /proc/self/fd)
must come back to the baseline plus the peers' own sockets.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request

from imserver.client import Client
from imserver.limits import SESSION_SWEEP_S
from imserver.metrics import METRICS
from imserver.server import Server, ServerConfig
from protocol import (
    CloseCode,
    ConversationInfo,
    CreateGroup,
    Hello,
    OpenConversation,
    Ping,
    PresenceEvent,
    PresenceList,
    Send,
    TextBody,
    WatchPresence,
    encode,
)
from tests.conftest import SECRET, SHOPS

HANDSHAKE_S = 0.3
IDLE_MS = 600
LINGER_S = 0.5
SEND_TIMEOUT_S = 0.5
POLL_S = 0.02
RELEASE_BOUND_S = max(HANDSHAKE_S, IDLE_MS / 1000) + SESSION_SWEEP_S + SEND_TIMEOUT_S + LINGER_S + 3


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _sessions(srv: Server) -> set[Any]:
    assert srv.ctx is not None
    return srv.ctx.sessions


def _closes(code: CloseCode) -> float:
    value = METRICS.registry.get_sample_value("imserver_closes_total", {"code": str(int(code))})
    return value or 0.0


async def _until(condition: Callable[[], bool], bound_s: float, what: str) -> None:
    """Poll ``condition`` (cheap, local: nothing to wait on) until it holds; fail
    after ``bound_s``."""
    for _ in range(int(bound_s / POLL_S) + 1):
        if condition():
            return
        await trio.sleep(POLL_S)
    assert condition(), f"{what}: not within {bound_s} s"


@asynccontextmanager
async def _server(tmp_path: Path, idle_ms: int = IDLE_MS) -> AsyncIterator[Server]:
    config = ServerConfig(
        data_dir=tmp_path / "data",
        secret=SECRET,
        port=0,
        shops=SHOPS,
        handshake_timeout_s=HANDSHAKE_S,
        idle_timeout_ms=idle_ms,
        close_linger_s=LINGER_S,
        close_send_timeout_s=SEND_TIMEOUT_S,
    )
    srv = Server(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        yield srv
        srv.stop()


class Silent:
    """A WebSocket peer that, after what it is told to send, goes silent."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws

    async def close_code(self) -> int | None:
        """Read what the server sent (only at the end of a test): its close code,
        and check the server then hung up."""
        code = None
        with trio.fail_after(5):
            while data := await self.stream.receive_some(1 << 20):
                self.ws.receive_data(data)
                for ev in self.ws.events():
                    if isinstance(ev, CloseConnection):
                        code = ev.code
        return code


async def _silent_peer(
    url: str, *, hello: bytes | None = None, rcvbuf: int | None = None
) -> Silent:
    parts = urlsplit(url)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # a small window: the server's writes back up quickly
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect((parts.hostname or "", parts.port or 0))
    stream = trio.SocketStream(sock)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="localhost", target="/ws")))
    with trio.fail_after(5):
        while not any(isinstance(e, AcceptConnection) for e in ws.events()):
            ws.receive_data(await stream.receive_some(4096))
    if hello is not None:
        from wsproto.events import Message

        await stream.send_all(ws.send(Message(data=hello)))
    return Silent(stream, ws)


async def _keep_alive(client: Client) -> None:
    """The SDK sends no heartbeats of its own; this test's idle timeout is short."""
    while True:
        await client.request(Ping(id=0))
        await trio.sleep(IDLE_MS / 4000)


def _token(user: str, role: str = "customer", shop: str = "") -> str:
    from imserver.auth import mint_token

    return mint_token(SECRET, user=user, role=role, shop=shop)


def _hello(user: str, role: str = "customer", shop: str = "", token: str | None = None) -> bytes:
    from imserver.auth import mint_token

    if token is None:
        token = mint_token(SECRET, user=user, role=role, shop=shop)
    return encode(Hello(v=1, token=token, device=f"{user}-dev"))


async def test_silent_peers_are_released_after_every_kind_of_close(tmp_path: Path) -> None:
    """Handshake timeout (4000), refused token (4001) and idle timeout (4009):
    each peer never answers and never sends FIN, and the server lets go of
    each socket within the bounded linger."""
    async with _server(tmp_path) as srv:
        baseline = _open_fds()
        peers = {
            "no hello": await _silent_peer(srv.url),
            "bad token": await _silent_peer(srv.url, hello=_hello("x", token="forged")),
            "idle": await _silent_peer(srv.url, hello=_hello("ghost")),
        }
        try:
            await _until(
                lambda: _open_fds() == baseline + len(peers) and not _sessions(srv),
                RELEASE_BOUND_S,
                "sockets of silent peers released",
            )
            codes = {name: await peer.close_code() for name, peer in peers.items()}
            assert codes == {
                "no hello": CloseCode.BAD_HANDSHAKE,
                "bad token": CloseCode.UNAUTHORIZED,
                "idle": CloseCode.IDLE_TIMEOUT,
            }
        finally:
            for peer in peers.values():
                await peer.stream.aclose()


async def test_presence_goes_offline_at_the_close_not_after_the_linger(tmp_path: Path) -> None:
    from imserver.auth import mint_token
    from imserver.client import connect

    async with _server(tmp_path) as srv:
        sessions = _sessions(srv)
        token = mint_token(SECRET, user="boss", role="supervisor", shop="shop1")
        async with connect(srv.url, token, device="boss-dev") as boss:
            ghost = await _silent_peer(srv.url, hello=_hello("ghost", "agent", "shop1"))
            async with ghost.stream, trio.open_nursery() as keep:
                keep.start_soon(_keep_alive, boss)
                with trio.fail_after(5):
                    while True:
                        listed: PresenceList = await boss.request(
                            WatchPresence(id=0, users=["ghost"])
                        )
                        if listed.presences[0].online:
                            break
                # The ghost times out (idle) and never answers the close: the
                # watcher hears "offline" while the server still lingers on it.
                with trio.fail_after(RELEASE_BOUND_S):
                    async for frame in boss.events:
                        if isinstance(frame, PresenceEvent) and not frame.presence.online:
                            break
                    else:
                        raise AssertionError(f"the watcher was closed ({boss.close_code})")
                assert any(s.user == "ghost" for s in sessions), (
                    "offline was announced only after the connection was released"
                )
                await _until(
                    lambda: all(s.user != "ghost" for s in sessions),
                    RELEASE_BOUND_S,
                    "the ghost's session released",
                )
                keep.cancel_scope.cancel()


async def test_slow_consumer_that_never_reads_is_released(tmp_path: Path) -> None:
    """4008 while the peer's window is full: the close frame cannot be
    written, and the socket is dropped after the close-send deadline."""
    from imserver.auth import mint_token
    from imserver.client import connect

    async with _server(tmp_path, idle_ms=60_000) as srv:
        owner = mint_token(SECRET, user="owner", role="agent", shop="shop1")
        sink_token = mint_token(SECRET, user="sink", role="customer", shop="")
        async with connect(srv.url, sink_token, device="s") as sink_client:  # a user of shop1
            await sink_client.request(OpenConversation(id=0, shop="shop1"))
        async with connect(srv.url, owner, device="o") as agent:
            info: ConversationInfo = await agent.request(
                CreateGroup(id=0, shop="shop1", title="sale", members=["sink"])
            )
        await _until(lambda: not _sessions(srv), RELEASE_BOUND_S, "the owner gone")
        baseline = _open_fds()
        closed_slow = _closes(CloseCode.SLOW_CONSUMER)
        sink = await _silent_peer(srv.url, hello=_hello("sink"), rcvbuf=4096)
        async with sink.stream:
            # A worker's rate allows a flood (a person's would be refused first).
            flooder_token = mint_token(SECRET, user="flood", role="worker", shop="shop1")
            async with connect(srv.url, flooder_token, device="f") as flooder:
                body = TextBody(text="满" * 4000)  # 12 KB a message
                with trio.fail_after(60):
                    for start in range(0, 3000, 40):
                        pending = [
                            await flooder.start_request(
                                Send(id=0, conv=info.conversation.id, cmid=f"m{i}", body=body)
                            )
                            for i in range(start, start + 40)
                        ]
                        for p in pending:
                            await p.result()
                        if all(
                            s.user != "sink" or s.outbox.closing is not None for s in _sessions(srv)
                        ):
                            break
            assert _closes(CloseCode.SLOW_CONSUMER) == closed_slow + 1
            await _until(
                lambda: (
                    _open_fds() == baseline + 1 and all(s.user != "sink" for s in _sessions(srv))
                ),
                RELEASE_BOUND_S,
                "the slow consumer's socket released",
            )


async def test_drain_releases_silent_peers(tmp_path: Path) -> None:
    """SIGTERM's drain closes with 1001; silent peers do not hold the exit up."""
    config = ServerConfig(
        data_dir=tmp_path / "data",
        secret=SECRET,
        port=0,
        shops=SHOPS,
        close_linger_s=LINGER_S,
        close_send_timeout_s=SEND_TIMEOUT_S,
    )
    srv = Server(config)
    peers: list[Silent] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.serve)
            peers += [await _silent_peer(srv.url, hello=_hello(f"p{i}")) for i in range(3)]
            stopped_at = trio.current_time()
            srv.stop()
        # serve() has returned: every connection is closed.
        assert trio.current_time() - stopped_at < SEND_TIMEOUT_S + LINGER_S + 3
        for peer in peers:
            assert await peer.close_code() == CloseCode.GOING_AWAY
    finally:
        for peer in peers:
            await peer.stream.aclose()


async def test_a_peer_closed_during_a_fan_out_does_not_break_it(tmp_path: Path) -> None:
    """The hub delivers to a user's devices by iterating its own table; a
    device that overflows during that delivery is closed (and leaves the hub)
    without breaking the delivery to the others."""
    from protocol import Message, MessageEvent, Role

    async with _server(tmp_path, idle_ms=60_000) as srv:
        assert srv.ctx is not None
        hub = srv.ctx.hub
        phones = [
            await _silent_peer(
                srv.url, hello=encode(Hello(v=1, token=_token("zoe"), device=d)), rcvbuf=4096
            )
            for d in ("phone", "pad")
        ]
        async with phones[0].stream, phones[1].stream:
            await _until(
                lambda: (
                    len(_sessions(srv)) == 2 and all(s.identity is not None for s in _sessions(srv))
                ),
                5,
                "both devices logged in",
            )
            frame = MessageEvent(
                message=Message(
                    conv="c",
                    seq=1,
                    sender="a",
                    sender_role=Role.AGENT,
                    cmid="m",
                    ts=0,
                    body=TextBody(text="满" * 5000),
                )
            )
            for _ in range(2000):  # 30 MB: past the outbox's hard bound and every buffer
                hub.send_to_user("zoe", frame)
                if all(s.outbox.closing is not None for s in _sessions(srv)):
                    break
            assert all(s.outbox.closing == CloseCode.SLOW_CONSUMER for s in _sessions(srv))
            await _until(lambda: not hub.is_online("zoe"), 1, "zoe offline")
            await _until(lambda: not _sessions(srv), RELEASE_BOUND_S, "both devices released")
