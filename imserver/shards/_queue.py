"""The sharded command queue between the gateway and the conversation actors.

Theory of operation
-------------------
A conversation id maps to one of ``SHARD_COUNT`` shards by CRC-32 (stable
across processes and restarts, so a cluster engine can lease shards to
processes). Each shard is a bounded FIFO and one task that moves commands
into the mailbox of the conversation's actor, spawning the actor on first
use. FIFO per shard keeps each sender's commands to a conversation in the
order they were submitted; the actor assigns seqs in that order.

Backpressure, not rejection: a full shard queue makes the *submitting
session* wait (``put``), so that session stops reading its socket while
everyone else carries on; rejecting instead would let a client's retry
overtake its later, accepted messages and break its send order. The shard
task in turn waits for room in a full actor mailbox, which delays only the
conversations of that shard, and only while one of them is flooded beyond
``ACTOR_MAILBOX_DEPTH``. Every buffer on the way is bounded. Actors live in
the shard's nursery; they passivate themselves when idle (see ``_actor``).

The embedded engine below is in-process. When the shard queue is empty and
the conversation's actor is live with room in its mailbox, ``submit`` hands
the command straight to the mailbox: the same order, one task switch less.
A cluster engine keeps the same ``submit`` and replaces the FIFO with a
durable per-shard stream.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Protocol

import trio

from protocol import Error, ErrorCode

from ..limits import (
    ACTOR_IDLE_S,
    ACTOR_MAILBOX_DEPTH,
    OVERLOAD_RETRY_MS,
    SHARD_COUNT,
    SHARD_QUEUE_DEPTH,
)
from ..metrics import METRICS
from ._actor import ConversationActor
from ._commands import AnyCommand

if TYPE_CHECKING:
    from ..dispatch import WorkerDispatcher
    from ..fanout import Hub
    from ..store import Store


def shard_of(conv: str, count: int = SHARD_COUNT) -> int:
    return zlib.crc32(conv.encode("utf-8")) % count


class ShardQueue(Protocol):
    def submit(self, cmd: AnyCommand) -> bool:
        """Queue a command for its conversation's actor if there is room now;
        False when the shard is full (the caller then ``put``s it)."""

    async def put(self, cmd: AnyCommand) -> None:
        """Queue a command, waiting for room."""


class LocalShards:
    """The embedded engine: in-memory bounded FIFOs, actors in this process."""

    def __init__(
        self,
        store: Store,
        hub: Hub,
        dispatcher: WorkerDispatcher,
        *,
        count: int = SHARD_COUNT,
        depth: int = SHARD_QUEUE_DEPTH,
        mailbox_depth: int = ACTOR_MAILBOX_DEPTH,
    ) -> None:
        self.store = store
        self.hub = hub
        self.dispatcher = dispatcher
        self.count = count
        self.mailbox_depth = mailbox_depth
        self._channels = [trio.open_memory_channel[AnyCommand](depth) for _ in range(count)]
        self._queued = [0] * count
        """Per shard: commands submitted to its FIFO and not yet in a mailbox (the
        shard task's hands included). Kept by hand: ``statistics()`` builds an
        object per call, on the hot path."""
        self.actors: dict[str, ConversationActor] = {}
        self._nursery: trio.Nursery | None = None
        self._pending = 0  # accepted commands not yet processed by their actor
        self._idle = trio.Event()
        self._idle.set()

    def submit(self, cmd: AnyCommand) -> bool:
        shard = shard_of(cmd.conv, self.count)
        actor = self.actors.get(cmd.conv)
        if actor is not None and not self._queued[shard]:
            # Fast path: nothing waits in the shard queue, so nothing can be overtaken
            # (the shard task moves a command on without a checkpoint, and a sender
            # blocked on a full mailbox fills any slot freed before we could take it).
            try:
                actor.send_channel.send_nowait(cmd)
            except trio.WouldBlock:
                pass
            else:
                self._accepted()
                return True
        send, _ = self._channels[shard]
        try:
            send.send_nowait(cmd)
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._overloaded(cmd, "server stopping")
            return True
        self._queued[shard] += 1
        self._accepted()
        return True

    async def put(self, cmd: AnyCommand) -> None:
        shard = shard_of(cmd.conv, self.count)
        send, _ = self._channels[shard]
        self._queued[shard] += 1  # while it waits too: nothing may overtake it
        try:
            await send.send(cmd)
        except BaseException as exc:
            self._queued[shard] -= 1
            if isinstance(exc, trio.ClosedResourceError | trio.BrokenResourceError):
                self._overloaded(cmd, "server stopping")
                return
            raise
        self._accepted()

    def _accepted(self) -> None:
        self._pending += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def _processed(self, count: int) -> None:
        """An actor finished ``count`` commands (answered, refused or failed)."""
        self._pending -= count
        if self._pending <= 0:
            self._pending = 0
            self._idle.set()

    def depth(self, shard: int) -> int:
        return self._channels[shard][0].statistics().current_buffer_used

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for index, (_, receive) in enumerate(self._channels):
                nursery.start_soon(self._run_shard, index, receive)
            nursery.start_soon(self._sweep_idle)
            task_status.started()

    async def drain(self) -> None:
        """Wait until every accepted command has been processed (SIGTERM drain)."""
        await self._idle.wait()

    async def _run_shard(self, index: int, receive: trio.MemoryReceiveChannel[AnyCommand]) -> None:
        queued = self._queued
        async for cmd in receive:
            actor = self.actors.get(cmd.conv)
            if actor is None:
                actor = self._spawn(cmd.conv)
            try:
                actor.send_channel.send_nowait(cmd)
            except trio.WouldBlock:
                await actor.send_channel.send(cmd)
            queued[index] -= 1

    async def _sweep_idle(self) -> None:
        while True:
            await trio.sleep(ACTOR_IDLE_S / 4)
            now = trio.current_time()
            for actor in list(self.actors.values()):
                actor.try_passivate(now)

    def _spawn(self, conv: str) -> ConversationActor:
        assert self._nursery is not None
        actor = ConversationActor(
            conv,
            store=self.store,
            hub=self.hub,
            on_passivate=self._passivate,
            on_processed=self._processed,
            mailbox_depth=self.mailbox_depth,
            dispatcher=self.dispatcher,
            shard=shard_of(conv, self.count),
        )
        self.actors[conv] = actor
        METRICS.actors.set(len(self.actors))
        self._nursery.start_soon(actor.run)
        return actor

    def _passivate(self, actor: ConversationActor, force: bool) -> bool:
        """Called by an idle (or failed, ``force``) actor; synchronous, so no
        command can slip in between the emptiness check and the removal."""
        if not force and actor.send_channel.statistics().current_buffer_used:
            return False
        if self.actors.get(actor.conv_id) is actor:
            del self.actors[actor.conv_id]
        METRICS.actors.set(len(self.actors))
        return True

    def _overloaded(self, cmd: AnyCommand, why: str) -> None:
        if cmd.reply is not None:
            METRICS.errors.labels(code=ErrorCode.UNAVAILABLE.value).inc()
            self.hub.reply(
                cmd.reply,
                Error(
                    code=ErrorCode.UNAVAILABLE,
                    message=why,
                    id=cmd.reply.request,
                    retry_after_ms=OVERLOAD_RETRY_MS,
                ),
            )
