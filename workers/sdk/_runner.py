"""Runs one plugin instance: connect, join, handle events, ack, reconnect.

Theory of operation
-------------------
The runner connects with role ``worker``, joins the plugin's instance group
(``WorkerJoin``) and receives the events of the shards it owns. Events of
one conversation are handled one at a time, in order; different
conversations run concurrently (at most ``MAX_CONCURRENT_HANDLERS``). An
event is acked once its handler returns. A handler that raises or runs past
``HANDLER_TIMEOUT_S`` is not acked, so the server delivers the event again
later; after ``MAX_ATTEMPTS`` the event is acked anyway and logged as
poison, so one bad event cannot wedge a conversation for ever. Handler
actions carry idempotency keys derived from the event id (``WorkerContext``),
which makes the redelivery harmless. If the connection drops, the runner
reconnects and joins again; the server has meanwhile moved its shards (and
their unacked events) to the surviving instances. Every reconnect waits an
exponential backoff with jitter (``reconnect_delay``), reset only by a
successful join: a server that refuses the join (a token without this
plugin's claim, another shop's plugin) is retried at most every
``RECONNECT_BACKOFF_MAX_S``, and a refusal that no retry can cure
(``PERMANENT_REFUSALS``) is logged once as one JSON line, not on every retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from protocol import (
    ServerFrameType,
    WorkerAck,
    WorkerAssignment,
    WorkerEvent,
    WorkerEventKind,
    WorkerJoin,
    WorkerJoined,
)

from ._client import AsyncClient, Disconnected, RequestFailed
from ._plugin import Plugin, WorkerContext

log = logging.getLogger("imserver.worker")

HANDLER_TIMEOUT_S: Final = 10.0
"""A handler running longer is cancelled; its event is not acked (redelivered later)."""

MAX_ATTEMPTS: Final = 5
"""Deliveries of one event before it is acked anyway and logged as poison."""

MAX_CONCURRENT_HANDLERS: Final = 64
"""Handlers running at once (across conversations)."""

MAX_QUEUED_EVENTS: Final = 10_000
"""Events waiting in this process; beyond it the reader stops reading (backpressure)."""

RECONNECT_BACKOFF_BASE_S: Final = 0.1
"""The first reconnect's delay; it doubles with every failed attempt ..."""
RECONNECT_BACKOFF_MAX_S: Final = 5.0
"""... up to this."""
RECONNECT_JITTER: Final = 0.5
"""A delay is drawn from [1 - this, 1] times the nominal one, so that the
instances a restart disconnected together do not come back together."""
PERMANENT_REFUSALS: Final = frozenset({"forbidden", "unauthorized"})
"""Error codes of a refused join that retrying cannot cure (the token is wrong)."""


def reconnect_delay(attempt: int, rng: random.Random | None = None) -> float:
    """The wait before reconnect ``attempt`` (0 = right after a good session ended)."""
    nominal = min(RECONNECT_BACKOFF_MAX_S, RECONNECT_BACKOFF_BASE_S * 2.0 ** min(attempt, 32))
    draw = rng.random() if rng is not None else random.random()
    return nominal * (1 - RECONNECT_JITTER * draw)


