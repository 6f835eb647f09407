"""Scenario 3, reconnect storm: C clients in 1:1 conversations all drop at once and resume.

Theory of operation
-------------------
Setup: C/2 customer/agent pairs (``common.open_pair``); each pair's resume
point starts at the conversation's ``last_seq`` after the assignment
(``GetConversation``), so pre-run system messages are not replayed. Run, at instants
fixed by the coordinator: both sides of every pair send ``rate`` messages/s
(stamped payloads, a ``cmid`` each); at ``drop`` every connection is aborted
(TCP dropped, no close handshake, like a network failure at a load balancer);
every client reconnects at once, no jitter, with ``Hello.resume = {conv:
last contiguous seq seen}``, waits for ``Synced``, then re-sends every
message it has no ``Sent`` for *with the same cmid* (so the server can
deduplicate) and resumes its schedule; sends falling due while it is
disconnected wait in its outbox. At ``stop`` sending ends and the run waits
up to ``drain_s`` for acks and deliveries.

Accounting, per conversation, from the two ends (both in one worker):

* ``lost``: acked by the server (``Sent``), never delivered to the peer;
* ``duplicates``: a cmid delivered to the peer under two different seqs (the
  server stored a retry twice: an idempotency failure);
* ``redelivered``: a seq delivered to the same client again (harmless for a
  client that deduplicates by seq; replay overlap, reported for information);
* ``unacked``: sent but never acked by the end (not durable: not lost);
* time to all resumed: from the drop to the last client's ``Synced``, plus
  the per-client distribution and the reconnect failures.

The resume point is the highest seq *below which nothing is missing* (own
acked seqs + received seqs, system messages included), so a message still in
flight at the drop is replayed rather than skipped.
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

from protocol import (
    ConversationInfo,
    Error,
    GetConversation,
    Message,
    Send,
    Sent,
    ServerFrameType,
    TextBody,
    encode,
)

from .client import ConnectFailed, ImClient
from .common import (
    MAX_PERSON_RATE,
    Pair,
    close_all,
    gather_bounded,
    open_pair,
    pace,
    process_cpu_s,
)
from .histogram import EncodedHistogram, LatencyHistogram, LatencySummary
from .payload import PAYLOAD_CHARS, make_text, parse_text
from .pool import WorkerPool, sleep_until, start_at
from .sysstat import HostCpu, ServerProbe, foreign_cpu_pct

DEFAULT_CLIENTS: Final = 1000
DEFAULT_RATE: Final = 1.0
"""Messages/s per client (so C msg/s in all)."""
DEFAULT_BEFORE_S: Final = 3.0
DEFAULT_AFTER_S: Final = 3.0
DEFAULT_DRAIN_S: Final = 3.0
RECONNECT_ATTEMPTS: Final = 5
RECONNECT_BACKOFF_S: Final = 0.2
"""Wait before attempt n+1 is n * this (the first attempt is immediate: a storm)."""
SYNC_TIMEOUT_S: Final = 15.0
"""Welcome -> Synced."""
SETUP_TIMEOUT_S: Final = 180.0
RUN_TIMEOUT_MARGIN_S: Final = 60.0
DRAIN_POLL_S: Final = 0.02


class StormParams(msgspec.Struct, frozen=True, kw_only=True):
    clients: int = DEFAULT_CLIENTS
    rate: float = DEFAULT_RATE
    before_s: float = DEFAULT_BEFORE_S
    after_s: float = DEFAULT_AFTER_S
    drain_s: float = DEFAULT_DRAIN_S
    payload_chars: int = PAYLOAD_CHARS

    def validate(self) -> None:
        if self.clients < 2 or self.clients % 2:
            raise ValueError("clients must be an even number (pairs)")
        if self.rate > MAX_PERSON_RATE:
            raise ValueError(f"rate {self.rate}/s is over {MAX_PERSON_RATE}/s for people")


class Setup(msgspec.Struct, frozen=True):
    pass


class SetupDone(msgspec.Struct, frozen=True):
    clients: int
    errors: list[str]


class Go(msgspec.Struct, frozen=True):
    start_ns: int
    drop_ns: int
    stop_ns: int
    drain_s: float


class GoResult(msgspec.Struct, frozen=True):
    clients: int
    sent: int
    acked: int
    unacked: int
    delivered: int
    replayed: int
    lost: int
    duplicates: int
    redelivered: int
    errors: dict[str, int]
    reconnect_failures: int
    never_resumed: int
    last_resumed_ns: int
    resume: EncodedHistogram
    delivery: EncodedHistogram
    cpu_s: float
    wall_s: float


class SeqTracker:
    """The highest seq below which every seq has been seen."""

    __slots__ = ("_above", "base")

    def __init__(self) -> None:
        self.base = 0
        self._above: set[int] = set()

    def skip_to(self, seq: int) -> None:
        """Everything up to ``seq`` counts as seen (history from before the run)."""
        if seq > self.base:
            self.base = seq
            self._above = {s for s in self._above if s > seq}
            self._advance()

    def add(self, seq: int) -> None:
        if seq > self.base:
            self._above.add(seq)
            self._advance()

    def _advance(self) -> None:
        while self.base + 1 in self._above:
            self.base += 1
            self._above.discard(self.base)


class _Side:
    __slots__ = (
        "acked",
        "client",
        "conv",
        "inflight",
        "outbox",
        "prefix",
        "ready",
        "received_cmids",
        "received_seqs",
        "sent",
        "synced_ns",
        "tracker",
    )

    def __init__(self, client: ImClient, conv: str) -> None:
        self.client = client
        self.conv = conv
        self.prefix = f"{client.user}-"
        self.sent = 0
        self.ready = True
        self.synced_ns = 0
        self.outbox: dict[str, int] = {}  # unacked cmid -> intended ns (insertion = send order)
        self.inflight: dict[int, str] = {}  # request id -> cmid, this connection only
        self.acked: dict[str, int] = {}  # cmid -> seq
        self.received_cmids: dict[str, int] = {}  # peer's cmid -> seq
        self.received_seqs: set[int] = set()
        self.tracker = SeqTracker()

    def transmit(self, cmid: str, due: int, chars: int) -> None:
        client = self.client
        request_id = client.next_id()
        data = encode(
            Send(
                id=request_id,
                conv=self.conv,
                cmid=cmid,
                body=TextBody(text=make_text(0, due, chars)),
            )
        )
        if client.write(data):
            self.inflight[request_id] = cmid


class StormWorker:
    def __init__(
        self, params: StormParams, url: str, secret: bytes, tag: str, index: int, count: int
    ) -> None:
        self.params, self.url, self.secret, self.tag = params, url, secret, tag
        self.index, self.count = index, count
        self.pairs: list[Pair] = []
        self.sides: list[_Side] = []
        self.side_of: dict[ImClient, _Side] = {}
        self.delivery = LatencyHistogram()
        self.resume = LatencyHistogram()
        self.errors: Counter[str] = Counter()
        self.duplicates = self.redelivered = self.delivered = self.replayed = 0
        self.reconnect_failures = 0

    async def handle(self, command: object) -> object:
        if isinstance(command, Setup):
            return await self._setup()
        if isinstance(command, Go):
            return await self._go(command)
        raise TypeError(f"unexpected command {command!r}")

    async def close(self) -> None:
        await close_all(s.client for s in self.sides)

    def on_message(self, client: ImClient, message: Message, now_ns: int) -> None:
        side = self.side_of.get(client)
        if side is None or message.conv != side.conv:
            return
        side.tracker.add(message.seq)
        body = message.body
        if message.sender == client.identity.user or type(body) is not TextBody:
            return
        stamp = parse_text(body.text)
        if stamp is None:
            return
        if message.seq in side.received_seqs:
            self.redelivered += 1
            return
        side.received_seqs.add(message.seq)
        earlier = side.received_cmids.get(message.cmid)
        if earlier is not None:
            if earlier != message.seq:
                self.duplicates += 1
            return
        side.received_cmids[message.cmid] = message.seq
        self.delivered += 1
        if client.connects > 1 and not client.synced.is_set():
            self.replayed += 1
        self.delivery.record_ns(now_ns - stamp.sent_ns)

    def on_reply(self, client: ImClient, frame: ServerFrameType, now_ns: int) -> None:
        side = self.side_of.get(client)
        if side is None:
            return
        cmid = side.inflight.pop(getattr(frame, "id", -1), None)
        if cmid is None:
            return
        if type(frame) is Sent:
            side.acked[cmid] = frame.seq
            side.outbox.pop(cmid, None)
            side.tracker.add(frame.seq)
        elif isinstance(frame, Error):
            self.errors[frame.code] += 1

    async def _setup(self) -> SetupDone:
        pairs_total = self.params.clients // 2
        pairs, errors = await gather_bounded(
            functools.partial(open_pair, self.url, self.secret, self.tag, i, self)
            for i in range(self.index, pairs_total, self.count)
        )
        self.pairs = sorted(pairs)
        for pair in self.pairs:
            for client in (pair.customer, pair.agent):
                side = _Side(client, pair.conv)
                self.sides.append(side)
                self.side_of[client] = side
        # Messages from before the run (system messages of the open and the assignment,
        # some of which one side never sees) must not hold the resume points back.
        _, history_errors = await gather_bounded(
            functools.partial(self._skip_history, pair) for pair in self.pairs
        )
        return SetupDone(clients=len(self.sides), errors=(errors + history_errors)[:5])

    async def _skip_history(self, pair: Pair) -> None:
        conv = pair.conv
        info = await pair.agent.request(lambda rid: GetConversation(id=rid, conv=conv))
        if not isinstance(info, ConversationInfo):
            raise RuntimeError(f"get: expected ConversationInfo, got {info!r}")
        for client in (pair.customer, pair.agent):
            self.side_of[client].tracker.skip_to(info.conversation.last_seq)

    async def _reconnect(self, side: _Side, drop_ns: int) -> None:
        chars = self.params.payload_chars
        for attempt in range(RECONNECT_ATTEMPTS):
            if attempt:
                await asyncio.sleep(attempt * RECONNECT_BACKOFF_S)
            try:
                await side.client.connect(resume={side.conv: side.tracker.base})
                async with asyncio.timeout(SYNC_TIMEOUT_S):
                    await side.client.synced.wait()
            except (ConnectFailed, ConnectionError, TimeoutError):
                self.reconnect_failures += 1
                side.client.abort()
                continue
            side.synced_ns = time.monotonic_ns()
            self.resume.record_ns(side.synced_ns - drop_ns)
            side.ready = True
            for cmid, due in list(side.outbox.items()):
                side.transmit(cmid, due, chars)
            return

    async def _drive(self, start_ns: int, stop_ns: int) -> None:
        chars = self.params.payload_chars

        def send(i: int, due: int, now: int) -> None:
            side = self.sides[i]
            side.sent += 1
            cmid = f"{side.prefix}{side.sent}"
            side.outbox[cmid] = due
            if side.ready:
                side.transmit(cmid, due, chars)

        await pace(
            len(self.sides),
            int(1e9 / self.params.rate),
            start_ns,
            stop_ns,
            random.Random(self.index),
            send,
        )

    async def _go(self, cmd: Go) -> GoResult:
        await sleep_until(cmd.start_ns)
        cpu0, wall0 = process_cpu_s(), time.monotonic()
        driver = asyncio.get_running_loop().create_task(self._drive(cmd.start_ns, cmd.stop_ns))
        await sleep_until(cmd.drop_ns)
        for side in self.sides:  # the storm: everyone drops at once...
            side.ready = False
            side.inflight.clear()
            side.client.abort()
        await asyncio.sleep(0)
        await asyncio.gather(
            *(self._reconnect(s, cmd.drop_ns) for s in self.sides)
        )  # ...and returns
        await driver
        deadline = cmd.stop_ns + int(cmd.drain_s * 1e9)
        pair_sides = [(self.side_of[p.customer], self.side_of[p.agent]) for p in self.pairs]
        while time.monotonic_ns() < deadline:
            if all(not s.outbox for s in self.sides) and all(
                len(b.received_cmids) >= len(a.acked) and len(a.received_cmids) >= len(b.acked)
                for a, b in pair_sides
            ):
                break
            await asyncio.sleep(DRAIN_POLL_S)
        lost = 0
        for a, b in pair_sides:
            lost += sum(1 for cmid in a.acked if cmid not in b.received_cmids)
            lost += sum(1 for cmid in b.acked if cmid not in a.received_cmids)
        return GoResult(
            clients=len(self.sides),
            sent=sum(s.sent for s in self.sides),
            acked=sum(len(s.acked) for s in self.sides),
            unacked=sum(len(s.outbox) for s in self.sides),
            delivered=self.delivered,
            replayed=self.replayed,
            lost=lost,
            duplicates=self.duplicates,
            redelivered=self.redelivered,
            errors=dict(self.errors),
            reconnect_failures=self.reconnect_failures,
            never_resumed=sum(1 for s in self.sides if not s.ready),
            last_resumed_ns=max((s.synced_ns for s in self.sides), default=0),
            resume=self.resume.encode(),
            delivery=self.delivery.encode(),
            cpu_s=process_cpu_s() - cpu0,
            wall_s=time.monotonic() - wall0,
        )


class StormReport(msgspec.Struct, frozen=True, kw_only=True, tag="reconnect_storm"):
    params: StormParams
    workers: int
    clients_connected: int
    setup_s: float
    setup_errors: list[str]
    sent: int
    acked: int
    unacked: int
    delivered: int
    replayed: int
    """Peer messages first received after a reconnect's Welcome and before its Synced: the resume replay."""
    lost: int
    duplicates: int
    redelivered: int
    errors: dict[str, int]
    reconnect_failures: int
    never_resumed: int
    time_to_all_resumed_ms: float | None
    """Drop -> the last client's Synced; None if some client never resumed."""
    resume: LatencySummary
    """Drop -> Synced, per client."""
    delivery: LatencySummary
    server_cpu_s: float
    loadgen_cpu_pct: float
    foreign_cpu_pct: float
    """CPU used meanwhile by other processes on the host (% of one core): noise."""
    steal_pct: float


