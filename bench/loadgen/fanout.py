"""Scenario 2, group fan-out: one agent sends into a shop group whose M members are all online.

Theory of operation
-------------------
Setup: every worker connects its share of the ``members`` (customers), each
of whom opens a direct conversation with the shop: only users of a shop may
be members of its groups. Then worker 0 connects the sender, an agent of the
shop, who creates the group with ``CreateGroup`` (the first
``MAX_BATCH_IDS`` members) and adds the rest with ``UpdateMembers`` in
chunks.

Run: from a common start instant the sender sends ``rate`` messages/s for
``duration_s`` seconds on a fixed schedule (send k at start + k/rate, so
every worker knows how many messages to expect), with the usual stamped
200-char payload. Each member records send->delivery of every message
(one sample per delivery); per message, each worker also keeps how many of
its members got it and the slowest one, from which the coordinator derives
the *completion* latency: until the last member of the group has it. After
the sends, the workers wait up to ``drain_s`` for missing deliveries.
The sender's rate stays under the per-person limit (agent role).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Final

import msgspec

from protocol import (
    MAX_BATCH_IDS,
    ConversationInfo,
    CreateGroup,
    Error,
    Message,
    OpenConversation,
    Send,
    Sent,
    ServerFrameType,
    TextBody,
    UpdateMembers,
    encode,
)

from .client import ImClient
from .common import (
    MAX_PERSON_RATE,
    agent,
    close_all,
    gather_bounded,
    member,
    process_cpu_s,
)
from .histogram import EncodedHistogram, LatencyHistogram, LatencySummary
from .payload import PAYLOAD_CHARS, make_text, parse_text
from .pool import WorkerPool, sleep_until, start_at
from .sysstat import HostCpu, ServerProbe, foreign_cpu_pct

DEFAULT_MEMBERS: Final = 1000
DEFAULT_RATE: Final = 10.0
"""Messages/s from the one sender (people are limited to 50 frames/s)."""
DEFAULT_DURATION_S: Final = 4.0
DEFAULT_DRAIN_S: Final = 3.0
SETUP_TIMEOUT_S: Final = 180.0
RUN_TIMEOUT_MARGIN_S: Final = 30.0
DRAIN_POLL_S: Final = 0.02
GROUP_TITLE: Final = "bench fan-out"
SENDER_INDEX: Final = 0
"""The sender is agent 0 of the run's tag (shop 0)."""


class FanoutParams(msgspec.Struct, frozen=True, kw_only=True):
    members: int = DEFAULT_MEMBERS
    rate: float = DEFAULT_RATE
    duration_s: float = DEFAULT_DURATION_S
    drain_s: float = DEFAULT_DRAIN_S
    payload_chars: int = PAYLOAD_CHARS

    @property
    def messages(self) -> int:
        return math.ceil(self.duration_s * self.rate)

    def validate(self) -> None:
        if self.rate > MAX_PERSON_RATE:
            raise ValueError(f"sender rate {self.rate}/s is over {MAX_PERSON_RATE}/s for people")


class Setup(msgspec.Struct, frozen=True):
    pass


class SetupDone(msgspec.Struct, frozen=True):
    members: int
    errors: list[str]


class BuildGroup(msgspec.Struct, frozen=True):
    """After every worker's Setup: its members are users of the shop by then."""


class GroupBuilt(msgspec.Struct, frozen=True):
    conv: str | None  # worker 0 only


class Go(msgspec.Struct, frozen=True):
    conv: str
    start_ns: int


class GoResult(msgspec.Struct, frozen=True):
    sent: int
    acked: int
    errors: dict[str, int]
    deliveries: int
    delivery: EncodedHistogram
    ack: EncodedHistogram
    per_message: dict[int, tuple[int, int]]
    """message number -> (deliveries to this worker's members, slowest ns)."""
    cpu_s: float
    wall_s: float


