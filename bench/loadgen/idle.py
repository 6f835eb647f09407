"""Scenario 4, idle capacity: K connected, idle clients that only heartbeat; server RSS per connection.

Theory of operation
-------------------
The coordinator reads the server's resident memory (VmRSS summed over its
process tree) on a fresh server, then the workers connect their share of
``connections`` customers (``SETUP_CONCURRENCY`` handshakes at a time per
worker, each timed: TCP + upgrade + Hello -> Welcome). Once all are in, and
after ``settle_s``, RSS is read again: (after - before) / connected is the
memory a connection costs, session state included.

Then the clients hold for ``hold_s`` doing what an idle app does: a ``Ping``
every heartbeat interval (the ``heartbeat_ms`` the server announced in
``Welcome``, unless ``heartbeat_s`` overrides it), with a random phase per
client so that pings are spread evenly; Ping -> Pong round trips are
timed, and RSS is read a third time at the end (growth while idle).
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Final

import msgspec

from protocol import Error, Message, Ping, Pong, Role, ServerFrameType, encode

from .client import Identity, ImClient
from .common import close_all, gather_bounded, pace, process_cpu_s
from .histogram import EncodedHistogram, LatencyHistogram, LatencySummary
from .pool import WorkerPool, start_at
from .sysstat import ServerProbe

DEFAULT_CONNECTIONS: Final = 5000
DEFAULT_HOLD_S: Final = 5.0
DEFAULT_SETTLE_S: Final = 1.0
CONNECT_TIMEOUT_S: Final = 300.0
HOLD_TIMEOUT_MARGIN_S: Final = 30.0
IDLE_PREFIX: Final = "i"
PONG_GRACE_S: Final = 1.0
"""After the hold, how long pings still in flight may take to be answered."""


class IdleParams(msgspec.Struct, frozen=True, kw_only=True):
    connections: int = DEFAULT_CONNECTIONS
    hold_s: float = DEFAULT_HOLD_S
    settle_s: float = DEFAULT_SETTLE_S
    heartbeat_s: float | None = None
    """None: the interval the server announces in Welcome."""


class Connect(msgspec.Struct, frozen=True):
    pass


class Connected(msgspec.Struct, frozen=True):
    connected: int
    errors: list[str]
    failures: int
    connect: EncodedHistogram
    heartbeat_s: float


class Hold(msgspec.Struct, frozen=True):
    start_ns: int
    hold_s: float


class Held(msgspec.Struct, frozen=True):
    pings: int
    pongs: int
    still_open: int
    errors: dict[str, int]
    rtt: EncodedHistogram
    cpu_s: float


class IdleWorker:
    def __init__(
        self, params: IdleParams, url: str, secret: bytes, tag: str, index: int, count: int
    ) -> None:
        self.params, self.url, self.secret, self.tag = params, url, secret, tag
        self.index, self.count = index, count
        self.clients: list[ImClient] = []
        self.connect_hist = LatencyHistogram()
        self.rtt = LatencyHistogram()
        self.inflight: dict[tuple[ImClient, int], int] = {}
        self.pongs = 0
        self.errors: Counter[str] = Counter()
        self.heartbeat_s = params.heartbeat_s or 20.0

    async def handle(self, command: object) -> object:
        if isinstance(command, Connect):
            return await self._connect_all()
        if isinstance(command, Hold):
            return await self._hold(command)
        raise TypeError(f"unexpected command {command!r}")

    async def close(self) -> None:
        await close_all(self.clients)

    def on_message(self, client: ImClient, message: Message, now_ns: int) -> None:
        pass

    def on_reply(self, client: ImClient, frame: ServerFrameType, now_ns: int) -> None:
        sent = self.inflight.pop((client, getattr(frame, "id", -1)), None)
        if sent is None:
            return
        if type(frame) is Pong:
            self.pongs += 1
            self.rtt.record_ns(now_ns - sent)
        elif isinstance(frame, Error):
            self.errors[frame.code] += 1

    async def _connect_one(self, number: int) -> ImClient:
        user = f"{self.tag}-{IDLE_PREFIX}{number}"
        client = ImClient(
            self.url, Identity(user, Role.CUSTOMER, "", f"{user}-d"), self.secret, self
        )
        t0 = time.monotonic_ns()
        welcome = await client.connect()
        self.connect_hist.record_ns(time.monotonic_ns() - t0)
        if self.params.heartbeat_s is None and welcome.heartbeat_ms:
            self.heartbeat_s = welcome.heartbeat_ms / 1000
        return client

    async def _connect_all(self) -> Connected:
        clients, errors = await gather_bounded(
            functools.partial(self._connect_one, i)
            for i in range(self.index, self.params.connections, self.count)
        )
        self.clients = clients
        return Connected(
            connected=len(clients),
            errors=errors[:5],
            failures=len(errors),
            connect=self.connect_hist.encode(),
            heartbeat_s=self.heartbeat_s,
        )

    async def _hold(self, cmd: Hold) -> Held:
        cpu0 = process_cpu_s()
        end = cmd.start_ns + int(cmd.hold_s * 1e9)
        pings = 0

        def ping(i: int, due: int, now: int) -> None:
            nonlocal pings
            client = self.clients[i]
            request_id = client.next_id()
            if client.write(encode(Ping(id=request_id))):
                self.inflight[client, request_id] = due
                pings += 1

        await pace(
            len(self.clients),
            int(self.heartbeat_s * 1e9),
            cmd.start_ns,
            end,
            random.Random(self.index),
            ping,
        )
        delay = (end - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        grace_end = time.monotonic() + PONG_GRACE_S
        while time.monotonic() < grace_end:  # pings sent just before the end
            if not self.inflight:
                break
            await asyncio.sleep(0.01)
        return Held(
            pings=pings,
            pongs=self.pongs,
            still_open=sum(1 for c in self.clients if c.is_open),
            errors=dict(self.errors),
            rtt=self.rtt.encode(),
            cpu_s=process_cpu_s() - cpu0,
        )


class IdleReport(msgspec.Struct, frozen=True, kw_only=True, tag="idle"):
    params: IdleParams
    workers: int
    connected: int
    connect_failures: int
    connect_errors: list[str]
    connect_s: float
    connect: LatencySummary
    heartbeat_s: float
    rss_before_mb: float
    rss_connected_mb: float
    rss_after_hold_mb: float
    rss_per_connection_kb: float
    pings: int
    pongs: int
    still_open: int
    errors: dict[str, int]
    ping_rtt: LatencySummary
    server_cpu_pct_while_idle: float


def run(
    params: IdleParams,
    url: str,
    secret: bytes,
    tag: str,
    probe: ServerProbe,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> IdleReport:
    def factory(index: int, count: int) -> IdleWorker:
        return IdleWorker(params, url, secret, tag, index, count)

    mb = 1024 * 1024
    with WorkerPool(factory, workers) as pool:
        time.sleep(params.settle_s / 2)
        rss0 = probe.rss_bytes()
        t0 = time.monotonic()
        done = [r for r in pool.call(Connect(), CONNECT_TIMEOUT_S) if isinstance(r, Connected)]
        connect_s = time.monotonic() - t0
        time.sleep(params.settle_s)
        rss1 = probe.rss_bytes()
        connected = sum(d.connected for d in done)
        errors_text = [e for d in done for e in d.errors]
        log(
            f"  idle: {connected}/{params.connections} connected in {connect_s:.1f} s"
            + (f" ({errors_text[0]})" if errors_text else "")
            + f", server RSS {rss0 / mb:.1f} -> {rss1 / mb:.1f} MiB"
        )
        cpu0 = probe.cpu_s()
        held = [
            r
            for r in pool.call(
                Hold(start_at(), params.hold_s), params.hold_s + HOLD_TIMEOUT_MARGIN_S
            )
            if isinstance(r, Held)
        ]
        cpu = probe.cpu_s() - cpu0
        rss2 = probe.rss_bytes()
    errors: Counter[str] = Counter()
    for h in held:
        errors.update(h.errors)
    report = IdleReport(
        params=params,
        workers=workers,
        connected=connected,
        connect_failures=sum(d.failures for d in done),
        connect_errors=errors_text,
        connect_s=round(connect_s, 2),
        connect=LatencyHistogram.merged([d.connect for d in done]).summary(),
        heartbeat_s=done[0].heartbeat_s if done else 0.0,
        rss_before_mb=round(rss0 / mb, 2),
        rss_connected_mb=round(rss1 / mb, 2),
        rss_after_hold_mb=round(rss2 / mb, 2),
        rss_per_connection_kb=round((rss1 - rss0) / 1024 / connected, 2) if connected else 0.0,
        pings=sum(h.pings for h in held),
        pongs=sum(h.pongs for h in held),
        still_open=sum(h.still_open for h in held),
        errors=dict(errors),
        ping_rtt=LatencyHistogram.merged([h.rtt for h in held]).summary(),
        server_cpu_pct_while_idle=round(100 * cpu / params.hold_s, 1),
    )
    log(
        f"  idle: {report.rss_per_connection_kb:.1f} KiB RSS per connection; "
        f"{report.pongs}/{report.pings} pings answered (p99 {report.ping_rtt.p99_ms:.1f} ms), "
        f"{report.still_open} still open, server {report.server_cpu_pct_while_idle:.1f}% cpu idle"
    )
    return report
