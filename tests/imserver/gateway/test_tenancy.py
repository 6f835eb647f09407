"""Tenant isolation on a live server: one shop's credentials never reach
another shop's data (the findings of the security review, issue 10)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from imserver.client import Client, ServerError
from imserver.limits import CUSTOMER_OPENS_BURST
from imserver.store import PutShop
from protocol import (
    AgentStatus,
    ConversationEvent,
    ConvState,
    CreateGroup,
    ListConversations,
    MessageEvent,
    Notify,
    OpenConversation,
    PluginEvent,
    Send,
    SetAgentStatus,
    Subscribe,
    TextBody,
    Topic,
    UpdateConversation,
    UpdateMembers,
    WatchPresence,
    WorkerAssignment,
    WorkerEvent,
    WorkerEventKind,
    WorkerJoin,
)
from tests.conftest import RunningServer


async def _open(client: Client, shop: str) -> str:
    return str((await client.request(OpenConversation(id=0, shop=shop))).conversation.id)


async def _refused(client: Client, request: object, code: str = "forbidden") -> str:
    with pytest.raises(ServerError) as refused:
        await client.request(request)
    assert refused.value.code == code, refused.value
    return refused.value.error.message


async def test_a_worker_joins_only_its_tokens_plugin(server: RunningServer) -> None:
    kinds = [WorkerEventKind.MESSAGE]
    async with (
        server.connect("intruder", "worker", "shop2", plugin="evil") as evil,
        server.connect("anon", "worker", "shop2") as anon,
    ):
        assert "evil" in await _refused(evil, WorkerJoin(id=0, plugin="crm", kinds=kinds))
        assert "no plugin" in await _refused(anon, WorkerJoin(id=0, plugin="crm", kinds=kinds))
    dispatcher = server.server.dispatcher
    assert dispatcher is not None and not dispatcher.groups


async def test_a_shop_worker_sees_its_shop_only_and_takes_no_shards_of_others(
    server: RunningServer,
) -> None:
    """A shop2 worker under the real plugin's name (its token says ``crm``) is a
    group of its own: the global crm keeps all its shards and every event, the
    shop2 one gets shop2's events and nothing of shop1's."""
    kinds = [WorkerEventKind.MESSAGE]
    async with (
        server.connect("worker:crm", "worker", "*", plugin="crm") as crm,
        server.connect("shop2-crm", "worker", "shop2", plugin="crm") as crm2,
        server.connect("alice") as alice,
        server.connect("bob") as bob,
    ):
        joined = await crm.request(WorkerJoin(id=0, plugin="crm", kinds=kinds))
        joined2 = await crm2.request(WorkerJoin(id=0, plugin="crm", kinds=kinds))
        assert len(joined.shards) == len(joined2.shards) == joined.shard_count
        secret = await alice.send_text(await _open(alice, "shop1"), "my address is ...")
        hello = await bob.send_text(await _open(bob, "shop2"), "hello shop2")
        # shop1's message was published before bob's: had crm2 got it, it came first
        async for frame in crm2.events:
            if isinstance(frame, WorkerEvent):
                assert frame.message is not None and frame.shop == "shop2"
                assert frame.message.conv == hello.conv
                break
        else:
            raise AssertionError("the shop2 worker's connection ended")
        seen: list[str] = []
        async for frame in crm.events:
            assert not isinstance(frame, WorkerAssignment)  # its shards never moved
            if isinstance(frame, WorkerEvent) and frame.message is not None:
                seen.append(frame.message.conv)
                if len(seen) == 2:
                    break
        else:
            raise AssertionError("the crm worker's connection ended")
        assert seen == [secret.conv, hello.conv]


async def test_notify_reaches_only_users_of_the_workers_shop(server: RunningServer) -> None:
    async with (
        server.connect("w2", "worker", "shop2", plugin="p") as w2,
        server.connect("w1", "worker", "shop1", plugin="p") as w1,
        server.connect("alice") as alice,
        server.connect("bob") as bob,
        server.connect("ag2", "agent", "shop2") as ag2,
    ):
        await _open(alice, "shop1")
        await _open(bob, "shop2")
        await ag2.request(SetAgentStatus(id=0, status=AgentStatus.ONLINE))
        # a shop2 worker cannot reach shop1's customer (nor a stranger) ...
        phishing = Notify(id=0, kind="promo", data={"url": "http://evil"}, user="alice")
        await _refused(w2, phishing)
        await _refused(w2, Notify(id=0, kind="promo", user="nobody"))
        await _refused(w2, Notify(id=0, kind="promo", shop="shop1"))
        # ... but its own shop's customer and agent
        await w2.request(Notify(id=0, kind="queue", user="bob"))
        await w2.request(Notify(id=0, kind="sidebar", user="ag2"))
        # alice's first plugin event is shop1's own, not the phishing one
        await w1.request(Notify(id=0, kind="welcome", user="alice"))
        for client, kind in ((alice, "welcome"), (bob, "queue"), (ag2, "sidebar")):
            async for frame in client.events:
                if isinstance(frame, PluginEvent):
                    assert frame.kind == kind
                    break
            else:
                raise AssertionError("connection ended")


async def test_presence_only_of_users_of_the_watchers_shop(server: RunningServer) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("bob") as bob,
        server.connect("sup1", "supervisor", "shop1") as sup1,
        server.connect("ag2", "agent", "shop2") as ag2,
    ):
        await _open(alice, "shop1")
        await _open(bob, "shop2")
        message = await _refused(ag2, WatchPresence(id=0, users=["bob", "alice"]))
        assert "alice" in message and "bob" not in message
        await _refused(ag2, WatchPresence(id=0, users=["sup1"]))  # another shop's staff
        listing = await ag2.request(WatchPresence(id=0, users=["bob"]))
        assert [p.user for p in listing.presences] == ["bob"]
        listing = await sup1.request(WatchPresence(id=0, users=["alice", "sup1"]))
        assert [p.online for p in listing.presences] == [True, True]
        await _refused(alice, WatchPresence(id=0, users=["sup1"]))  # customers: never


async def test_a_transfer_goes_only_to_an_agent_of_the_conversations_shop(
    server: RunningServer,
) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("mallory") as mallory,
        server.connect("sup1", "supervisor", "shop1") as sup1,
        server.connect("a1", "agent", "shop1") as a1,
        server.connect("a2", "agent", "shop2") as a2,
        server.connect("fresh", "agent", "shop1") as fresh,
    ):
        await a2.request(SetAgentStatus(id=0, status=AgentStatus.ONLINE))
        await fresh.request(SetAgentStatus(id=0, status=AgentStatus.ONLINE))
        conv = await _open(alice, "shop1")
        mine = await _open(mallory, "shop1")
        await a1.request(UpdateConversation(id=0, conv=conv, agent="a1"))  # a claim
        for target in ("mallory", "a2", "nobody"):
            note = f"internal note for {target}"
            for who in (sup1, a1):
                reason = await _refused(
                    who, UpdateConversation(id=0, conv=conv, agent=target, note=note)
                )
                assert target in reason and "shop1" in reason
        # a real agent of the shop: the transfer goes through, note and staff view
        await sup1.request(UpdateConversation(id=0, conv=conv, agent="fresh", note="vip"))
        async for frame in fresh.events:
            if isinstance(frame, ConversationEvent) and frame.note:
                assert frame.note == "vip" and frame.conversation.agent == "fresh"
                break
        else:
            raise AssertionError("the agent's connection ended")
        # nothing of it reached mallory: up to the supervisor's message to her,
        # no event about alice's conversation
        await sup1.send_text(mine, "how can we help?")
        async for frame in mallory.events:
            assert not isinstance(frame, ConversationEvent) or frame.conversation.id != conv
            if isinstance(frame, MessageEvent) and frame.message.conv == mine:
                break
        else:
            raise AssertionError("mallory's connection ended")


async def test_unknown_shops_are_refused(server: RunningServer) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("sup", "supervisor", "nowhere") as sup,
        server.connect("root", "admin", "*") as root,
    ):
        for client, request in (
            (alice, OpenConversation(id=0, shop="made-up-1")),
            (sup, CreateGroup(id=0, shop="nowhere", title="t")),
            (sup, Subscribe(id=0, topics=[Topic.CONVERSATIONS])),
            (root, CreateGroup(id=0, shop="made-up-2", title="t")),
            (root, Subscribe(id=0, topics=[Topic.MESSAGES], shop="made-up-2")),
        ):
            assert "registered" in await _refused(client, request, "unknown_shop")
        page = await root.request(ListConversations(id=0))
        assert page.conversations == []  # nothing was created for them


async def test_a_shop_added_while_running_is_served(server: RunningServer) -> None:
    from imserver.server import DB_FILE
    from imserver.store import add_shops

    async with server.connect("alice") as alice:
        await _refused(alice, OpenConversation(id=0, shop="late-shop"), "unknown_shop")
        add_shops(server.data_dir / DB_FILE, ["late-shop"])  # `imserver shop add`
        assert (await alice.request(OpenConversation(id=0, shop="late-shop"))).conversation


async def test_customers_open_at_a_bounded_rate(server: RunningServer) -> None:
    async with server.connect("spammer") as spammer, server.connect("other") as other:
        for _ in range(CUSTOMER_OPENS_BURST):
            await spammer.request(OpenConversation(id=0, shop="shop1"))
        with pytest.raises(ServerError) as refused:
            await spammer.request(OpenConversation(id=0, shop="shop2"))
        assert refused.value.code == "rate_limited"
        assert refused.value.error.retry_after_ms > 0
        await other.request(OpenConversation(id=0, shop="shop2"))  # per customer


async def test_customers_have_a_bounded_number_of_open_conversations(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imserver.gateway import _session
    from imserver.shards import _actor

    monkeypatch.setattr(_session, "MAX_OPEN_CONVERSATIONS_PER_CUSTOMER", 2)
    monkeypatch.setattr(_actor, "MAX_OPEN_CONVERSATIONS_PER_CUSTOMER", 2)
    async with (
        server.connect("hoarder") as hoarder,
        server.connect("sup", "supervisor", "shop1") as sup,
        server.connect("sup-s1", "supervisor", "s1") as sup_s1,
    ):
        first = await _open(hoarder, "shop1")
        await _open(hoarder, "shop2")
        message = await _refused(hoarder, OpenConversation(id=0, shop="s1"), "rate_limited")
        assert "open already" in message
        await _open(hoarder, "shop1")  # an open one may be opened again
        await sup.request(UpdateConversation(id=0, conv=first, state=ConvState.CLOSED))
        second = await _open(hoarder, "s1")  # closing one makes room
        # writing into a closed conversation would reopen it: the same cap
        back = Send(id=0, conv=first, cmid="back", body=TextBody(text="back"))
        assert "open already" in await _refused(hoarder, back, "rate_limited")
        await sup_s1.request(UpdateConversation(id=0, conv=second, state=ConvState.CLOSED))
        assert (await hoarder.request(back)).seq > 0


async def test_staff_who_logged_in_to_a_shop_are_its_agents(server: RunningServer) -> None:
    from imserver.store import PutShop

    store = server.server.store
    assert store is not None
    async with (
        server.connect("alice") as alice,
        server.connect("sup1", "supervisor", "shop1") as sup1,
        server.connect("newbie", "agent", "shop1"),
    ):
        # the login's staff row was queued before our Welcome came: a later
        # write's commit means it is committed too (commits keep their order)
        await store.write([PutShop(name="shop1", ts=0)])
        conv = await _open(alice, "shop1")
        await sup1.request(UpdateConversation(id=0, conv=conv, agent="newbie"))
        assert await store.shop_users("shop1", ["newbie", "alice", "sup1"]) == {
            "newbie",
            "alice",
            "sup1",
        }
        assert not await store.is_shop_agent("shop2", "newbie")


async def test_group_members_are_users_of_the_groups_shop(server: RunningServer) -> None:
    """Staff of shop2 cannot pull shop1's customer (nor shop1's agent, nor a
    stranger) into a shop2 group, by creating it or by adding members: that
    would be a channel from shop2 into shop1's customers."""
    store = server.server.store
    assert store is not None
    async with server.connect("old2", "agent", "shop2"):
        pass
    await store.write([PutShop(name="shop2", ts=0)])  # old2's login record is committed
    async with (
        server.connect("alice") as alice,
        server.connect("bob") as bob,
        server.connect("ag2", "agent", "shop2") as ag2,
        server.connect("sup2", "supervisor", "shop2"),
        server.connect("w2", "worker", "shop2", plugin="p"),
        server.connect("a1", "agent", "shop1") as a1,
    ):
        alices = await _open(alice, "shop1")
        await _open(bob, "shop2")
        for stranger in ("alice", "a1", "nobody"):
            create = CreateGroup(id=0, shop="shop2", title="deals", members=["bob", stranger])
            reason = await _refused(ag2, create)
            assert "not users of shop 'shop2'" in reason
            assert stranger in reason and "bob" not in reason
        # its users: a customer of it, its staff connected now (sup2, w2) or known (old2)
        members = ["bob", "sup2", "w2", "old2"]
        created = await ag2.request(CreateGroup(id=0, shop="shop2", title="deals", members=members))
        group = created.conversation.id
        reason = await _refused(ag2, UpdateMembers(id=0, conv=group, add=["alice"]))
        assert "alice" in reason
        sent = await ag2.send_text(group, "click http://evil")
        async for frame in bob.events:
            if isinstance(frame, MessageEvent) and frame.message.conv == group:
                assert frame.message.seq == sent.seq
                break
        else:
            raise AssertionError("bob's connection ended")
        # nothing of the group reached alice: up to a message from her own shop
        await a1.request(UpdateConversation(id=0, conv=alices, agent="a1"))
        await a1.send_text(alices, "hello from shop1")
        async for frame in alice.events:
            if isinstance(frame, ConversationEvent):
                assert frame.conversation.id != group
            if isinstance(frame, MessageEvent):
                assert frame.message.conv != group
                if frame.message.sender == "a1":
                    break
        else:
            raise AssertionError("alice's connection ended")


