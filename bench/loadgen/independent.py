"""A second, independent load client: the ``websockets`` asyncio client on uvloop.

Usage (``bench.run`` runs it as the ``independent`` scenario)::

    python -m bench.loadgen.independent --url ws://127.0.0.1:PORT/ws --secret S \\
        --pairs 100 --rate 20 --duration-s 8 [--drain-s 2] [--tag T]

Theory of operation
-------------------
The project's generator (``peak_sale``) is built for low CPU: an
``asyncio.Protocol`` per connection, its own frame parser, one pacer task for
all senders. A figure that depends on that machinery is suspect, so this
client shares none of it: each person is one ``websockets.asyncio.client``
connection (the library's own framing, a reader task per connection), and
each sender is a plain loop -- send, then ``asyncio.sleep`` until its next
due time -- starting at a random phase within its first interval. Only the
wire protocol (``protocol``: Hello, OpenConversation, UpdateConversation,
Send) and the payload stamp (``payload``: the *intended* send time, so a
late sender is charged) are shared, and the HdrHistogram summary.

``pairs`` customer/agent pairs are set up as in ``common.open_pair``; then
both sides of every pair send ``rate`` msg/s for ``duration_s`` (offered
load = 2 x pairs x rate), and the client waits up to ``drain_s`` for the
outstanding acks and deliveries. It prints one JSON object
(``ClientResult``); ``run`` (the coordinator used by ``bench.run``) starts
it as a subprocess per load point, reads the server's and the host's CPU
around it, and reports each point as a peak-sale ``StepReport``: the same
figures as the project's generator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Final

import msgspec
import uvloop
from websockets.asyncio.client import ClientConnection, connect

from imserver.auth import mint_token
from protocol import (
    PROTOCOL_VERSION,
    ConversationInfo,
    ConvState,
    Error,
    Hello,
    MessageEvent,
    OpenConversation,
    Send,
    Sent,
    TextBody,
    UpdateConversation,
    Welcome,
    decode_server_frame,
    encode,
)

from .common import agent, customer
from .histogram import LatencyHistogram, LatencySummary
from .payload import make_text, parse_text
from .peak_sale import NOISY_FOREIGN_PCT, P99_SLO_MS, StepReport
from .sysstat import HostCpu, ServerProbe, foreign_cpu_pct

POINTS: Final = (4000, 10_000)
"""Offered loads (msg/s) the suite measures with this client."""
PERSON_RATE: Final = 20.0
"""msg/s each side of a pair sends (the issue's shape: P pairs x 2 x 20 msg/s)."""
DURATION_S: Final = 8.0
DRAIN_S: Final = 2.0
SETUP_CONCURRENCY: Final = 32
SETUP_TIMEOUT_S: Final = 60.0
RUN_TIMEOUT_MARGIN_S: Final = 90.0
TOKEN_TTL_S: Final = 3600
STEP: Final = 1
"""The payload's step number (one measured phase per client process)."""


class IndependentParams(msgspec.Struct, frozen=True, kw_only=True):
    points: tuple[int, ...] = POINTS
    rate: float = PERSON_RATE
    duration_s: float = DURATION_S
    drain_s: float = DRAIN_S


class ClientResult(msgspec.Struct, kw_only=True):
    pairs: int
    setup_errors: list[str]
    sent: int = 0
    acked: int = 0
    delivered: int = 0
    errors: dict[str, int] = {}
    delivery: LatencySummary | None = None
    ack: LatencySummary | None = None
    cpu_s: float = 0.0
    wall_s: float = 0.0


class IndependentReport(msgspec.Struct, frozen=True, kw_only=True, tag="independent"):
    params: IndependentParams
    client: str
    points: list[StepReport]


class _Person:
    def __init__(self, ws: ClientConnection, user: str) -> None:
        self.ws, self.user = ws, user
        self.conv = ""
        self.next_id = 1
        self.replies: dict[int, asyncio.Future[object]] = {}
        self.inflight: dict[int, int] = {}  # request id -> intended send ns


class _Run:
    def __init__(self) -> None:
        self.sent = self.acked = self.delivered = 0
        self.errors: Counter[str] = Counter()
        self.delivery = LatencyHistogram()
        self.ack = LatencyHistogram()
        self.sending = True
        self.settled = asyncio.Event()
        """Set once sending is over and everything sent was answered and delivered."""

    def check(self) -> None:
        answered = self.acked + sum(self.errors.values())
        if not self.sending and self.delivered >= self.sent and answered >= self.sent:
            self.settled.set()

    async def reader(self, person: _Person) -> None:
        async for data in person.ws:
            now = time.monotonic_ns()
            if isinstance(data, str):
                continue
            frame = decode_server_frame(data)
            if isinstance(frame, MessageEvent):
                body = frame.message.body
                if frame.message.sender != person.user and isinstance(body, TextBody):
                    stamp = parse_text(body.text)
                    if stamp is not None:
                        self.delivered += 1
                        self.delivery.record_ns(now - stamp.sent_ns)
                        self.check()
                continue
            request_id = getattr(frame, "id", None)
            if request_id is None:
                continue
            future = person.replies.pop(request_id, None)
            if future is not None:
                future.set_result(frame)
                continue
            due = person.inflight.pop(request_id, None)
            if due is None:
                continue
            if isinstance(frame, Sent):
                self.acked += 1
                self.ack.record_ns(now - due)
            elif isinstance(frame, Error):
                self.errors[frame.code] += 1
            self.check()

    async def request(self, person: _Person, make: Callable[[int], object]) -> object:
        request_id = person.next_id
        person.next_id += 1
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        person.replies[request_id] = future
        await person.ws.send(encode(make(request_id)))  # type: ignore[arg-type]
        async with asyncio.timeout(SETUP_TIMEOUT_S):
            reply = await future
        if isinstance(reply, Error):
            raise RuntimeError(f"{person.user}: {reply.code}: {reply.message}")
        return reply

    async def sender(self, person: _Person, interval_ns: int, start_ns: int, end_ns: int) -> None:
        """A plain sleep loop: send, sleep until the next due time. The stamp is
        the intended send time, so a late wake-up is charged to latency."""
        due = start_ns + random.randrange(interval_ns)
        count = 0
        while due < end_ns:
            delay = due - time.monotonic_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            count += 1
            request_id = person.next_id
            person.next_id += 1
            person.inflight[request_id] = due
            self.sent += 1
            await person.ws.send(
                encode(
                    Send(
                        id=request_id,
                        conv=person.conv,
                        cmid=f"{person.user}-{count}",
                        body=TextBody(text=make_text(STEP, due)),
                    )
                )
            )
            due += interval_ns


async def _open(
    url: str,
    secret: bytes,
    identity: tuple[str, str, str, str],
    run: _Run,
    tasks: list[asyncio.Task[None]],
) -> _Person:
    user, role, shop, device = identity
    ws = await connect(url, max_size=2**20, compression=None, ping_interval=None)
    token = mint_token(secret, user=user, role=role, shop=shop, ttl_s=TOKEN_TTL_S)
    await ws.send(encode(Hello(v=PROTOCOL_VERSION, token=token, device=device)))
    welcome = decode_server_frame(await ws.recv(decode=False))
    if not isinstance(welcome, Welcome):
        raise RuntimeError(f"{user}: hello refused: {welcome!r}")
    person = _Person(ws, user)
    tasks.append(asyncio.create_task(run.reader(person)))
    return person


async def _client(
    url: str, secret: bytes, tag: str, pairs: int, rate: float, duration_s: float, drain_s: float
) -> ClientResult:
    run = _Run()
    readers: list[asyncio.Task[None]] = []
    people: list[_Person] = []
    errors: list[str] = []
    limit = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def open_pair(index: int) -> None:
        c, a = customer(tag, index), agent(tag, index)
        async with limit:
            try:
                cust = await _open(url, secret, (c.user, c.role, c.shop, c.device), run, readers)
                agnt = await _open(url, secret, (a.user, a.role, a.shop, a.device), run, readers)
                info = await run.request(cust, lambda rid: OpenConversation(id=rid, shop=a.shop))
                assert isinstance(info, ConversationInfo)
                cust.conv = agnt.conv = info.conversation.id
                await run.request(
                    agnt,
                    lambda rid: UpdateConversation(
                        id=rid, conv=cust.conv, state=ConvState.ASSIGNED, agent=a.user
                    ),
                )
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            people.extend((cust, agnt))

    await asyncio.gather(*(open_pair(i) for i in range(pairs)))
    result = ClientResult(pairs=len(people) // 2, setup_errors=errors[:5])
    if people:
        cpu0, wall0 = time.process_time(), time.monotonic()
        start = time.monotonic_ns() + 200_000_000
        end = start + int(duration_s * 1e9)
        await asyncio.gather(*(run.sender(p, int(1e9 / rate), start, end) for p in people))
        run.sending = False
        run.check()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_s):
                await run.settled.wait()
        result.cpu_s, result.wall_s = time.process_time() - cpu0, time.monotonic() - wall0
        result.sent, result.acked, result.delivered = run.sent, run.acked, run.delivered
        result.errors = dict(run.errors)
        result.delivery, result.ack = run.delivery.summary(), run.ack.summary()
    for person in people:
        person.ws.transport.abort()
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    return result


def run(
    params: IndependentParams,
    url: str,
    secret: bytes,
    tag: str,
    probe: ServerProbe,
    log: Callable[[str], None] = print,
) -> IndependentReport:
    """Each load point in a client process of its own; the server's CPU around it."""
    rate, duration_s, drain_s = params.rate, params.duration_s, params.drain_s
    reports = []
    for index, load in enumerate(params.points):
        pairs = max(1, round(load / (2 * rate)))
        argv = [
            sys.executable,
            "-m",
            "bench.loadgen.independent",
            "--url",
            url,
            "--secret",
            secret.decode(),
            "--tag",
            f"{tag}i{index}",
            "--pairs",
            str(pairs),
            "--rate",
            str(rate),
            "--duration-s",
            str(duration_s),
            "--drain-s",
            str(drain_s),
        ]
        cpu0, host0, wall0 = probe.cpu_s(), HostCpu.sample(), time.monotonic()
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            check=True,
            timeout=duration_s + drain_s + RUN_TIMEOUT_MARGIN_S,
        )
        server_cpu = probe.cpu_s() - cpu0
        host1 = HostCpu.sample()
        result = msgspec.json.decode(done.stdout, type=ClientResult)
        wall = time.monotonic() - wall0
        # The window includes the client's start and setup (a second or so of light
        # work): server CPU per message is a slight over-estimate, never an under-.
        foreign = foreign_cpu_pct(host0, host1, server_cpu + result.cpu_s, wall)
        empty = LatencyHistogram().summary()
        delivery, ack = result.delivery or empty, result.ack or empty
        problems = []
        if result.pairs < pairs:
            problems.append(
                f"{pairs - result.pairs} pairs failed setup ({'; '.join(result.setup_errors[:1])})"
            )
        if delivery.count and delivery.p99_ms >= P99_SLO_MS:
            problems.append(f"p99 {delivery.p99_ms:.0f} ms >= {P99_SLO_MS:.0f} ms")
        if result.delivered < result.sent:
            problems.append(f"{result.sent - result.delivered} undelivered")
        if result.acked < result.sent:
            problems.append(f"{result.sent - result.acked} unacked")
        if result.errors:
            problems.append("errors " + ", ".join(f"{k}={v}" for k, v in result.errors.items()))
        verdict = "; ".join(problems) or "ok"
        if foreign >= NOISY_FOREIGN_PCT:
            verdict += f" (noisy: other processes used {foreign:.0f}% cpu)"
        loadgen_pct = 100 * result.cpu_s / result.wall_s if result.wall_s else 0.0
        report = StepReport(
            index=index,
            offered_msgs_per_s=load,
            per_side_rate=rate,
            duration_s=duration_s,
            sent=result.sent,
            unsent=0,
            acked=result.acked,
            delivered=result.delivered,
            undelivered=max(0, result.sent - result.delivered),
            errors=result.errors,
            delivered_msgs_per_s=round(result.delivered / duration_s, 1),
            delivery=delivery,
            ack=ack,
            send_lag=empty,
            server_cpu_s=round(server_cpu, 3),
            server_cpu_us_per_msg=(
                round(1e6 * server_cpu / result.delivered, 1) if result.delivered else 0.0
            ),
            loadgen_cpu_pct=round(loadgen_pct, 1),
            generator_bound=loadgen_pct >= 90,
            foreign_cpu_pct=foreign,
            steal_pct=host1.steal_pct_since(host0),
            passed=not problems,
            verdict=verdict,
        )
        reports.append(report)
        log(
            f"  independent client {load:>6} msg/s ({pairs} pairs x 2 x {rate:g}/s): delivered "
            f"{result.delivered}/{result.sent}, p50 {delivery.p50_ms:.1f} ms, p99 "
            f"{delivery.p99_ms:.1f} ms, server {report.server_cpu_us_per_msg:.0f} us/msg, "
            f"client {loadgen_pct:.0f}% cpu, others {foreign:.0f}% cpu -> {verdict}"
        )
    return IndependentReport(
        params=params,
        client="websockets asyncio client on uvloop, one connection per "
        "person, a sleep loop per sender",
        points=reports,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen.independent",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--secret", default="0" * 32)
    parser.add_argument("--tag", default=f"ind{random.randrange(16**6):06x}")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--rate", type=float, default=PERSON_RATE)
    parser.add_argument("--duration-s", type=float, default=DURATION_S)
    parser.add_argument("--drain-s", type=float, default=DRAIN_S)
    args = parser.parse_args(argv)
    if not args.url.startswith(("ws://127.0.0.1", "ws://localhost", "ws://[::1]")):
        parser.error("the load generator only targets this host (127.0.0.1)")
    result = uvloop.run(
        _client(
            args.url,
            args.secret.encode(),
            args.tag,
            args.pairs,
            args.rate,
            args.duration_s,
            args.drain_s,
        )
    )
    sys.stdout.write(json.dumps(msgspec.to_builtins(result)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
