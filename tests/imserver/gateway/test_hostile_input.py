"""Every kind of bad input is answered as documented, and others keep chatting."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest
import trio
import trio.testing
from websockets.frames import Frame, Opcode
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Request,
    TextMessage,
)
from wsproto.events import (
    Ping as WsPing,
)
from wsproto.events import (
    Pong as WsPong,
)

from imserver.client import ServerError
from protocol import (
    CloseCode,
    ConversationInfo,
    Error,
    ErrorCode,
    GetConversation,
    Hello,
    History,
    OpenConversation,
    Ping,
    Pong,
    Synced,
    Welcome,
    decode_server_frame,
    encode,
)
from tests.conftest import RunningServer


class RawWs:
    """A deliberately dumb WebSocket client that sends whatever it is told."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.close_code: int | None = None
        self.queue: list[object] = []
        self.pending = bytearray()
        self.pongs: list[bytes] = []

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(self.ws.send(Message(data=data)))

    async def send_fragment(self, data: bytes, *, last: bool) -> None:
        await self.stream.send_all(self.ws.send(Message(data=data, message_finished=last)))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=text)))

    async def _pump(self) -> bool:
        """Read once from the socket into ``self.queue``; False at the end."""
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            return False
        if not data:
            return False
        self.ws.receive_data(data)
        for ev in self.ws.events():
            if isinstance(ev, BytesMessage):
                self.pending += ev.data
                if ev.message_finished:
                    self.queue.append(decode_server_frame(bytes(self.pending)))
                    self.pending.clear()
            elif isinstance(ev, WsPong):
                self.pongs.append(bytes(ev.payload))
            elif isinstance(ev, CloseConnection):
                self.close_code = ev.code
                return False
        return True

    async def frames(self) -> list[object]:
        """Everything the server sends until it closes (or 10 s)."""
        with trio.fail_after(10):
            while self.close_code is None and await self._pump():
                pass
        out, self.queue = self.queue, []
        return out

    async def next_frame(self) -> object:
        with trio.fail_after(10):
            while not self.queue:
                assert self.close_code is None and await self._pump(), f"closed {self.close_code}"
        return self.queue.pop(0)


@asynccontextmanager
async def raw_ws(url: str) -> AsyncIterator[RawWs]:
    parts = urlsplit(url)
    stream = await trio.open_tcp_stream(parts.hostname or "", parts.port or 0)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="localhost", target="/ws")))
    with trio.fail_after(5):
        accepted = False
        while not accepted:
            ws.receive_data(await stream.receive_some(4096))
            accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
    try:
        yield RawWs(stream, ws)
    finally:
        await stream.aclose()


async def _raw_http(url: str, request: bytes) -> bytes:
    parts = urlsplit(url)
    stream = await trio.open_tcp_stream(parts.hostname or "", parts.port or 0)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
        return data


def _hello(server: RunningServer, user: str = "eve", **kw: object) -> bytes:
    return encode(Hello(v=1, token=server.token(user, **kw), device="raw"))  # type: ignore[arg-type]


async def test_garbage_bytes_instead_of_http(server: RunningServer) -> None:
    response = await _raw_http(server.url, b"\x00\x01\x02garbage\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400")


