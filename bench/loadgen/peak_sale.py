"""Scenario 1, peak sale: N customer/agent pairs chatting 1:1, ramped over offered loads.

Theory of operation
-------------------
Setup: every worker opens its share of ``pairs`` (see ``common.open_pair``).
Then, for each offered load L (messages/s summed over all senders) in
``steps``, every one of the 2N connections sends ``L / 2N`` messages/s for
``step_s`` seconds, open loop: each connection has a random phase, and one
scheduler task per worker walks a heap of due times and writes each due
``Send`` immediately. The payload (200 chars) carries the step number and the
*intended* send time (``payload``), so:

* send->delivery is measured by the peer on receipt of the ``MessageEvent``;
* send->ack by the sender on receipt of ``Sent`` (durable, for imserver);
* a scheduler that runs late is charged (the lag is also reported).

After ``step_s`` the senders stop and the step waits up to ``drain_s`` for
outstanding acks and deliveries. A step *passes* if the p99 of
send->delivery is under ``slo_p99_ms`` and every message sent was acked and
delivered without error. The ramp stops after ``stop_after_failures``
failing steps; the result is the highest passing offered load.

The coordinator also reads the server's CPU time around each step, giving
server CPU per delivered message, and the host's CPU steal.
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

from protocol import Error, Message, Send, Sent, ServerFrameType, TextBody, encode

from .client import ImClient
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

DEFAULT_PAIRS: Final = 400
DEFAULT_STEPS: Final = (
    500,
    1000,
    2000,
    3000,
    4000,
    5000,
    7000,
    8500,
    10_000,
    13_000,
    16_000,
    18_000,
    20_000,
    22_000,
    25_000,
    28_000,
    32_000,
)
"""Offered loads, messages/s over all senders (32,000 over 400 pairs is 40
frames/s per connection, under ``MAX_PERSON_RATE``). Steps of ~10 % near the
ceilings, so that ratios between targets are not an artefact of the ramp."""
DEFAULT_STEP_S: Final = 5.0
"""Long enough that a server just past its capacity builds a backlog the p99
shows: with 2.5 s steps a server 10 % over its capacity still passed."""
DEFAULT_DRAIN_S: Final = 2.0
P99_SLO_MS: Final = 500.0
SETUP_TIMEOUT_S: Final = 180.0
STEP_TIMEOUT_MARGIN_S: Final = 30.0
DRAIN_POLL_S: Final = 0.02
GENERATOR_BOUND_PCT: Final = 90.0
"""A load worker this busy (% of one core) may be what limits the step."""
NOISY_FOREIGN_PCT: Final = 20.0
"""Other processes using this much CPU (% of one core) make a step's figures suspect."""


class PeakSaleParams(msgspec.Struct, frozen=True, kw_only=True):
    pairs: int = DEFAULT_PAIRS
    steps: tuple[int, ...] = DEFAULT_STEPS
    step_s: float = DEFAULT_STEP_S
    drain_s: float = DEFAULT_DRAIN_S
    slo_p99_ms: float = P99_SLO_MS
    payload_chars: int = PAYLOAD_CHARS
    stop_after_failures: int = 1

    def validate(self) -> None:
        top = max(self.steps) / (2 * self.pairs)
        if top > MAX_PERSON_RATE:
            raise ValueError(
                f"{max(self.steps)} msg/s over {self.pairs} pairs is {top:.0f} frames/s per "
                f"connection, over the {MAX_PERSON_RATE:.0f}/s allowed for people: add pairs"
            )


# ---------------------------------------------------------------- commands


class Setup(msgspec.Struct, frozen=True):
    pass


class SetupDone(msgspec.Struct, frozen=True):
    pairs: int
    errors: list[str]


class RunStep(msgspec.Struct, frozen=True):
    index: int
    per_side_rate: float
    start_ns: int
    duration_s: float
    drain_s: float


class StepResult(msgspec.Struct, frozen=True):
    sent: int
    unsent: int
    acked: int
    delivered: int
    errors: dict[str, int]
    delivery: EncodedHistogram
    ack: EncodedHistogram
    lag: EncodedHistogram
    cpu_s: float
    wall_s: float