class FanoutWorker:
    def __init__(
        self, params: FanoutParams, url: str, secret: bytes, tag: str, index: int, count: int
    ) -> None:
        self.params, self.url, self.secret, self.tag = params, url, secret, tag
        self.index, self.count = index, count
        self.members: list[ImClient] = []
        self.sender: ImClient | None = None
        self.conv = ""
        self.delivery = LatencyHistogram()
        self.ack = LatencyHistogram()
        self.deliveries = 0
        self.per_message: dict[int, list[int]] = {}
        self.inflight: dict[int, int] = {}
        self.acked = 0
        self.errors: Counter[str] = Counter()

    async def handle(self, command: object) -> object:
        if isinstance(command, Setup):
            return await self._setup()
        if isinstance(command, BuildGroup):
            return await self._build_group()
        if isinstance(command, Go):
            return await self._go(command)
        raise TypeError(f"unexpected command {command!r}")

    async def close(self) -> None:
        await close_all([*self.members, *([self.sender] if self.sender else [])])

    def on_message(self, client: ImClient, message: Message, now_ns: int) -> None:
        body = message.body
        if message.conv != self.conv or client is self.sender or type(body) is not TextBody:
            return
        stamp = parse_text(body.text)
        if stamp is None:
            return
        latency = now_ns - stamp.sent_ns
        self.deliveries += 1
        self.delivery.record_ns(latency)
        entry = self.per_message.get(stamp.step)
        if entry is None:
            self.per_message[stamp.step] = [1, latency]
        else:
            entry[0] += 1
            if latency > entry[1]:
                entry[1] = latency

    def on_reply(self, client: ImClient, frame: ServerFrameType, now_ns: int) -> None:
        sent_ns = self.inflight.pop(getattr(frame, "id", -1), None)
        if sent_ns is None:
            return
        if type(frame) is Sent:
            self.acked += 1
            self.ack.record_ns(now_ns - sent_ns)
        elif isinstance(frame, Error):
            self.errors[frame.code] += 1

    async def _connect_member(self, number: int) -> ImClient:
        client = ImClient(self.url, member(self.tag, number), self.secret, self)
        await client.connect()
        shop = agent(self.tag, SENDER_INDEX).shop
        await client.request(lambda rid: OpenConversation(id=rid, shop=shop))
        return client

    async def _setup(self) -> SetupDone:
        p = self.params
        members, errors = await gather_bounded(
            functools.partial(self._connect_member, i)
            for i in range(self.index, p.members, self.count)
        )
        self.members = members
        return SetupDone(members=len(members), errors=errors[:5])

    async def _build_group(self) -> GroupBuilt:
        p = self.params
        conv: str | None = None
        if self.index == 0:
            sender = self.sender = ImClient(
                self.url, agent(self.tag, SENDER_INDEX), self.secret, self
            )
            await sender.connect()
            ids = [member(self.tag, i).user for i in range(p.members)]
            shop = sender.identity.shop
            first, rest = ids[:MAX_BATCH_IDS], ids[MAX_BATCH_IDS:]
            info = await sender.request(
                lambda rid: CreateGroup(id=rid, shop=shop, title=GROUP_TITLE, members=first)
            )
            if not isinstance(info, ConversationInfo):
                raise RuntimeError(f"create_group: expected ConversationInfo, got {info!r}")
            conv = info.conversation.id
            for at in range(0, len(rest), MAX_BATCH_IDS):
                chunk = rest[at : at + MAX_BATCH_IDS]
                await sender.request(
                    lambda rid, chunk=chunk: UpdateMembers(  # type: ignore[misc]
                        id=rid, conv=conv, add=chunk
                    )
                )
        return GroupBuilt(conv=conv)

    async def _go(self, cmd: Go) -> GoResult:
        p = self.params
        self.conv = cmd.conv
        await sleep_until(cmd.start_ns)
        cpu0, wall0 = process_cpu_s(), time.monotonic()
        sent = 0
        if self.sender is not None:
            interval = int(1e9 / p.rate)
            for k in range(p.messages):
                due = cmd.start_ns + k * interval
                await sleep_until(due)
                request_id = self.sender.next_id()
                data = encode(
                    Send(
                        id=request_id,
                        conv=cmd.conv,
                        cmid=f"{self.sender.user}-{k}",
                        body=TextBody(text=make_text(k, due, p.payload_chars)),
                    )
                )
                if self.sender.write(data):
                    self.inflight[request_id] = due
                    sent += 1
        end_sends = cmd.start_ns + int(p.duration_s * 1e9)
        deadline = end_sends + int(p.drain_s * 1e9)
        expected = p.messages * len(self.members)
        await sleep_until(end_sends)
        while time.monotonic_ns() < deadline:
            if self.deliveries >= expected and not self.inflight:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        return GoResult(
            sent=sent,
            acked=self.acked,
            errors=dict(self.errors),
            deliveries=self.deliveries,
            delivery=self.delivery.encode(),
            ack=self.ack.encode(),
            per_message={k: (v[0], v[1]) for k, v in self.per_message.items()},
            cpu_s=process_cpu_s() - cpu0,
            wall_s=time.monotonic() - wall0,
        )


