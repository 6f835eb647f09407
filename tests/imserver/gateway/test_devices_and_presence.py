"""Several devices of one user, read-state sync, unread counts, presence, typing, idle timeout."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from imserver.client import Client, ConnectionClosed, ServerError
from imserver.server import Server, ServerConfig
from protocol import (
    CloseCode,
    ConversationPage,
    ConvState,
    ListConversations,
    MessageEvent,
    OpenConversation,
    PresenceEvent,
    PresenceList,
    Read,
    ReceiptEvent,
    ReceiptKind,
    Typing,
    TypingEvent,
    UpdateConversation,
    WatchPresence,
)
from tests.conftest import SECRET, SHOPS, RunningServer


async def _next(client: Client, kind: type) -> object:
    with trio.fail_after(10):
        async for frame in client.events:
            if isinstance(frame, kind):
                return frame
    raise AssertionError(f"no {kind.__name__}")


async def test_devices_share_one_stream_and_read_state(server: RunningServer) -> None:
    async with (
        server.connect("jay", device="phone") as phone,
        server.connect("jay", device="laptop") as laptop,
        server.connect("ag", "agent", "shop1") as agent,
    ):
        conv = (await phone.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await agent.request(UpdateConversation(id=0, conv=conv, agent="ag"))
        sent = await phone.send_text(conv, "from my phone")
        # the laptop sees what the phone sent (one stream across devices)
        while True:
            ev = await _next(laptop, MessageEvent)
            assert isinstance(ev, MessageEvent)
            if ev.message.seq == sent.seq:
                assert ev.message.sender == "jay"
                break
        reply = await agent.send_text(conv, "hello jay")
        page: ConversationPage = await laptop.request(ListConversations(id=0))
        [listed] = page.conversations
        assert listed.id == conv and listed.unread == 1 and listed.read_seq == sent.seq
        assert listed.tags == [] and listed.priority == 0  # internal fields hidden from customers
        # reading on the phone syncs to the laptop, and the agent gets a read receipt
        await phone.request(Read(id=0, conv=conv, seq=reply.seq))
        receipt = await _next(laptop, ReceiptEvent)
        assert isinstance(receipt, ReceiptEvent) and receipt.seq == reply.seq
        agent_receipt = await _next(agent, ReceiptEvent)
        assert isinstance(agent_receipt, ReceiptEvent)
        assert agent_receipt.kind is ReceiptKind.READ and agent_receipt.user == "jay"
        page = await laptop.request(ListConversations(id=0))
        assert page.conversations[0].unread == 0


async def test_same_device_login_replaces_the_old_session(server: RunningServer) -> None:
    async with server.connect("kim", device="phone") as old, server.connect("kim", device="phone"):
        with trio.fail_after(10):
            await old.closed.wait()
        assert old.close_code == CloseCode.SESSION_REPLACED


async def _customer_of(server: RunningServer, user: str, shop: str) -> None:
    """Make ``user`` a customer of ``shop`` (staff may watch only their shop's users)."""
    async with server.connect(user, device=f"{user}-setup") as customer:
        await customer.request(OpenConversation(id=0, shop=shop))


async def test_presence_and_typing(server: RunningServer) -> None:
    await _customer_of(server, "lee", "shop1")
    async with server.connect("sup", "supervisor", "shop1") as sup:
        listing: PresenceList = await sup.request(WatchPresence(id=0, users=["lee"]))
        assert not listing.presences[0].online
        async with server.connect("lee") as lee, server.connect("ag2", "agent", "shop1") as agent:
            online = await _next(sup, PresenceEvent)
            assert isinstance(online, PresenceEvent) and online.presence.online
            conv = (await lee.request(OpenConversation(id=0, shop="shop1"))).conversation.id
            await agent.request(
                UpdateConversation(id=0, conv=conv, state=ConvState.ASSIGNED, agent="ag2")
            )
            await lee.notify(Typing(conv=conv))
            typing = await _next(agent, TypingEvent)
            assert isinstance(typing, TypingEvent) and typing.user == "lee"
            # customers may not watch presence
            with pytest.raises(ServerError) as refused:
                await lee.request(WatchPresence(id=0, users=["ag2"]))
            assert refused.value.code == "forbidden"
        offline = await _next(sup, PresenceEvent)
        assert isinstance(offline, PresenceEvent) and not offline.presence.online


async def test_idle_connection_is_closed(tmp_path: Path) -> None:
    config = ServerConfig(
        data_dir=tmp_path / "d", secret=SECRET, port=0, shops=SHOPS, idle_timeout_ms=300
    )
    srv = Server(config)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(srv.serve)
        running = RunningServer(server=srv, url=url, data_dir=config.data_dir)
        async with running.connect("quiet") as quiet:
            assert quiet.welcome.idle_timeout_ms == 300
            with trio.fail_after(10):
                await quiet.closed.wait()
            assert quiet.close_code == CloseCode.IDLE_TIMEOUT
            with pytest.raises(ConnectionClosed):
                await quiet.send_text("x", "too late")
        srv.stop()


async def test_unwatch_and_unsubscribe_stop_the_events(server: RunningServer) -> None:
    from protocol import Ok, Subscribe, Synced, Topic, Unsubscribe, Unwatch

    await _customer_of(server, "wes", "shop1")
    await _customer_of(server, "vic", "shop1")
    async with server.connect("sup2", "supervisor", "shop1") as sup:
        await sup.request(WatchPresence(id=0, users=["wes", "vic"]))
        await sup.request(Subscribe(id=0, topics=[Topic.CONVERSATIONS]))
        assert isinstance(await sup.request(Unwatch(id=0, users=["wes"])), Ok)
        assert isinstance(await sup.request(Unsubscribe(id=0, topics=[Topic.CONVERSATIONS])), Ok)
        async with server.connect("wes"):  # no presence event any more
            pass
        async with server.connect("xan") as xan:
            await xan.request(OpenConversation(id=0, shop="shop1"))  # no queue event any more
        async with server.connect("vic"):
            seen = []
            with trio.fail_after(10):
                async for frame in sup.events:
                    if isinstance(frame, Synced):
                        continue  # sent once after Welcome
                    seen.append(frame)
                    if isinstance(frame, PresenceEvent):
                        break
        # vic is still watched; wes's presence and conversation are not reported any more
        assert len(seen) == 1 and seen[0].presence.user == "vic"  # type: ignore[union-attr]
    ctx = server.server.ctx
    assert ctx is not None and not ctx.hub.topics and "wes" not in ctx.hub.watchers


async def test_reopening_the_app_shows_the_right_unread_count(server: RunningServer) -> None:
    async with server.connect("uma") as uma, server.connect("ag9", "agent", "shop1") as agent:
        conv = (await uma.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await agent.request(UpdateConversation(id=0, conv=conv, agent="ag9"))
        for i in range(3):
            last = await agent.send_text(conv, f"answer {i}")
        await uma.request(Read(id=0, conv=conv, seq=last.seq - 1))
    # the conversation's actor is passivated meanwhile: the read point comes from the store
    shards = server.server.shards
    assert shards is not None
    await trio.testing.wait_all_tasks_blocked()
    assert shards.actors[conv].try_passivate(trio.current_time() + 3600)
    async with server.connect("uma", device="tablet") as tablet:
        info = await tablet.request(OpenConversation(id=0, shop="shop1"))
        assert info.conversation.read_seq == last.seq - 1
        assert info.conversation.unread == 1