# ------------------------------------------------------------------ worker


class _Side:
    __slots__ = ("client", "conv", "inflight", "prefix", "sent")

    def __init__(self, client: ImClient, conv: str) -> None:
        self.client = client
        self.conv = conv
        self.prefix = f"{client.user}-"
        self.sent = 0
        self.inflight: dict[int, tuple[int, int]] = {}  # request id -> (step, intended ns)


class _StepStats:
    __slots__ = ("ack", "acked", "delivered", "delivery", "errors", "lag", "sent", "unsent")

    def __init__(self) -> None:
        self.sent = self.unsent = self.acked = self.delivered = 0
        self.errors: Counter[str] = Counter()
        self.delivery = LatencyHistogram()
        self.ack = LatencyHistogram()
        self.lag = LatencyHistogram()


class PeakSaleWorker:
    def __init__(
        self, params: PeakSaleParams, url: str, secret: bytes, tag: str, index: int, count: int
    ) -> None:
        self.params, self.url, self.secret, self.tag = params, url, secret, tag
        self.index, self.count = index, count
        self.pairs: list[Pair] = []
        self.sides: list[_Side] = []
        self.side_of: dict[ImClient, _Side] = {}
        self.steps: dict[int, _StepStats] = {}

    async def handle(self, command: object) -> object:
        if isinstance(command, Setup):
            return await self._setup()
        if isinstance(command, RunStep):
            return await self._step(command)
        raise TypeError(f"unexpected command {command!r}")

    async def close(self) -> None:
        await close_all(s.client for s in self.sides)

    # -- handler interface (called by the clients' reader tasks)

    def on_message(self, client: ImClient, message: Message, now_ns: int) -> None:
        body = message.body
        if message.sender == client.identity.user or type(body) is not TextBody:
            return
        stamp = parse_text(body.text)
        if stamp is None:
            return
        stats = self.steps.get(stamp.step)
        if stats is not None:
            stats.delivered += 1
            stats.delivery.record_ns(now_ns - stamp.sent_ns)

    def on_reply(self, client: ImClient, frame: ServerFrameType, now_ns: int) -> None:
        side = self.side_of.get(client)
        if side is None:
            return
        entry = side.inflight.pop(getattr(frame, "id", -1), None)
        if entry is None:
            return
        stats = self.steps[entry[0]]
        if type(frame) is Sent:
            stats.acked += 1
            stats.ack.record_ns(now_ns - entry[1])
        elif isinstance(frame, Error):
            stats.errors[frame.code] += 1

    # -- phases

    async def _setup(self) -> SetupDone:
        p = self.params
        mine = range(self.index, p.pairs, self.count)
        pairs, errors = await gather_bounded(
            functools.partial(open_pair, self.url, self.secret, self.tag, i, self) for i in mine
        )
        self.pairs = sorted(pairs)
        for pair in self.pairs:
            for client in (pair.customer, pair.agent):
                side = _Side(client, pair.conv)
                self.sides.append(side)
                self.side_of[client] = side
        return SetupDone(pairs=len(self.pairs), errors=errors[:5])

    async def _step(self, cmd: RunStep) -> StepResult:
        stats = self.steps[cmd.index] = _StepStats()
        end_ns = cmd.start_ns + int(cmd.duration_s * 1e9)
        await sleep_until(cmd.start_ns)
        cpu0, wall0 = process_cpu_s(), time.monotonic()
        if self.sides and cmd.per_side_rate > 0:
            await self._drive(stats, cmd.index, cmd.per_side_rate, cmd.start_ns, end_ns)
        deadline = end_ns + int(cmd.drain_s * 1e9)
        while time.monotonic_ns() < deadline:
            replied = stats.acked + sum(stats.errors.values())
            if stats.delivered >= stats.sent and replied >= stats.sent:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        cpu = process_cpu_s() - cpu0
        for side in self.sides:
            side.inflight.clear()  # unanswered by now: counted as not acked
        return StepResult(
            sent=stats.sent,
            unsent=stats.unsent,
            acked=stats.acked,
            delivered=stats.delivered,
            errors=dict(stats.errors),
            delivery=stats.delivery.encode(),
            ack=stats.ack.encode(),
            lag=stats.lag.encode(),
            cpu_s=cpu,
            wall_s=time.monotonic() - wall0,
        )

    async def _drive(
        self, stats: _StepStats, step: int, rate: float, start_ns: int, end_ns: int
    ) -> None:
        sides = self.sides
        chars = self.params.payload_chars

        def send(i: int, due: int, now: int) -> None:
            side = sides[i]
            client = side.client
            side.sent += 1
            request_id = client.next_id()
            data = encode(
                Send(
                    id=request_id,
                    conv=side.conv,
                    cmid=f"{side.prefix}{side.sent}",
                    body=TextBody(text=make_text(step, due, chars)),
                )
            )
            if client.write(data):
                side.inflight[request_id] = (step, due)
                stats.sent += 1
            else:
                stats.unsent += 1
            stats.lag.record_ns(now - due)

        await pace(
            len(sides),
            int(1e9 / rate),
            start_ns,
            end_ns,
            random.Random(step * 1_000_003 + self.index),
            send,
        )


