"""The worker dispatcher with a real store: shard split, acks, failover, own messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from imserver.dispatch import WorkerDispatcher, group_key
from imserver.store import PutCursor, PutEvent, SqliteStore, StoredEvent
from protocol import (
    AgentStatus,
    Conversation,
    ConvKind,
    ConvState,
    Message,
    Role,
    ServerFrameType,
    TextBody,
    WorkerAssignment,
    WorkerEvent,
    WorkerEventKind,
    decode_server_frame,
)


class Recorder:
    """A worker session as the dispatcher sees it: frames are decoded and kept."""

    def __init__(self, peer_id: str, user: str) -> None:
        self.id = peer_id
        self.user = user
        self.frames: list[ServerFrameType] = []

    def push_event(self, conv: str, seq: int, data: bytes) -> None:
        # data is a WebSocket frame: 2-byte header for payloads < 126 bytes, else 4
        header = 2 if data[1] < 126 else 4
        self.frames.append(decode_server_frame(data[header:]))

    def send_frame(self, frame: ServerFrameType) -> None:
        self.frames.append(frame)

    def events(self) -> list[WorkerEvent]:
        return [f for f in self.frames if isinstance(f, WorkerEvent)]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "db.sqlite")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        yield store
        nursery.cancel_scope.cancel()


async def _log(
    store: SqliteStore, shard: int, sender: str, role: Role = Role.CUSTOMER, shop: str = "s"
) -> StoredEvent:
    conv = Conversation(
        id=f"c{shard}{shop}", kind=ConvKind.DIRECT, shop=shop, state=ConvState.BOT, customer="cust"
    )
    message = Message(
        conv=conv.id,
        seq=1,
        sender=sender,
        sender_role=role,
        cmid="m",
        ts=1,
        body=TextBody(text="hi"),
    )
    op = PutEvent(
        shard=shard,
        kind=WorkerEventKind.MESSAGE,
        event=WorkerEvent(
            event_id=0,
            shard=shard,
            kind=WorkerEventKind.MESSAGE,
            ts=1,
            conversation=conv,
            message=message,
            shop=shop,
        ),
    )
    await store.write([op])
    return op.stored()


async def test_shards_split_acks_failover_and_own_messages(store: SqliteStore) -> None:
    dispatcher = WorkerDispatcher(store, shard_count=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        a, b = Recorder("a", "worker:bot"), Recorder("b", "worker:bot")
        joined_a = await dispatcher.join(a, "bot", [WorkerEventKind.MESSAGE])
        joined_b = await dispatcher.join(b, "bot", [WorkerEventKind.MESSAGE])
        assert sorted(joined_a.shards + joined_b.shards) == [0, 1, 2, 3]
        assert any(isinstance(f, WorkerAssignment) for f in a.frames)  # a gave shards to b
        for shard in range(4):
            dispatcher.publish(await _log(store, shard, "cust"))
        own = await _log(store, 0, "worker:bot", Role.WORKER)  # the plugin's own reply
        dispatcher.publish(own)
        got_a = {e.shard for e in a.events()}
        got_b = {e.shard for e in b.events()}
        assert got_a == set(joined_a.shards) and got_b == set(joined_b.shards)
        assert all(
            e.message is not None and e.message.sender == "cust" for e in a.events() + b.events()
        )
        # a acks its events, b dies without acking: b's events go to a
        dispatcher.ack(a, [e.event_id for e in a.events()])
        before = len(a.events())
        dispatcher.leave(b)
        moved = a.events()[before:]
        assert {e.shard for e in moved} == got_b
        assert [e.event_id for e in moved] == sorted(e.event_id for e in b.events())
        dispatcher.ack(a, [e.event_id for e in moved])
        group = dispatcher.groups["bot"]
        assert not group.inflight
        # everything is acked or was never due (its own reply): the watermark covers all
        assert group.watermark == own.id > max(e.event_id for e in a.events())
        nursery.cancel_scope.cancel()


async def test_groups_are_per_plugin_and_shop_scope(store: SqliteStore) -> None:
    """A shop's instance of a plugin is a group of its own: it gets its shop's
    events only (live, broadcast and replayed) and takes no shards of the
    every-shop group of the same name."""
    kinds = [WorkerEventKind.MESSAGE, WorkerEventKind.AGENT]
    dispatcher = WorkerDispatcher(store, shard_count=4)
    everyone, shop2 = Recorder("g", "worker:crm"), Recorder("x", "shop2-crm")
    joined = await dispatcher.join(everyone, "crm", kinds)
    joined2 = await dispatcher.join(shop2, "crm", kinds, shop="s2")
    assert joined.shards == joined2.shards == [0, 1, 2, 3]
    assert not any(isinstance(f, WorkerAssignment) for f in everyone.frames)
    for shard in range(4):
        dispatcher.publish(await _log(store, shard, "cust", shop="s1"))
        dispatcher.publish(await _log(store, shard, "cust", shop="s2"))
    assert len(everyone.events()) == 8
    assert [e.shop for e in shop2.events()] == ["s2"] * 4
    for shop in ("s1", "s2"):
        dispatcher.broadcast(
            WorkerEventKind.AGENT,
            WorkerEvent(
                event_id=0,
                shard=0,
                kind=WorkerEventKind.AGENT,
                ts=1,
                agent=f"a-{shop}",
                agent_status=AgentStatus.ONLINE,
                shop=shop,
            ),
        )
    assert [e.agent for e in everyone.events()[8:]] == ["a-s1", "a-s2"]
    assert [e.agent for e in shop2.events()[4:]] == ["a-s2"]

    # After a restart the shop's group replays its own shop's events only.
    key = group_key("crm", "s2")
    await store.write([PutCursor(plugin=key, event_id=0)])
    restarted = WorkerDispatcher(store, shard_count=4)
    again = Recorder("y", "shop2-crm")
    await restarted.join(again, "crm", [WorkerEventKind.MESSAGE], shop="s2")
    await restarted._replay(restarted.groups[key])
    assert [e.shop for e in again.events()] == ["s2"] * 4