class FanoutReport(msgspec.Struct, frozen=True, kw_only=True, tag="fanout"):
    params: FanoutParams
    workers: int
    members_connected: int
    setup_s: float
    setup_errors: list[str]
    sent: int
    acked: int
    errors: dict[str, int]
    deliveries: int
    expected_deliveries: int
    deliveries_per_s: float
    delivery: LatencySummary
    """send -> one member's delivery, one sample per delivery."""
    completion: LatencySummary
    """send -> the last member's delivery, one sample per fully delivered message."""
    incomplete_messages: int
    ack: LatencySummary
    server_cpu_s: float
    server_cpu_us_per_delivery: float
    loadgen_cpu_pct: float
    foreign_cpu_pct: float
    """CPU used meanwhile by other processes on the host (% of one core): noise."""
    steal_pct: float


def run(
    params: FanoutParams,
    url: str,
    secret: bytes,
    tag: str,
    probe: ServerProbe,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> FanoutReport:
    params.validate()

    def factory(index: int, count: int) -> FanoutWorker:
        return FanoutWorker(params, url, secret, tag, index, count)

    with WorkerPool(factory, workers) as pool:
        t0 = time.monotonic()
        done = [r for r in pool.call(Setup(), SETUP_TIMEOUT_S) if isinstance(r, SetupDone)]
        built = [r for r in pool.call(BuildGroup(), SETUP_TIMEOUT_S) if isinstance(r, GroupBuilt)]
        setup_s = time.monotonic() - t0
        connected = sum(d.members for d in done)
        setup_errors = [e for d in done for e in d.errors]
        conv = built[0].conv
        assert conv is not None
        log(
            f"  fan-out: group of {params.members}, {connected} online, ready in {setup_s:.1f} s"
            + (f" ({setup_errors[0]})" if setup_errors else "")
        )
        cpu0, host0, wall0 = probe.cpu_s(), HostCpu.sample(), time.monotonic()
        timeout = params.duration_s + params.drain_s + RUN_TIMEOUT_MARGIN_S
        results = [
            r
            for r in pool.call(Go(conv=conv, start_ns=start_at()), timeout)
            if isinstance(r, GoResult)
        ]
        server_cpu = probe.cpu_s() - cpu0
        host1 = HostCpu.sample()
        steal = host1.steal_pct_since(host0)
        foreign = foreign_cpu_pct(
            host0, host1, server_cpu + sum(r.cpu_s for r in results), time.monotonic() - wall0
        )
    completion = LatencyHistogram()
    incomplete = 0
    sent = sum(r.sent for r in results)
    for k in range(sent):
        parts = [r.per_message.get(k) for r in results]
        got = sum(p[0] for p in parts if p is not None)
        if got >= connected:
            completion.record_ns(max(p[1] for p in parts if p is not None))
        else:
            incomplete += 1
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    deliveries = sum(r.deliveries for r in results)
    report = FanoutReport(
        params=params,
        workers=workers,
        members_connected=connected,
        setup_s=round(setup_s, 2),
        setup_errors=setup_errors,
        sent=sent,
        acked=sum(r.acked for r in results),
        errors=dict(errors),
        deliveries=deliveries,
        expected_deliveries=sent * connected,
        deliveries_per_s=round(deliveries / params.duration_s, 1),
        delivery=LatencyHistogram.merged([r.delivery for r in results]).summary(),
        completion=completion.summary(),
        incomplete_messages=incomplete,
        ack=LatencyHistogram.merged([r.ack for r in results]).summary(),
        server_cpu_s=round(server_cpu, 3),
        server_cpu_us_per_delivery=round(1e6 * server_cpu / deliveries, 1) if deliveries else 0.0,
        loadgen_cpu_pct=round(
            max((100 * r.cpu_s / r.wall_s for r in results if r.wall_s > 0), default=0.0), 1
        ),
        foreign_cpu_pct=foreign,
        steal_pct=steal,
    )
    log(
        f"  fan-out: {sent} msgs x {connected} members: {deliveries}/{sent * connected} "
        f"deliveries ({report.deliveries_per_s:.0f}/s), p50 {report.delivery.p50_ms:.1f} ms, "
        f"p99 {report.delivery.p99_ms:.1f} ms, completion p99 {report.completion.p99_ms:.1f} ms, "
        f"incomplete {incomplete}, server {report.server_cpu_us_per_delivery:.0f} us/delivery, "
        f"loadgen {report.loadgen_cpu_pct:.0f}% cpu, others {report.foreign_cpu_pct:.0f}% cpu"
    )
    return report
