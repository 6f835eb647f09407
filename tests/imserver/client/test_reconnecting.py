"""The SDK's reconnecting client: one gapless stream across disconnects."""

from __future__ import annotations

import trio

from imserver.client import ReconnectingClient
from protocol import CloseCode, MessageEvent, OpenConversation, Ping, UpdateConversation
from tests.conftest import RunningServer


async def test_reconnects_and_resumes_without_gaps_or_duplicates(server: RunningServer) -> None:
    ctx = server.server.ctx
    assert ctx is not None
    agent = ReconnectingClient(
        server.url, lambda: server.token("ra", "agent", "shop1"), device="d1"
    )
    async with trio.open_nursery() as nursery, server.connect("rb") as buyer:
        await nursery.start(agent.run)
        conv = (await buyer.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await agent.request(UpdateConversation(id=0, conv=conv, agent="ra"))
        seen: list[int] = []
        sent = []
        for round_ in range(3):
            for i in range(10):
                sent.append((await buyer.send_text(conv, f"r{round_} m{i}")).seq)
            # the server drops the agent's connection; the buyer keeps writing meanwhile
            await agent.request(Ping(id=0))  # (a live connection to drop)
            for session in list(ctx.sessions):
                if session.user == "ra":
                    session.close(CloseCode.GOING_AWAY, "test")
        for i in range(5):
            sent.append((await buyer.send_text(conv, f"after {i}")).seq)
        reply = await agent.send_text(conv, "sorry for the wait")
        with trio.fail_after(20):
            async for frame in agent.events:
                if isinstance(frame, MessageEvent):
                    seen.append(frame.message.seq)
                    if frame.message.seq >= sent[-1]:
                        break
        nursery.cancel_scope.cancel()
    assert agent.connections >= 3
    assert seen == list(range(1, sent[-1] + 1))  # 1 is the "assigned" system message
    assert reply.seq == sent[-1] + 1