class WorkerRunner:
    def __init__(
        self,
        plugin: Plugin,
        *,
        url: str,
        token: Callable[[], str],
        data_dir: Path,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.plugin = plugin
        self.url = url
        self.token = token
        self.data_dir = data_dir
        self.config = config or {}
        self.shards: list[int] = []
        self.handled = 0
        self.connected = asyncio.Event()
        self._queues: dict[str, list[WorkerEvent]] = {}
        self._active: set[str] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_HANDLERS)
        self._queued = 0
        self._room = asyncio.Event()
        self._room.set()
        self._client: AsyncClient | None = None
        self._ctx: WorkerContext | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusal = ""
        """The permanent refusal logged since the last good join (logged once)."""

    async def run(self) -> None:
        """Run until cancelled, reconnecting as needed."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        attempt = -1  # failed attempts since the last join (none yet: no wait)
        setup_done = False
        try:
            while True:
                if attempt >= 0:
                    await asyncio.sleep(reconnect_delay(attempt))
                attempt += 1
                try:
                    client = await AsyncClient.connect(
                        self.url,
                        self.token(),
                        device=f"{self.plugin.name}-{os.getpid()}",
                        on_event=self._on_event,
                    )
                except RequestFailed as exc:
                    self._refused(exc)
                    continue
                except (TimeoutError, OSError, Disconnected) as exc:
                    log.warning("connect failed (%s); retrying with backoff", exc)
                    continue
                self._client = client
                self._ctx = WorkerContext(
                    client=client,
                    plugin=self.plugin.name,
                    data_dir=self.data_dir,
                    config=self.config,
                )
                try:
                    if not setup_done:
                        await self.plugin.setup(self._ctx)
                        setup_done = True
                    joined: WorkerJoined = await client.request(
                        WorkerJoin(id=0, plugin=self.plugin.name, kinds=sorted(self.plugin.kinds))
                    )
                    attempt, self._refusal = 0, ""
                    self.shards = joined.shards
                    self._ctx.shard_count = joined.shard_count
                    # One plain line on stdout, like the server's "listening on": supervisors
                    # and tests know the instance is serving.
                    print(
                        f"imserver worker {self.plugin.name} joined as {joined.instance} "
                        f"({len(joined.shards)} shards)",
                        flush=True,
                    )
                    await self.plugin.on_shards(self._ctx, self.shards)
                    self.connected.set()
                    ticker = (
                        asyncio.create_task(self._ticker()) if self.plugin.tick_seconds else None
                    )
                    await client.closed
                    if ticker is not None:
                        ticker.cancel()
                except RequestFailed as exc:
                    self._refused(exc)
                except (TimeoutError, Disconnected) as exc:
                    log.warning("session ended: %s", exc)
                finally:
                    self.connected.clear()
                    await client.close()
                    if setup_done and self.shards and self._ctx is not None:
                        # Whatever the instance owned went to the survivors meanwhile.
                        self.shards = []
                        with contextlib.suppress(Exception):
                            await self.plugin.on_shards(self._ctx, [])
                # Events of the old session will come again to whoever owns their shard.
                self._queues.clear()
                self._queued = 0
                self._room.set()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await self.plugin.teardown()

    def _refused(self, exc: RequestFailed) -> None:
        """A refused Hello or join: a permanent refusal is one JSON line (the
        ``imserver.worker`` logger's format), once until the next good join."""
        if exc.code not in PERMANENT_REFUSALS:
            log.warning("refused (%s); retrying with backoff", exc)
        elif str(exc) != self._refusal:
            self._refusal = str(exc)
            log.error(
                "worker_join_refused",
                extra={
                    "fields": {
                        "plugin": self.plugin.name,
                        "code": exc.code,
                        "reason": exc.error.message,
                        "retry_max_s": RECONNECT_BACKOFF_MAX_S,
                    }
                },
            )

    # -- events

    async def _on_event(self, frame: ServerFrameType) -> None:
        if isinstance(frame, WorkerEvent):
            if frame.kind is WorkerEventKind.AGENT:
                self._spawn(self._handle_agent(frame))
                return
            conv = frame.conversation.id if frame.conversation else ""
            self._queues.setdefault(conv, []).append(frame)
            self._queued += 1
            if conv not in self._active:
                self._active.add(conv)
                self._spawn(self._drain(conv))
            if self._queued >= MAX_QUEUED_EVENTS:
                self._room.clear()
                await self._room.wait()  # the reader pauses: backpressure to the server
        elif isinstance(frame, WorkerAssignment):
            self.shards = frame.shards
            if self._ctx is not None:
                self._ctx.shard_count = frame.shard_count
                self._spawn(self.plugin.on_shards(self._ctx, frame.shards))
        elif self._ctx is not None:
            try:
                self.plugin.on_push(self._ctx, frame)
            except Exception as exc:
                log.warning("push handler failed: %r", exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, conv: str) -> None:
        try:
            while queue := self._queues.get(conv):
                event = queue.pop(0)
                self._queued -= 1
                if self._queued < MAX_QUEUED_EVENTS // 2:
                    self._room.set()
                await self._handle(event)
        finally:
            self._queues.pop(conv, None)
            self._active.discard(conv)

    async def _handle(self, event: WorkerEvent) -> None:
        client, base = self._client, self._ctx
        if client is None or base is None:
            return
        ctx = dataclasses.replace(base, event_key=str(event.event_id))
        handler = (
            self.plugin.on_message
            if event.kind is WorkerEventKind.MESSAGE
            else self.plugin.on_conversation
        )
        async with self._slots:
            try:
                await asyncio.wait_for(handler(ctx, event), HANDLER_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if event.attempt < MAX_ATTEMPTS:
                    log.warning(
                        "handler failed on event %s (attempt %s): %r",
                        event.event_id,
                        event.attempt,
                        exc,
                    )
                    return  # not acked: delivered again later
                log.error(
                    "dropping poison event %s after %s attempts: %r",
                    event.event_id,
                    event.attempt,
                    exc,
                )
        self.handled += 1
        with contextlib.suppress(Disconnected):
            await client.notify(WorkerAck(ids=[event.event_id]))

    async def _handle_agent(self, event: WorkerEvent) -> None:
        if self._ctx is None:
            return
        try:
            await asyncio.wait_for(self.plugin.on_agent(self._ctx, event), HANDLER_TIMEOUT_S)
        except Exception as exc:
            log.warning("agent handler failed: %r", exc)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.plugin.tick_seconds)
            if self._ctx is None:
                continue
            try:
                await asyncio.wait_for(
                    self.plugin.on_tick(self._ctx, time.time()), HANDLER_TIMEOUT_S
                )
            except Exception as exc:
                log.warning("tick failed: %r", exc)
