"""Actor semantics through a real server: seq, ordering, idempotency, recall, routing."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from imserver.client import Client, ServerError
from protocol import (
    ConversationEvent,
    ConversationInfo,
    ConvState,
    CreateGroup,
    History,
    HistoryPage,
    MessageEvent,
    OpenConversation,
    Recall,
    RecallBody,
    Send,
    Sent,
    SystemBody,
    TextBody,
    UpdateConversation,
)
from tests.conftest import RunningServer


async def _collect_messages(client: Client, conv: str, count: int) -> list[MessageEvent]:
    got: list[MessageEvent] = []
    with trio.fail_after(30):
        async for frame in client.events:
            if isinstance(frame, MessageEvent) and frame.message.conv == conv:
                got.append(frame)
                if len(got) == count:
                    return got
    raise AssertionError(f"stream ended after {len(got)} of {count}")


async def test_direct_chat_customer_to_agent(server: RunningServer) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("agent1", "agent", "shop1") as agent,
    ):
        info: ConversationInfo = await alice.request(OpenConversation(id=0, shop="shop1"))
        conv = info.conversation
        assert conv.state is ConvState.BOT and conv.customer == "alice"
        # Opening again returns the same conversation (one per customer and shop).
        again: ConversationInfo = await alice.request(OpenConversation(id=0, shop="shop1"))
        assert again.conversation.id == conv.id
        await agent.request(
            UpdateConversation(id=0, conv=conv.id, state=ConvState.ASSIGNED, agent="agent1")
        )
        sent = await alice.send_text(conv.id, "where is my order?")
        assert sent.seq == 2  # seq 1 is the "assigned" system message
        events = await _collect_messages(agent, conv.id, 2)
        assert isinstance(events[0].message.body, SystemBody)
        assert events[0].message.body.event == "assigned"
        assert events[1].message.seq == 2
        assert events[1].message.body == TextBody(text="where is my order?")
        assert events[1].message.sender == "alice"
        reply = await agent.send_text(conv.id, "it ships today")
        assert reply.seq == 3
        customer_view = await _collect_messages(alice, conv.id, 2)
        assert [e.message.seq for e in customer_view] == [1, 3]


async def test_twenty_concurrent_senders_get_gapless_ordered_seqs(server: RunningServer) -> None:
    senders = [f"member{i}" for i in range(20)]
    per_sender = 200
    total = len(senders) * per_sender
    for name in senders:  # group members are users of the shop: customers of it here
        async with server.connect(name) as client:
            await client.request(OpenConversation(id=0, shop="shop1"))
    async with server.connect("owner", "agent", "shop1") as owner:
        info: ConversationInfo = await owner.request(
            CreateGroup(id=0, shop="shop1", title="fans", members=senders)
        )
        conv = info.conversation.id
        observed: dict[str, list[tuple[int, str, str]]] = {}
        online = 0
        all_online = trio.Event()

        async def member(name: str) -> None:
            nonlocal online
            async with server.connect(name) as client:
                online += 1
                if online == len(senders):
                    all_online.set()
                await all_online.wait()
                pending = [
                    await client.start_request(_send(conv, name, i)) for i in range(per_sender)
                ]
                acks: list[Sent] = [await p.result() for p in pending]
                seqs = [a.seq for a in acks]
                assert seqs == sorted(seqs), "a sender's messages were reordered"
                stream = await _collect_messages(client, conv, total - per_sender)
                observed[name] = [(e.message.seq, e.message.sender, _text(e)) for e in stream]

        async def watcher() -> None:
            stream = await _collect_messages(owner, conv, total)
            observed["owner"] = [(e.message.seq, e.message.sender, _text(e)) for e in stream]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher)
            for name in senders:
                nursery.start_soon(member, name)

    full = observed["owner"]
    assert [seq for seq, _, _ in full] == list(range(1, total + 1))
    for name in senders:
        mine = [int(text.split(":")[1]) for _, sender, text in full if sender == name]
        assert mine == list(range(per_sender)), f"{name}'s messages out of order"
        # every participant sees the same order (the sender's own messages excepted: it has acks)
        others = [entry for entry in full if entry[1] != name]
        assert observed[name] == others


def _send(conv: str, name: str, i: int) -> object:
    from protocol import Send

    return Send(id=0, conv=conv, cmid=f"{name}-{i}", body=TextBody(text=f"{name}:{i}"))


def _text(event: MessageEvent) -> str:
    body = event.message.body
    assert isinstance(body, TextBody)
    return body.text


async def test_retried_send_is_stored_once(server: RunningServer) -> None:
    async with server.connect("bob") as bob:
        info: ConversationInfo = await bob.request(OpenConversation(id=0, shop="shop1"))
        conv = info.conversation.id
        first = await bob.send_text(conv, "hello", cmid="same-id")
        retry = await bob.send_text(conv, "hello", cmid="same-id")
        assert retry.seq == first.seq and retry.duplicate and not first.duplicate
        nxt = await bob.send_text(conv, "next")
        assert nxt.seq == first.seq + 1
        page: HistoryPage = await bob.request(History(id=0, conv=conv))
        assert [m.cmid for m in page.messages].count("same-id") == 1
    # ... and across a reconnect (a new actor instance would reload the window)
    async with server.connect("bob") as bob:
        retry2 = await bob.send_text(conv, "hello", cmid="same-id")
        assert retry2.seq == first.seq and retry2.duplicate


async def test_recall_by_author_only(server: RunningServer) -> None:
    async with (
        server.connect("carol") as carol,
        server.connect("agent2", "agent", "shop1") as agent,
    ):
        conv = (await carol.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await agent.request(UpdateConversation(id=0, conv=conv, agent="agent2"))
        sent = await carol.send_text(conv, "oops, my phone number")
        with pytest.raises(ServerError) as refused:
            await agent.request(Recall(id=0, conv=conv, seq=sent.seq))
        assert refused.value.code == "forbidden"
        recall: Sent = await carol.request(Recall(id=0, conv=conv, seq=sent.seq))
        assert recall.seq == sent.seq + 1
        again: Sent = await carol.request(Recall(id=0, conv=conv, seq=sent.seq))
        assert again.duplicate and again.seq == recall.seq
        page: HistoryPage = await agent.request(History(id=0, conv=conv))
        by_seq = {m.seq: m for m in page.messages}
        assert by_seq[sent.seq].recalled and by_seq[sent.seq].body == TextBody(text="")
        assert by_seq[recall.seq].body == RecallBody(seq=sent.seq)


async def test_transfer_moves_the_chat_and_tells_both_agents(server: RunningServer) -> None:
    async with (
        server.connect("dave") as dave,
        server.connect("a1", "agent", "shop1") as a1,
        server.connect("a2", "agent", "shop1") as a2,
    ):
        conv = (await dave.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await a1.request(UpdateConversation(id=0, conv=conv, agent="a1"))
        await a1.request(UpdateConversation(id=0, conv=conv, agent="a2", note="VIP, refund case"))
        with trio.fail_after(10):
            async for frame in a2.events:
                if isinstance(frame, ConversationEvent) and frame.note:
                    assert frame.note == "VIP, refund case" and frame.conversation.agent == "a2"
                    break
        # a1 no longer owns it: sending is refused
        with pytest.raises(ServerError) as refused:
            await a1.send_text(conv, "still here?")
        assert refused.value.code in ("forbidden", "not_found")
        await a2.send_text(conv, "hello, I am taking over")


async def test_history_pages_fit_in_one_frame(server: RunningServer) -> None:
    """200 messages of 5000 CJK characters (15 kB each) cannot go in one frame."""
    from protocol import MAX_SERVER_FRAME_BYTES, MAX_TEXT_CHARS, encode

    async with (
        server.connect("writer", "worker", "shop1") as writer,
        server.connect("reader") as reader,
    ):
        conv = (await reader.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        pending = [await writer.start_request(_send(conv, "w", i)) for i in range(5)]
        for p in pending:
            await p.result()
        long_text = "长" * MAX_TEXT_CHARS
        pending = [
            await writer.start_request(
                Send(id=0, conv=conv, cmid=f"long{i}", body=TextBody(text=long_text))
            )
            for i in range(200)
        ]
        for p in pending:
            await p.result()
        newest: HistoryPage = await reader.request(History(id=0, conv=conv, limit=200))
        assert len(encode(newest)) <= MAX_SERVER_FRAME_BYTES
        assert newest.has_more and newest.messages[-1].seq == 205
        seqs = [m.seq for m in newest.messages]
        assert seqs == list(range(seqs[0], 206))
        oldest: HistoryPage = await reader.request(History(id=0, conv=conv, after=0, limit=200))
        assert oldest.messages[0].seq == 1 and oldest.has_more
        assert len(encode(oldest)) <= MAX_SERVER_FRAME_BYTES


async def test_idle_actor_passivates_and_comes_back_with_its_state(server: RunningServer) -> None:
    shards = server.server.shards
    assert shards is not None
    async with server.connect("pat") as pat:
        conv = (await pat.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        first = await pat.send_text(conv, "one", cmid="c-one")
        actor = shards.actors[conv]
        await trio.testing.wait_all_tasks_blocked()  # the actor is waiting for work
        assert not actor.try_passivate(trio.current_time())  # not idle long enough yet
        assert actor.try_passivate(trio.current_time() + 3600)
        assert conv not in shards.actors
        second = await pat.send_text(conv, "two")
        assert second.seq == first.seq + 1  # a new actor, reloaded from the store
        assert shards.actors[conv] is not actor
        retry = await pat.send_text(conv, "one", cmid="c-one")
        assert retry.duplicate and retry.seq == first.seq


async def test_actor_crash_loses_nothing_acked_and_restarts(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing disk write crashes the actor mid-batch: the batch is answered with
    ``internal`` (not acked), the actor restarts from the store, retries succeed."""
    store = server.server.store
    assert store is not None
    real_write = store.write
    failures = 1

    async def failing_write(ops: object) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise OSError("disk full (injected)")
        await real_write(ops)  # type: ignore[arg-type]

    async with server.connect("quinn") as quinn:
        conv = (await quinn.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        ok = await quinn.send_text(conv, "before")
        monkeypatch.setattr(store, "write", failing_write)
        with pytest.raises(ServerError) as failed:
            await quinn.request(Send(id=0, conv=conv, cmid="during", body=TextBody(text="x")))
        assert failed.value.code == "internal"
        retry = await quinn.send_text(conv, "x", cmid="during")  # the client's retry
        assert retry.seq == ok.seq + 1 and not retry.duplicate
        page: HistoryPage = await quinn.request(History(id=0, conv=conv))
        assert [m.cmid for m in page.messages][-2:] == [ok.cmid, "during"]
