"""Resume after a disconnect: exactly the missed messages, in order, then Synced."""

from __future__ import annotations

import trio

from imserver.client import Client
from protocol import MessageEvent, OpenConversation, Synced, UpdateConversation
from tests.conftest import RunningServer


async def _until_synced(client: Client) -> tuple[list[int], Synced]:
    seqs: list[int] = []
    with trio.fail_after(20):
        async for frame in client.events:
            if isinstance(frame, MessageEvent):
                seqs.append(frame.message.seq)
            elif isinstance(frame, Synced):
                return seqs, frame
    raise AssertionError("no Synced")


async def test_resume_delivers_exactly_what_was_missed(server: RunningServer) -> None:
    async with server.connect("hana") as hana:
        conv = (await hana.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        async with server.connect("agent7", "agent", "shop1") as agent:
            await agent.request(UpdateConversation(id=0, conv=conv, agent="agent7"))
            before = [await hana.send_text(conv, f"before {i}") for i in range(3)]
            with trio.fail_after(20):
                async for frame in agent.events:  # last_seq counts what the application took
                    if isinstance(frame, MessageEvent) and frame.message.seq == before[-1].seq:
                        break
            seen = agent.last_seq
            assert seen == {conv: before[-1].seq}
        # agent is offline now
        missed = [await hana.send_text(conv, f"while away {i}") for i in range(25)]
        async with server.connect("agent7", "agent", "shop1", resume=dict(seen)) as agent:
            seqs, synced = await _until_synced(agent)
        assert seqs == [m.seq for m in missed]
        assert synced.last_seq == {conv: missed[-1].seq}


async def test_resume_while_messages_keep_coming(server: RunningServer) -> None:
    """Replay and live traffic overlap: still no gap and no duplicate."""
    async with server.connect("ivan") as ivan:
        conv = (await ivan.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        async with server.connect("agent8", "agent", "shop1") as agent:
            await agent.request(UpdateConversation(id=0, conv=conv, agent="agent8"))
            resume_from = 1  # the agent saw the system message only
        for i in range(150):  # within the per-connection burst
            await ivan.start_request(_text(conv, f"backlog {i}"))
        stop = trio.Event()

        async def keep_sending() -> None:
            i = 0
            while not stop.is_set():
                await ivan.send_text(conv, f"live {i}")
                i += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_sending)
            async with server.connect(
                "agent8", "agent", "shop1", resume={conv: resume_from}
            ) as agent:
                seqs, _ = await _until_synced(agent)
                target = seqs[-1] + 20
                with trio.fail_after(20):
                    async for frame in agent.events:
                        if isinstance(frame, MessageEvent):
                            seqs.append(frame.message.seq)
                            if frame.message.seq >= target:
                                break
            stop.set()
        assert seqs == list(range(resume_from + 1, seqs[-1] + 1))


def _text(conv: str, text: str) -> object:
    from protocol import Send, TextBody

    return Send(id=0, conv=conv, cmid=text, body=TextBody(text=text))