async def test_fan_out_skips_a_member_session_that_may_not_read(server: RunningServer) -> None:
    """One user id, two platform tokens: agent of shop2 (a member of a shop2
    group) and agent of shop1. Fan-out goes by token, not by user id: the
    shop1 session gets nothing of the shop2 group."""
    async with (
        server.connect("dual", "agent", "shop2", device="as-shop2") as dual2,
        server.connect("dual", "agent", "shop1", device="as-shop1") as dual1,
        server.connect("ag2", "agent", "shop2") as ag2,
        server.connect("alice") as alice,
    ):
        group = (
            await ag2.request(CreateGroup(id=0, shop="shop2", title="team", members=["dual"]))
        ).conversation.id
        sent = await ag2.send_text(group, "shop2 internal")  # fanned out before the ack
        async for frame in dual2.events:
            if isinstance(frame, MessageEvent) and frame.message.conv == group:
                assert frame.message.seq == sent.seq
                break
        else:
            raise AssertionError("the shop2 session's connection ended")
        conv = await _open(alice, "shop1")
        await dual1.request(UpdateConversation(id=0, conv=conv, agent="dual"))
        await alice.send_text(conv, "hello shop1")
        async for frame in dual1.events:
            if isinstance(frame, MessageEvent):
                assert frame.message.conv == conv, "the shop1 session got the shop2 group"
                if frame.message.sender == "alice":
                    break
        else:
            raise AssertionError("the shop1 session's connection ended")