# ------------------------------------------------------------- coordinator


class StepReport(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    offered_msgs_per_s: int
    per_side_rate: float
    duration_s: float
    sent: int
    unsent: int
    acked: int
    delivered: int
    undelivered: int
    errors: dict[str, int]
    delivered_msgs_per_s: float
    delivery: LatencySummary
    ack: LatencySummary
    send_lag: LatencySummary
    server_cpu_s: float
    server_cpu_us_per_msg: float
    loadgen_cpu_pct: float
    """CPU of the busiest load worker over its step (send + drain), % of one core."""
    generator_bound: bool
    """The busiest load worker was at GENERATOR_BOUND_PCT or more: the figures of this step
    measure the generator as much as the server (add workers, or another machine)."""
    foreign_cpu_pct: float
    """CPU used meanwhile by other processes on the host (% of one core): noise."""
    steal_pct: float
    passed: bool
    verdict: str


class PeakSaleReport(msgspec.Struct, frozen=True, kw_only=True, tag="peak_sale"):
    params: PeakSaleParams
    workers: int
    pairs_connected: int
    setup_s: float
    setup_errors: list[str]
    steps: list[StepReport]
    max_sustained_msgs_per_s: int | None
    """Highest offered load that passed (p99 delivery < SLO, nothing lost); None: none passed."""
    generator_bound: bool
    """The load generator was saturated at or below the ramp's end: the server's real
    ceiling may be higher than ``max_sustained_msgs_per_s`` (it is a lower bound)."""


def _judge(
    p: PeakSaleParams,
    sent: int,
    acked: int,
    delivered: int,
    unsent: int,
    errors: dict[str, int],
    delivery: LatencySummary,
) -> tuple[bool, str]:
    problems = []
    if delivery.count == 0:
        problems.append("nothing delivered")
    elif delivery.p99_ms >= p.slo_p99_ms:
        problems.append(f"p99 {delivery.p99_ms:.0f} ms >= {p.slo_p99_ms:.0f} ms")
    if delivered < sent:
        problems.append(f"{sent - delivered} undelivered")
    if acked < sent:
        problems.append(f"{sent - acked} unacked")
    if unsent:
        problems.append(f"{unsent} not sent (connection closed)")
    if errors:
        problems.append("errors " + ", ".join(f"{k}={v}" for k, v in sorted(errors.items())))
    return (not problems, "; ".join(problems) or "ok")


def run(
    params: PeakSaleParams,
    url: str,
    secret: bytes,
    tag: str,
    probe: ServerProbe,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> PeakSaleReport:
    params.validate()
    steps: list[StepReport] = []
    best: int | None = None
    failures = 0

    def factory(index: int, count: int) -> PeakSaleWorker:
        return PeakSaleWorker(params, url, secret, tag, index, count)

    with WorkerPool(factory, workers) as pool:
        t0 = time.monotonic()
        done = [r for r in pool.call(Setup(), SETUP_TIMEOUT_S) if isinstance(r, SetupDone)]
        setup_s = time.monotonic() - t0
        connected = sum(d.pairs for d in done)
        setup_errors = [e for d in done for e in d.errors]
        log(
            f"  peak-sale: {connected}/{params.pairs} pairs ready in {setup_s:.1f} s"
            + (f" ({setup_errors[0]})" if setup_errors else "")
        )
        if connected == 0:
            return PeakSaleReport(
                params=params,
                workers=workers,
                pairs_connected=0,
                setup_s=setup_s,
                setup_errors=setup_errors,
                steps=[],
                max_sustained_msgs_per_s=None,
                generator_bound=False,
            )
        for index, load in enumerate(params.steps):
            rate = load / (2 * connected)
            cpu0, host0, wall0 = probe.cpu_s(), HostCpu.sample(), time.monotonic()
            command = RunStep(
                index=index,
                per_side_rate=rate,
                start_ns=start_at(),
                duration_s=params.step_s,
                drain_s=params.drain_s,
            )
            timeout = params.step_s + params.drain_s + STEP_TIMEOUT_MARGIN_S
            results = [r for r in pool.call(command, timeout) if isinstance(r, StepResult)]
            server_cpu = probe.cpu_s() - cpu0
            host1 = HostCpu.sample()
            steal = host1.steal_pct_since(host0)
            foreign = foreign_cpu_pct(
                host0, host1, server_cpu + sum(r.cpu_s for r in results), time.monotonic() - wall0
            )
            sent = sum(r.sent for r in results)
            acked = sum(r.acked for r in results)
            delivered = sum(r.delivered for r in results)
            unsent = sum(r.unsent for r in results)
            errors: Counter[str] = Counter()
            for r in results:
                errors.update(r.errors)
            delivery = LatencyHistogram.merged([r.delivery for r in results]).summary()
            ack = LatencyHistogram.merged([r.ack for r in results]).summary()
            lag = LatencyHistogram.merged([r.lag for r in results]).summary()
            loadgen_pct = max(
                (100 * r.cpu_s / r.wall_s for r in results if r.wall_s > 0), default=0.0
            )
            passed, verdict = _judge(params, sent, acked, delivered, unsent, dict(errors), delivery)
            if loadgen_pct >= GENERATOR_BOUND_PCT:
                verdict += f" (generator-bound: load worker at {loadgen_pct:.0f}% cpu)"
            if foreign >= NOISY_FOREIGN_PCT:
                verdict += f" (noisy: other processes used {foreign:.0f}% cpu)"
            report = StepReport(
                index=index,
                offered_msgs_per_s=load,
                per_side_rate=round(rate, 3),
                duration_s=params.step_s,
                sent=sent,
                unsent=unsent,
                acked=acked,
                delivered=delivered,
                undelivered=max(0, sent - delivered),
                errors=dict(errors),
                delivered_msgs_per_s=round(delivered / params.step_s, 1),
                delivery=delivery,
                ack=ack,
                send_lag=lag,
                server_cpu_s=round(server_cpu, 3),
                server_cpu_us_per_msg=round(1e6 * server_cpu / delivered, 1) if delivered else 0.0,
                loadgen_cpu_pct=round(loadgen_pct, 1),
                generator_bound=loadgen_pct >= GENERATOR_BOUND_PCT,
                foreign_cpu_pct=foreign,
                steal_pct=steal,
                passed=passed,
                verdict=verdict,
            )
            steps.append(report)
            log(
                f"  peak-sale {load:>6} msg/s: delivered {delivered}/{sent}, "
                f"p50 {delivery.p50_ms:.1f} ms, p99 {delivery.p99_ms:.1f} ms, "
                f"ack p99 {ack.p99_ms:.1f} ms, server {report.server_cpu_us_per_msg:.0f} us/msg, "
                f"loadgen {report.loadgen_cpu_pct:.0f}% cpu, others {foreign:.0f}% cpu -> {verdict}"
            )
            if passed:
                best = load
            else:
                failures += 1
                if failures >= params.stop_after_failures:
                    break
    return PeakSaleReport(
        params=params,
        workers=workers,
        pairs_connected=connected,
        setup_s=round(setup_s, 2),
        setup_errors=setup_errors,
        steps=steps,
        max_sustained_msgs_per_s=best,
        generator_bound=any(s.generator_bound for s in steps),
    )
