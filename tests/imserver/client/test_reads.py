"""The SDK under late and split reads: no frame is ever dropped between the
handshake and the reader, and ``last_seq`` never passes an event the
application has not taken.

The server is real; the client's TCP stream is wrapped so that its reads are
shaped on purpose: *late* (the first read after Hello waits until the server
has sent the whole resume replay and ``Synced``, so Welcome, the replay and
Synced arrive in one read) and *split* (reads cut to small sizes, so frame
boundaries fall anywhere, also inside the Welcome's read).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import pytest
import trio

from imserver.client import Client, ReconnectingClient, connect
from protocol import CloseCode, MessageEvent, OpenConversation, Ping, Synced, UpdateConversation
from tests.conftest import RunningServer

SYNCED_TAG = b"\xa6synced"
"""How the tag of a ``Synced`` frame looks on the wire (msgpack str "synced")."""


class ShapedReads(trio.abc.Stream):
    """A real TCP stream whose reads are shaped (see the module docstring)."""

    def __init__(self, inner: trio.abc.Stream, *, late: bool, sizes: Sequence[int] = ()) -> None:
        self.inner = inner
        self.late = late
        self.sizes: Iterator[int] | None = itertools.cycle(sizes) if sizes else None
        self.buffer = bytearray()
        self.sends = 0
        self.merged = 0
        """Bytes the late read held back and returned together."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.late and self.sends >= 2:  # the upgrade request and the Hello are out
            self.late = False
            while SYNCED_TAG not in self.buffer:
                data = await self.inner.receive_some()
                if not data:
                    break
                self.buffer += data
            self.merged = len(self.buffer)
        if not self.buffer:
            data = await self.inner.receive_some()
            if not data:
                return b""
            self.buffer += data
        size = len(self.buffer) if self.sizes is None else next(self.sizes)
        size = min(size, max_bytes or size)
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _tcp(server: RunningServer) -> trio.abc.Stream:
    return await trio.open_tcp_stream("127.0.0.1", server.server.port)


async def _until_synced(client: Client) -> tuple[list[int], Synced]:
    seqs: list[int] = []
    with trio.fail_after(10):
        async for frame in client.events:
            if isinstance(frame, MessageEvent):
                seqs.append(frame.message.seq)
            elif isinstance(frame, Synced):
                return seqs, frame
    raise AssertionError("no Synced")


@pytest.mark.parametrize(
    ("late", "sizes"),
    [
        (True, ()),  # Welcome, the whole replay and Synced in one read
        (True, (1,)),  # ... then handed out a byte at a time
        (True, (2, 3, 5, 7, 4096)),
        (False, (1,)),  # split from the upgrade on
        (False, (13, 61, 1000)),
    ],
)
async def test_resume_survives_late_and_split_reads(
    server: RunningServer, late: bool, sizes: tuple[int, ...]
) -> None:
    async with server.connect("hana") as hana:
        conv = (await hana.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        async with server.connect("agent7", "agent", "shop1") as agent:
            await agent.request(UpdateConversation(id=0, conv=conv, agent="agent7"))
        missed = [await hana.send_text(conv, f"while away {i}") for i in range(25)]
        stream = ShapedReads(await _tcp(server), late=late, sizes=sizes)
        async with connect(
            server.url,
            server.token("agent7", "agent", "shop1"),
            device="a7",
            resume={conv: 1},
            stream=stream,
        ) as agent:
            seqs, synced = await _until_synced(agent)
            assert agent.last_seq == {conv: missed[-1].seq}
            # The connection is still sound after the shaped reads.
            await agent.request(Ping(id=0))
    if late:
        assert stream.merged > 25 * 20  # the replay really came in the Welcome's read
    assert seqs == [m.seq for m in missed]
    assert synced.last_seq == {conv: missed[-1].seq}


async def test_client_last_seq_moves_only_with_what_the_application_takes(
    server: RunningServer,
) -> None:
    async with server.connect("hana") as hana:
        conv = (await hana.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        async with server.connect("agent7", "agent", "shop1") as agent:
            await agent.request(UpdateConversation(id=0, conv=conv, agent="agent7"))
            sent = [await hana.send_text(conv, f"m{i}") for i in range(5)]
            await agent.request(Ping(id=0))  # the events came before this reply
            assert agent.last_seq == {}  # received and buffered, not taken
            async for frame in agent.events:
                if isinstance(frame, MessageEvent):
                    assert agent.last_seq == {conv: frame.message.seq}
                    if frame.message.seq == sent[1].seq:
                        break
        # Left with m2..m4 untaken: a resume from last_seq gets them again.
        async with server.connect("agent7", "agent", "shop1", resume=agent.last_seq) as again:
            seqs, _ = await _until_synced(again)
    assert seqs == [m.seq for m in sent[2:]]


async def test_reconnecting_client_under_late_split_reads(server: RunningServer) -> None:
    ctx = server.server.ctx
    assert ctx is not None
    streams: list[ShapedReads] = []

    async def open_stream() -> trio.abc.Stream:
        streams.append(ShapedReads(await _tcp(server), late=True, sizes=(3, 1, 700)))
        return streams[-1]

    agent = ReconnectingClient(
        server.url,
        lambda: server.token("ra", "agent", "shop1"),
        device="d1",
        open_stream=open_stream,
    )
    async with trio.open_nursery() as nursery, server.connect("rb") as buyer:
        await nursery.start(agent.run)
        conv = (await buyer.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await agent.request(UpdateConversation(id=0, conv=conv, agent="ra"))
        sent = []
        for round_ in range(3):
            for i in range(10):
                sent.append((await buyer.send_text(conv, f"r{round_} m{i}")).seq)
            await agent.request(Ping(id=0))  # (a live connection to drop)
            for session in list(ctx.sessions):
                if session.user == "ra":
                    session.close(CloseCode.GOING_AWAY, "test")
        for i in range(5):
            sent.append((await buyer.send_text(conv, f"after {i}")).seq)
        await agent.request(Ping(id=0))
        # Everything so far is queued for the application; none of it is taken.
        assert agent.last_seq == {}
        seen: list[int] = []
        with trio.fail_after(20):
            async for frame in agent.events:
                if isinstance(frame, MessageEvent):
                    seen.append(frame.message.seq)
                    assert agent.last_seq == {conv: frame.message.seq}
                    if frame.message.seq >= sent[-1]:
                        break
        nursery.cancel_scope.cancel()
    assert agent.connections >= 4
    assert any(s.merged for s in streams[1:])  # resumed through late reads
    assert seen == list(range(1, sent[-1] + 1))  # 1 is the "assigned" system message