def run(
    params: StormParams,
    url: str,
    secret: bytes,
    tag: str,
    probe: ServerProbe,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> StormReport:
    params.validate()

    def factory(index: int, count: int) -> StormWorker:
        return StormWorker(params, url, secret, tag, index, count)

    with WorkerPool(factory, workers) as pool:
        t0 = time.monotonic()
        done = [r for r in pool.call(Setup(), SETUP_TIMEOUT_S) if isinstance(r, SetupDone)]
        setup_s = time.monotonic() - t0
        connected = sum(d.clients for d in done)
        setup_errors = [e for d in done for e in d.errors]
        log(
            f"  reconnect-storm: {connected}/{params.clients} clients ready in {setup_s:.1f} s"
            + (f" ({setup_errors[0]})" if setup_errors else "")
        )
        start = start_at()
        drop = start + int(params.before_s * 1e9)
        stop = drop + int(params.after_s * 1e9)
        cpu0, host0, wall0 = probe.cpu_s(), HostCpu.sample(), time.monotonic()
        timeout = params.before_s + params.after_s + params.drain_s + RUN_TIMEOUT_MARGIN_S
        results = [
            r
            for r in pool.call(Go(start, drop, stop, params.drain_s), timeout)
            if isinstance(r, GoResult)
        ]
        server_cpu = probe.cpu_s() - cpu0
        host1 = HostCpu.sample()
        steal = host1.steal_pct_since(host0)
        foreign = foreign_cpu_pct(
            host0, host1, server_cpu + sum(r.cpu_s for r in results), time.monotonic() - wall0
        )
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    never = sum(r.never_resumed for r in results)
    last = max(r.last_resumed_ns for r in results)
    report = StormReport(
        params=params,
        workers=workers,
        clients_connected=connected,
        setup_s=round(setup_s, 2),
        setup_errors=setup_errors,
        sent=sum(r.sent for r in results),
        acked=sum(r.acked for r in results),
        unacked=sum(r.unacked for r in results),
        delivered=sum(r.delivered for r in results),
        replayed=sum(r.replayed for r in results),
        lost=sum(r.lost for r in results),
        duplicates=sum(r.duplicates for r in results),
        redelivered=sum(r.redelivered for r in results),
        errors=dict(errors),
        reconnect_failures=sum(r.reconnect_failures for r in results),
        never_resumed=never,
        time_to_all_resumed_ms=None if never or not last else round((last - drop) / 1e6, 1),
        resume=LatencyHistogram.merged([r.resume for r in results]).summary(),
        delivery=LatencyHistogram.merged([r.delivery for r in results]).summary(),
        server_cpu_s=round(server_cpu, 3),
        loadgen_cpu_pct=round(
            max((100 * r.cpu_s / r.wall_s for r in results if r.wall_s > 0), default=0.0), 1
        ),
        foreign_cpu_pct=foreign,
        steal_pct=steal,
    )
    resumed = (
        f"{report.time_to_all_resumed_ms:.0f} ms"
        if report.time_to_all_resumed_ms is not None
        else f"NOT ALL ({never} never resumed)"
    )
    log(
        f"  reconnect-storm: {connected} clients dropped at once, all resumed in {resumed} "
        f"(p50 {report.resume.p50_ms:.0f} ms); sent {report.sent}, acked {report.acked}, "
        f"replayed {report.replayed}, lost {report.lost}, duplicates {report.duplicates}, redelivered {report.redelivered}, "
        f"unacked {report.unacked}, reconnect failures {report.reconnect_failures}; "
        f"others {report.foreign_cpu_pct:.0f}% cpu"
    )
    return report