async def test_plain_http_gets_426_and_metrics_and_health_work(server: RunningServer) -> None:
    response = await _raw_http(server.url, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 426")
    health = await _raw_http(server.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert health.startswith(b"HTTP/1.1 200") and health.endswith(b"ok\n")
    metrics = await _raw_http(server.url, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"imserver_connections" in metrics and b"imserver_commit_seconds" in metrics


async def test_text_frame_is_closed_1003(server: RunningServer) -> None:
    async with raw_ws(server.url) as raw:
        await raw.send_text('{"t": "hello"}')
        frames = await raw.frames()
        assert isinstance(frames[0], Error) and frames[0].code == ErrorCode.BAD_FRAME
        assert raw.close_code == CloseCode.UNSUPPORTED_DATA


async def test_invalid_msgpack_before_hello_closes_4000(server: RunningServer) -> None:
    async with raw_ws(server.url) as raw:
        await raw.send_bytes(b"\xc1\xc1\xc1")
        frames = await raw.frames()
        assert isinstance(frames[0], Error) and frames[0].code == ErrorCode.BAD_FRAME
        assert raw.close_code == CloseCode.BAD_HANDSHAKE


async def test_request_before_hello_is_unauthorized(server: RunningServer) -> None:
    async with raw_ws(server.url) as raw:
        await raw.send_bytes(encode(Ping(id=7)))
        frames = await raw.frames()
        assert isinstance(frames[0], Error) and frames[0].code == ErrorCode.UNAUTHORIZED
        assert frames[0].id == 7
        assert raw.close_code == CloseCode.UNAUTHORIZED


async def test_unknown_version_is_refused(server: RunningServer) -> None:
    async with raw_ws(server.url) as raw:
        await raw.send_bytes(encode(Hello(v=99, token=server.token("eve"), device="d")))
        frames = await raw.frames()
        assert isinstance(frames[0], Error) and frames[0].code == ErrorCode.UNSUPPORTED_VERSION
        assert raw.close_code == CloseCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize("kind", ["forged", "expired", "replayed"])
async def test_bad_tokens_are_refused(server: RunningServer, kind: str) -> None:
    if kind == "forged":
        token = server.token("eve")[:-4] + "AAAA"
    elif kind == "expired":
        token = server.token("eve", ttl_s=-10)
    else:
        token = server.token("eve", once=True)
        async with raw_ws(server.url) as first:
            await first.send_bytes(encode(Hello(v=1, token=token, device="d")))
            assert isinstance(await first.next_frame(), Welcome)
    async with raw_ws(server.url) as raw:
        await raw.send_bytes(encode(Hello(v=1, token=token, device="d")))
        frames = await raw.frames()
        assert isinstance(frames[0], Error) and frames[0].code == ErrorCode.UNAUTHORIZED
        assert raw.close_code == CloseCode.UNAUTHORIZED


async def test_malformed_frames_after_hello_get_errors_with_ids(server: RunningServer) -> None:
    async with raw_ws(server.url) as raw:
        await raw.send_bytes(_hello(server))
        assert isinstance(await raw.next_frame(), Welcome)
        assert isinstance(await raw.next_frame(), Synced)
        # invalid msgpack
        await raw.send_bytes(b"\xc1")
        err = await raw.next_frame()
        assert isinstance(err, Error) and err.code == ErrorCode.BAD_FRAME and err.id is None
        # unknown frame type
        await raw.send_bytes(msgspec.msgpack.encode({"t": "launch_missiles", "id": 3}))
        err = await raw.next_frame()
        assert isinstance(err, Error) and err.code == ErrorCode.BAD_FRAME
        # wrong field types: the id is recovered so the request still gets its one reply
        await raw.send_bytes(msgspec.msgpack.encode({"t": "history", "id": 4, "conv": 12}))
        err = await raw.next_frame()
        assert isinstance(err, Error) and err.code == ErrorCode.BAD_FRAME and err.id == 4
        # too long a text
        await raw.send_bytes(
            msgspec.msgpack.encode(
                {
                    "t": "send",
                    "id": 5,
                    "conv": "c",
                    "cmid": "m",
                    "body": {"k": "text", "text": "x" * 6000},
                }
            )
        )
        err = await raw.next_frame()
        assert isinstance(err, Error) and err.code == ErrorCode.TOO_LARGE and err.id == 5
        # still usable
        await raw.send_bytes(encode(Ping(id=6)))
        pong = await raw.next_frame()
        assert isinstance(pong, Pong) and pong.id == 6


async def test_oversized_frame_closes_1009(server: RunningServer) -> None:
    async with raw_ws(server.url) as raw:
        await raw.send_bytes(_hello(server))
        assert isinstance(await raw.next_frame(), Welcome)
        assert isinstance(await raw.next_frame(), Synced)
        await raw.send_bytes(b"\x00" * (65 * 1024))
        frames = await raw.frames()
        assert any(isinstance(f, Error) and f.code == ErrorCode.TOO_LARGE for f in frames)
        assert raw.close_code == CloseCode.MESSAGE_TOO_BIG


async def test_other_shops_conversation_is_not_found(server: RunningServer) -> None:
    async with server.connect("frank") as frank, server.connect("spy", "agent", "shop2") as spy:
        conv = (await frank.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        for request in (GetConversation(id=0, conv=conv), History(id=0, conv=conv)):
            with pytest.raises(ServerError) as info:
                await spy.request(request)
            assert info.value.code == "not_found"
        with pytest.raises(ServerError) as info:
            await spy.send_text(conv, "hi, I'm from another shop")
        assert info.value.code == "not_found"
    async with server.connect("mallory") as other_customer:
        with pytest.raises(ServerError) as info:
            await other_customer.request(History(id=0, conv=conv))
        assert info.value.code == "not_found"


async def test_abuse_does_not_disturb_other_users(server: RunningServer) -> None:
    """While an attacker floods garbage, a normal chat goes on and the attacker is cut off."""
    async with server.connect("grace") as grace:
        conv = (await grace.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        async with raw_ws(server.url) as raw:
            await raw.send_bytes(_hello(server, "attacker"))
            assert isinstance(await raw.next_frame(), Welcome)
            assert isinstance(await raw.next_frame(), Synced)
            for _ in range(100):
                try:
                    await raw.send_bytes(b"\xc1garbage")
                except trio.BrokenResourceError:
                    break
            sent = [await grace.send_text(conv, f"msg {i}") for i in range(10)]
            assert [s.seq for s in sent] == list(range(sent[0].seq, sent[0].seq + 10))
            frames = await raw.frames()
            assert all(isinstance(f, Error) for f in frames)
            assert raw.close_code == CloseCode.POLICY_VIOLATION
        info: ConversationInfo = await grace.request(GetConversation(id=0, conv=conv))
        assert info.conversation.last_seq == sent[-1].seq


async def test_slowloris_and_silent_websocket_are_cut_off(tmp_path: Path) -> None:
    from imserver.server import Server, ServerConfig
    from tests.conftest import SECRET, SHOPS

    config = ServerConfig(
        data_dir=tmp_path / "d", secret=SECRET, port=0, shops=SHOPS, handshake_timeout_s=0.3
    )
    srv = Server(config)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(srv.serve)
        parts = urlsplit(url)
        # a TCP connection that sends half an HTTP request and stops
        stream = await trio.open_tcp_stream(parts.hostname or "", parts.port or 0)
        async with stream:
            await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            with trio.fail_after(5):
                assert await stream.receive_some(100) == b""  # the server hung up
        # a WebSocket that never says Hello
        async with raw_ws(url) as raw:
            frames = await raw.frames()
            assert frames == []
            assert raw.close_code == CloseCode.BAD_HANDSHAKE
        srv.stop()


async def _welcomed(server: RunningServer, raw: RawWs, user: str = "eve") -> None:
    await raw.send_bytes(_hello(server, user))
    assert isinstance(await raw.next_frame(), Welcome)
    assert isinstance(await raw.next_frame(), Synced)


async def test_websocket_ping_fragments_and_limits(server: RunningServer) -> None:
    async with raw_ws(server.url) as raw:
        await _welcomed(server, raw)
        # A WebSocket-level ping is answered with its payload.
        await raw.send_raw(raw.ws.send(WsPing(payload=b"are you there")))
        with trio.fail_after(10):
            while not raw.pongs:
                assert await raw._pump()
        assert raw.pongs == [b"are you there"]
        # A request split over three frames is one request.
        request = encode(Ping(id=7))
        await raw.send_fragment(request[:2], last=False)
        await raw.send_fragment(request[2:4], last=False)
        await raw.send_fragment(request[4:], last=True)
        pong = await raw.next_frame()
        assert isinstance(pong, Pong) and pong.id == 7
        # Fragments adding up to more than 64 KiB: too_large, then 1009.
        for _ in range(3):
            await raw.send_fragment(b"\x00" * 30_000, last=False)
        frames = await raw.frames()
        assert any(isinstance(f, Error) and f.code == ErrorCode.TOO_LARGE for f in frames)
        assert raw.close_code == CloseCode.MESSAGE_TOO_BIG


async def test_websocket_protocol_violation_closes_1002_and_others_go_on(
    server: RunningServer,
) -> None:
    async with server.connect("alice") as alice, raw_ws(server.url) as raw:
        await _welcomed(server, raw)
        await raw.send_raw(b"\x82\x05hello")  # a client frame without a mask
        assert await raw.frames() == []
        assert raw.close_code == CloseCode.PROTOCOL_ERROR
        with trio.fail_after(10):
            info = await alice.request(OpenConversation(id=0, shop="shop1"))
        assert isinstance(info, ConversationInfo)


async def test_hello_sent_with_the_upgrade_request_is_read(server: RunningServer) -> None:
    """A client may pipeline its first frame behind the HTTP request head."""
    parts = urlsplit(server.url)
    stream = await trio.open_tcp_stream(parts.hostname or "", parts.port or 0)
    ws = WSConnection(ConnectionType.CLIENT)
    upgrade = ws.send(Request(host="localhost", target="/ws"))
    # wsproto will not frame before the 101; a client that does not wait may.
    hello = Frame(Opcode.BINARY, _hello(server)).serialize(mask=True)
    async with stream:
        await stream.send_all(upgrade + hello)  # one write: both arrive together
        raw = RawWs(stream, ws)
        frames: list[object] = []
        with trio.fail_after(10):
            while len(frames) < 2:
                assert await raw._pump()
                frames += raw.queue
                raw.queue = []
        assert isinstance(frames[0], Welcome) and isinstance(frames[1], Synced)


async def test_single_use_token_stays_used_across_a_restart(tmp_path: Path) -> None:
    """A used single-use token is stored, so a restarted server still refuses it."""
    from imserver.auth import mint_token
    from imserver.server import Server, ServerConfig
    from tests.conftest import SECRET, SHOPS

    token = mint_token(SECRET, user="eve", role="customer", once=True)
    config = ServerConfig(data_dir=tmp_path / "data", secret=SECRET, port=0, shops=SHOPS)
    for attempt in ("first use", "replay after restart"):
        server = Server(config)
        async with trio.open_nursery() as nursery:
            url = await nursery.start(server.serve)
            async with raw_ws(url) as raw:
                await raw.send_bytes(encode(Hello(v=1, token=token, device="d")))
                if attempt == "first use":
                    assert isinstance(await raw.next_frame(), Welcome)
                    # The jti's write is queued by now; stopping the server commits it.
                    await trio.testing.wait_all_tasks_blocked()
                else:
                    frames = await raw.frames()
                    assert isinstance(frames[0], Error)
                    assert frames[0].code == ErrorCode.UNAUTHORIZED
                    assert "replayed" in frames[0].message
                    assert raw.close_code == CloseCode.UNAUTHORIZED
            server.stop()