async def test_a_transfer_right_after_the_agents_welcome(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's login record is written in the background: with that write
    held back (a slow disk), a transfer to them right after their Welcome goes
    through, because they are connected as an agent of the shop now."""
    from imserver.store import PutStaff

    store = server.server.store
    assert store is not None
    release = trio.Event()
    write = store.write

    async def slow_staff_write(ops: Any) -> Any:
        if any(isinstance(op, PutStaff) and op.user == "late" for op in ops):
            await release.wait()
        return await write(ops)

    monkeypatch.setattr(store, "write", slow_staff_write)
    async with (
        server.connect("alice") as alice,
        server.connect("sup1", "supervisor", "shop1") as sup1,
    ):
        conv = await _open(alice, "shop1")
        async with server.connect("late", "agent", "shop1") as late:
            assert not await store.is_shop_agent("shop1", "late")  # not committed
            await sup1.request(UpdateConversation(id=0, conv=conv, agent="late"))
            async for frame in late.events:
                if isinstance(frame, ConversationEvent) and frame.conversation.id == conv:
                    assert frame.conversation.agent == "late"
                    break
            else:
                raise AssertionError("the agent's connection ended")
        release.set()
        # gone and its record not yet known: no longer an agent of the shop
        # (until the store has it), and never one of another shop
        reason = await _refused(sup1, UpdateConversation(id=0, conv=conv, agent="ghost"))
        assert "ghost" in reason
