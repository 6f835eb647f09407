"""A client that stops reading is cut off (4008) without stalling anyone, and loses nothing."""

from __future__ import annotations

import trio

from protocol import (
    CloseCode,
    ConversationInfo,
    CreateGroup,
    Hello,
    MessageEvent,
    OpenConversation,
    Send,
    Synced,
    TextBody,
    Welcome,
    encode,
)
from tests.conftest import RunningServer
from tests.imserver.gateway.test_hostile_input import raw_ws

MESSAGES = 6000
PAYLOAD = "x" * 4000  # 24 MB in all: more than the outbox plus every kernel buffer


async def test_slow_consumer_is_cut_off_and_resumes_losslessly(server: RunningServer) -> None:
    for name in ("slow", "fast"):  # group members are users of the shop: customers of it
        async with server.connect(name) as client:
            await client.request(OpenConversation(id=0, shop="shop1"))
    async with server.connect("owner", "agent", "shop1") as owner:
        info: ConversationInfo = await owner.request(
            CreateGroup(id=0, shop="shop1", title="flash sale", members=["slow", "fast"])
        )
        conv = info.conversation.id
    async with (
        raw_ws(server.url) as slow,
        server.connect("fast") as fast,
        server.connect("bot", "worker", "shop1") as flooder,
    ):
        await slow.send_bytes(encode(Hello(v=1, token=server.token("slow"), device="s")))
        assert isinstance(await slow.next_frame(), Welcome)
        # From here the slow client reads nothing while the flood goes on.
        fast_seqs: list[int] = []

        async def fast_reader() -> None:
            async for frame in fast.events:
                if isinstance(frame, MessageEvent):
                    fast_seqs.append(frame.message.seq)
                    if len(fast_seqs) == MESSAGES:
                        return

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fast_reader)
                for start in range(0, MESSAGES, 200):
                    pending = [
                        await flooder.start_request(
                            Send(id=0, conv=conv, cmid=f"m{i}", body=TextBody(text=PAYLOAD))
                        )
                        for i in range(start, start + 200)
                    ]
                    for p in pending:
                        await p.result()
        assert fast_seqs == list(range(1, MESSAGES + 1))  # the fast reader was never stalled
        frames = await slow.frames()
        assert slow.close_code == CloseCode.SLOW_CONSUMER
        seen = [f.message.seq for f in frames if isinstance(f, MessageEvent)]
        assert seen == list(range(1, len(seen) + 1))
        assert len(seen) < MESSAGES
    # Resuming from the last seq it saw gives the slow client exactly the rest.
    last = seen[-1] if seen else 0
    async with server.connect("slow", resume={conv: last}) as slow_again:
        rest: list[int] = []
        with trio.fail_after(60):
            async for frame in slow_again.events:
                if isinstance(frame, MessageEvent):
                    rest.append(frame.message.seq)
                elif isinstance(frame, Synced):
                    break
    assert rest == list(range(last + 1, MESSAGES + 1))
