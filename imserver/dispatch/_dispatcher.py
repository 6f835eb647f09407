"""Delivery of conversation events to worker plugins: sharded, acked, at least once.

Theory of operation
-------------------
Actors write a worker event (``PutEvent``) in the same transaction as the
change it describes, so the event log is exactly as durable as the chat;
the store numbers events in commit order. After the commit the actor hands
the event to this dispatcher, which delivers it to one live instance of
each plugin that asked for its kind: the instance that owns the event's
shard. Shards are split round-robin among a plugin's instances in join
order; when an instance joins or leaves, the split is recomputed, every
instance is told its new shards (``WorkerAssignment``), and events in flight
on moved shards are sent to their new owner.

An event stays in flight until acked. Unacked events are delivered again
after ``WORKER_ACK_TIMEOUT_S`` (``attempt`` counts up), so a hung plugin does
not lose work, and a crashed one loses none: its events move with its
shards. Each plugin's *watermark* -- every event at or below it is acked --
is saved to the store every ``WORKER_CURSOR_SAVE_S``; after a server restart
the first instance to join replays the log from there. Memory is bounded:
past ``WORKER_MAX_INFLIGHT`` events in flight for a plugin, live delivery
pauses and the plugin is caught up from the log instead.

Delivery is at least once, never exactly once: plugins act with idempotency
keys derived from ``event_id`` (the SDK does this), so a repeat is harmless.
Agent status events are best effort and go to every instance.

Tenants. A plugin group is a plugin name *and* a shop scope: the instances of
``crm`` whose tokens are for every shop (``*``) form one group, those of a
shop2-only ``crm`` another. A group is only ever given events of its scope
(``event.shop``), and instances of one group never take the shards of
another, so a shop's worker neither sees another shop's events nor starves
the real plugin of them. Which plugin a connection may join at all is the
gateway's to check (the token's ``plugin`` claim).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio

from protocol import (
    ServerFrameType,
    WorkerAssignment,
    WorkerEvent,
    WorkerEventKind,
    encode,
)

from ..gateway._frame import binary_frame
from ..limits import (
    SHARD_COUNT,
    WORKER_ACK_TIMEOUT_S,
    WORKER_CURSOR_SAVE_S,
    WORKER_MAX_INFLIGHT,
    WORKER_REPLAY_BATCH,
)
from ..logs import event
from ..store import PutCursor, StoredEvent

if TYPE_CHECKING:
    from ..store import Store

log = logging.getLogger("imserver.dispatch")


class WorkerPeer(Protocol):
    """What the dispatcher needs of a worker session."""

    @property
    def id(self) -> str: ...

    @property
    def user(self) -> str: ...

    def push_event(self, conv: str, seq: int, data: bytes) -> None: ...

    def send_frame(self, frame: ServerFrameType) -> None: ...


ALL_SHOPS = "*"


def group_key(plugin: str, shop: str) -> str:
    """The group (and its saved cursor) of ``plugin`` for the shop scope ``shop``.
    The every-shop group keeps the plain plugin name; ids cannot hold control
    characters, so the separator makes keys unambiguous."""
    return plugin if shop == ALL_SHOPS else f"{plugin}\x1f{shop}"


@dataclass(eq=False)
class Instance:
    peer: WorkerPeer
    plugin: str
    kinds: frozenset[WorkerEventKind]
    shop: str = ALL_SHOPS
    """The shop scope of the instance's token (``*``: every shop)."""
    group: str = ""
    """Its group's key (``group_key``)."""
    id: str = field(default_factory=lambda: secrets.token_hex(4))
    shards: list[int] = field(default_factory=list)


@dataclass
class _InFlight:
    stored: StoredEvent
    attempt: int = 0
    sent_at: float = 0.0
    to: Instance | None = None


@dataclass(eq=False)
class PluginGroup:
    name: str
    """The group key (``group_key``): the plugin and its shop scope."""
    shop: str = ALL_SHOPS
    instances: list[Instance] = field(default_factory=list)
    owner: dict[int, Instance] = field(default_factory=dict)
    inflight: dict[int, _InFlight] = field(default_factory=dict)
    watermark: int = 0
    saved_watermark: int = -1
    highest_seen: int = 0
    needs_replay: bool = False
    """Events past the in-memory bound: read the log from ``replay_cursor``."""
    replay_cursor: int = 0
    """The highest event id read from the log (or seen live) so far."""

    users: set[str] = field(default_factory=set)
    """The user ids the plugin's instances connect as."""

    def in_scope(self, stored: StoredEvent) -> bool:
        """An event of a shop this group may see."""
        return self.shop == ALL_SHOPS or stored.event.shop == self.shop

    def is_own(self, stored: StoredEvent) -> bool:
        """A message the plugin sent itself: it is not told about it (that would
        double its event traffic for nothing)."""
        message = stored.event.message
        return message is not None and message.sender in self.users

    @property
    def kinds(self) -> frozenset[WorkerEventKind]:
        return (
            frozenset().union(*(i.kinds for i in self.instances)) if self.instances else frozenset()
        )


class WorkerDispatcher:
    def __init__(self, store: Store, *, shard_count: int = SHARD_COUNT) -> None:
        self.store = store
        self.shard_count = shard_count
        self.groups: dict[str, PluginGroup] = {}
        self._by_peer: dict[str, Instance] = {}
        self._wakeup = trio.Event()
        self._membership = trio.Event()
        self._known_plugins = False
        self._kinds_ever: set[WorkerEventKind] = set()

    async def membership_changed(self) -> None:
        """Wait for the next join or leave of any instance (tests, admin tools)."""
        await self._membership.wait()

    def _announce_membership(self) -> None:
        self._membership.set()
        self._membership = trio.Event()

    # ------------------------------------------------------------ membership

    async def join(
        self,
        peer: WorkerPeer,
        plugin: str,
        kinds: Iterable[WorkerEventKind],
        *,
        shop: str = ALL_SHOPS,
    ) -> Instance:
        """Add an instance to the group of ``plugin`` for the shop scope ``shop``;
        on the group's first join, load its watermark and replay what the log
        holds beyond it."""
        key = group_key(plugin, shop)
        group = self.groups.get(key)
        if group is None:
            group = PluginGroup(name=key, shop=shop)
            self.groups[key] = group
            saved = await self.store.worker_cursor(key)
            if saved is None:  # a new plugin starts from now, not from the dawn of time
                group.watermark = await self.store.last_event_id()
            else:
                group.watermark = saved
                group.needs_replay = True
            group.saved_watermark = group.watermark
            group.highest_seen = group.replay_cursor = group.watermark
        instance = Instance(peer=peer, plugin=plugin, kinds=frozenset(kinds), shop=shop, group=key)
        self._kinds_ever |= instance.kinds
        if group.saved_watermark == group.watermark and not self._known_plugins:
            # Remember the plugin durably at once: from now on events are logged for it.
            await self.store.write([PutCursor(plugin=key, event_id=group.watermark)])
            self._known_plugins = True
        group.instances.append(instance)
        group.users.add(peer.user)
        self._by_peer[peer.id] = instance
        self._rebalance(group, announce_to=instance)
        self._wakeup.set()
        self._announce_membership()
        event(
            log,
            "worker_joined",
            plugin=key,
            instance=instance.id,
            shards=len(instance.shards),
            instances=len(group.instances),
        )
        return instance

    def leave(self, peer: WorkerPeer) -> None:
        instance = self._by_peer.pop(peer.id, None)
        if instance is None:
            return
        group = self.groups[instance.group]
        group.instances.remove(instance)
        self._rebalance(group, announce_to=None)
        self._announce_membership()
        event(
            log,
            "worker_left",
            plugin=instance.group,
            instance=instance.id,
            instances=len(group.instances),
        )

    def _rebalance(self, group: PluginGroup, announce_to: Instance | None) -> None:
        before = {i.id: list(i.shards) for i in group.instances}
        for instance in group.instances:
            instance.shards = []
        group.owner = {}
        if group.instances:
            for shard in range(self.shard_count):
                instance = group.instances[shard % len(group.instances)]
                instance.shards.append(shard)
                group.owner[shard] = instance
        for instance in group.instances:
            if instance is announce_to or before.get(instance.id) == instance.shards:
                continue
            instance.peer.send_frame(
                WorkerAssignment(shards=instance.shards, shard_count=self.shard_count)
            )
        # Events in flight on a shard that changed hands go to the new owner now.
        for flight in group.inflight.values():
            owner = group.owner.get(flight.stored.shard)
            if owner is not None and flight.to is not owner:
                self._deliver(group, flight, owner)

    # -------------------------------------------------------------- delivery

    def publish(self, stored: StoredEvent) -> None:
        """A committed event: deliver it to each interested plugin's shard owner."""
        for group in self.groups.values():
            if stored.kind not in group.kinds or not group.in_scope(stored):
                continue
            group.highest_seen = max(group.highest_seen, stored.id)
            if stored.id <= group.watermark or stored.id in group.inflight:
                continue
            if group.needs_replay or len(group.inflight) >= WORKER_MAX_INFLIGHT:
                if not group.needs_replay:
                    group.needs_replay = True  # the log has it; the replay task brings it
                    group.replay_cursor = stored.id - 1
                self._wakeup.set()
                continue
            group.replay_cursor = stored.id
            if group.is_own(stored):
                continue
            flight = _InFlight(stored=stored)
            group.inflight[stored.id] = flight
            owner = group.owner.get(stored.shard)
            if owner is not None:
                self._deliver(group, flight, owner)

    def broadcast(self, kind: WorkerEventKind, frame: WorkerEvent) -> None:
        """Best-effort events (agent status) to every instance that wants them
        and may see ``frame.shop``."""
        data = binary_frame(encode(frame))
        for group in self.groups.values():
            if group.shop != ALL_SHOPS and group.shop != frame.shop:
                continue
            for instance in group.instances:
                if kind in instance.kinds:
                    instance.peer.push_event("", 0, data)

    def _deliver(self, group: PluginGroup, flight: _InFlight, to: Instance) -> None:
        if flight.stored.kind not in to.kinds:
            # This instance did not ask for the kind: count it as handled.
            group.inflight.pop(flight.stored.id, None)
            self._advance(group)
            return
        flight.attempt += 1
        flight.sent_at = time.monotonic()
        flight.to = to
        frame = flight.stored.frame(attempt=flight.attempt)
        to.peer.push_event("", 0, binary_frame(encode(frame)))

    def ack(self, peer: WorkerPeer, ids: Iterable[int]) -> None:
        instance = self._by_peer.get(peer.id)
        if instance is None:
            return
        group = self.groups[instance.group]
        for event_id in ids:
            group.inflight.pop(event_id, None)
        self._advance(group)

    @staticmethod
    def _advance(group: PluginGroup) -> None:
        # Everything below the oldest event in flight is acked -- up to what has been
        # read: past ``replay_cursor`` the log may hold events not yet delivered.
        limit = group.replay_cursor if group.needs_replay else group.highest_seen
        candidate = min(group.inflight) - 1 if group.inflight else limit
        group.watermark = max(group.watermark, min(candidate, limit))

    # ------------------------------------------------ redelivery and replay

    def wants(self, kind: WorkerEventKind) -> bool:
        """Whether events of ``kind`` must be logged: some plugin joined once (it will
        come back for them) -- otherwise nobody will ever read them, and a plugin
        joining for the first time starts from "now" anyway."""
        return self._known_plugins or kind in self._kinds_ever

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._known_plugins = bool(await self.store.worker_plugins())
        task_status.started()
        while True:
            with trio.move_on_after(min(WORKER_ACK_TIMEOUT_S, WORKER_CURSOR_SAVE_S) / 2):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            now = time.monotonic()
            for group in list(self.groups.values()):
                if group.needs_replay and group.instances:
                    await self._replay(group)
                for flight in list(group.inflight.values()):
                    owner = group.owner.get(flight.stored.shard)
                    if owner is not None and (
                        flight.to is None or now - flight.sent_at >= WORKER_ACK_TIMEOUT_S
                    ):
                        self._deliver(group, flight, owner)
                if group.watermark != group.saved_watermark:
                    mark = group.watermark
                    await self.store.write([PutCursor(plugin=group.name, event_id=mark)])
                    group.saved_watermark = mark

    async def _replay(self, group: PluginGroup) -> None:
        """Bring events from the log (past the watermark) into flight, within bounds."""
        after = max(group.watermark, group.replay_cursor)
        while len(group.inflight) < WORKER_MAX_INFLIGHT:
            batch = await self.store.events_after(after, WORKER_REPLAY_BATCH)
            for stored in batch:
                after = group.replay_cursor = stored.id
                group.highest_seen = max(group.highest_seen, stored.id)
                if (
                    stored.kind in group.kinds
                    and stored.id not in group.inflight
                    and group.in_scope(stored)
                    and not group.is_own(stored)
                ):
                    group.inflight[stored.id] = _InFlight(stored=stored)
            if len(batch) < WORKER_REPLAY_BATCH:
                group.needs_replay = False
                break
        for flight in group.inflight.values():
            if flight.to is None and (owner := group.owner.get(flight.stored.shard)) is not None:
                self._deliver(group, flight, owner)
        self._advance(group)
