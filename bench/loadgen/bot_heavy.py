"""Scenario 5, bot-heavy: customers asking the bot; ~80 % answered by it, ~20 % handed to humans.

Theory of operation
-------------------
Target: imserver run with its bot worker (``serve --workers bot``: ``bench.servers.BOT_VARIANTS``)
on a data directory whose CRM database (``DATA/workers/crm/crm.db``) ``seed_crm`` filled
before the server started: one in-transit order (with carrier and tracking number) for each
customer and each shop the customer will talk to. The bot uses its default knowledge base,
``workers/bot/examples/kb.yaml``. The bare-relay baselines have no bot: n/a for them.

Setup: every load worker connects its share of the ``customers``; each customer opens a
conversation with its first shop (``OpenConversation``: state ``bot``) and waits for the
bot's welcome.

Run: from a common instant every customer asks ``rate`` questions/s for ``duration_s``
seconds, open loop (fixed interval, random phase, one scheduler per load worker, as in
peak-sale). Every ``human_every``-th question of a customer (20 % at 5; the position is
staggered between customers) needs a person (``HUMAN``: "转人工", "我要投诉"...); the others
are routine questions (``ROUTINE``) that the example knowledge base answers with confidence
1.0 (checked against the engine: order status with the customer's order id, parcel tracking,
shipping time, courier, returns, sizes, coupons; Chinese and English), each with a fragment
that its right answer contains (the order id, the seeded tracking number, a phrase of the KB
answer).

Matching replies to questions: the bot handles one conversation's events in order and
answers every routine or handoff question with exactly one text message, so the n-th bot
text in a conversation (``TextBody`` or ``QuickRepliesBody`` from a ``worker`` sender; the
``SystemBody`` the state change writes does not count) after the welcome answers its n-th
question. Nothing needs to be carried in the question's text (which would disturb the
matcher: six digits read as an order id). The reply latency is from the question's
*intended* send time (a late scheduler is charged) to that reply: what the buyer waits.

* A routine question is *answered by the bot* if its reply contains the expected fragments;
  otherwise it is *wrong* (a handoff, another answer, "order not found").
* A human question is *handed off* once the customer gets the ``ConversationEvent`` with
  state ``queued`` (send -> queued is reported too; the bot's "transferring you" text
  comes first and is the reply).

After a handoff the conversation belongs to the queue and the bot stays quiet there, so the
customer asks nothing more in it: once the handoff reply and the queued event are both in,
it opens a conversation with its next shop and waits for the welcome (open -> welcome is
the *welcome* latency). Questions falling due meanwhile wait and are sent when the welcome
arrives, with that instant as their intended time (the customer's own conversation switch
is not charged to the bot; they are counted as ``deferred``). A conversation that goes to
the queue after a routine question (the bot did not answer it) is switched away from the
same way, counting ``unexpected_handoffs``.

After ``duration_s`` the run waits up to ``drain_s`` for outstanding replies; questions
without one by then are *unanswered*. The coordinator reads the CPU of the server process
and of its children (the bot worker) around the run. The verdict is about completeness
(every question answered as expected, every handoff queued, no errors), not latency.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, NamedTuple

import msgspec

from protocol import (
    ConversationEvent,
    ConversationInfo,
    ConvState,
    Error,
    Message,
    OpenConversation,
    QuickRepliesBody,
    Role,
    Send,
    Sent,
    ServerFrameType,
    TextBody,
    encode,
)

from .client import ImClient
from .common import (
    MAX_PERSON_RATE,
    close_all,
    customer,
    gather_bounded,
    pace,
    process_cpu_s,
)
from .histogram import EncodedHistogram, LatencyHistogram, LatencySummary
from .pool import WorkerPool, sleep_until, start_at
from .sysstat import HostCpu, ServerProbe, foreign_cpu_pct

DEFAULT_CUSTOMERS: Final = 400
DEFAULT_RATE: Final = 0.5
"""Questions/s per customer (one every 2 s: a busy chat, not a bot-hammering script)."""
DEFAULT_DURATION_S: Final = 10.0
DEFAULT_DRAIN_S: Final = 5.0
DEFAULT_SHOPS: Final = 10
"""Shops each customer can talk to: one conversation per shop, a new one after each handoff."""
DEFAULT_HUMAN_EVERY: Final = 5
"""Every 5th question of a customer needs a person: 20 %."""
SETUP_TIMEOUT_S: Final = 180.0
RUN_TIMEOUT_MARGIN_S: Final = 60.0
DRAIN_POLL_S: Final = 0.02
WELCOME_TIMEOUT_S: Final = 30.0
"""Setup: open -> welcome for every customer."""
GENERATOR_BOUND_PCT: Final = 90.0
NOISY_FOREIGN_PCT: Final = 20.0
SAMPLES: Final = 3
"""Unexpected reply texts kept for the report."""
SAMPLE_CHARS: Final = 160

CRM_DB: Final = Path("workers") / "crm" / "crm.db"
"""Where the bot worker reads orders, relative to the server's data directory."""
ORDER_BASE: Final = 3_100_000_000
"""Order ids are 10-digit numbers: ORDER_BASE + customer * 1000 + shop."""
ORDER_TITLE: Final = "碎花连衣裙"
CARRIER: Final = "中通快递"


class Question(NamedTuple):
    text: str
    expect: tuple[str, ...]
    """Fragments the right answer contains; ``{order}`` and ``{tracking}`` are filled in."""


ROUTINE: Final = (
    Question("where is my order {order}?", ("{order}", "in transit")),
    Question("帮我查下订单{order}", ("{order}", "运输中")),
    Question("订单{order}到哪一步了", ("{order}", "运输中")),
    Question("我的快递到哪了", ("{tracking}",)),
    Question("查物流", ("{tracking}",)),
    Question("where is my parcel", ("{tracking}",)),
    Question("什么时候发货", ("48小时内发货",)),
    Question("when will you ship", ("48 hours",)),
    Question("发什么快递", ("中通或韵达",)),
    Question("怎么退货", ("7天无理由",)),
    Question("return policy", ("within 7 days",)),
    Question("退货运费谁出", ("运费险",)),
    Question("尺码怎么选", ("尺码表",)),
    Question("what size should i get", ("size chart",)),
    Question("有优惠券吗", ("优惠券",)),
    Question("do you have coupons", ("coupon",)),
)
"""Routine questions of the example KB (workers/bot/examples/kb.yaml), all answered with
confidence 1.0; order and parcel questions are answered from the seeded CRM order (the
status, or the tracking number, tells a real answer from "no such order")."""
HUMAN: Final = ("转人工", "我要投诉", "talk to a human", "我要找你们老板")
"""Requests for a person (lexicon: human, complaint; KB entry of intent human)."""


class BotHeavyParams(msgspec.Struct, frozen=True, kw_only=True):
    customers: int = DEFAULT_CUSTOMERS
    rate: float = DEFAULT_RATE
    duration_s: float = DEFAULT_DURATION_S
    drain_s: float = DEFAULT_DRAIN_S
    shops: int = DEFAULT_SHOPS
    human_every: int = DEFAULT_HUMAN_EVERY

    @property
    def questions_per_customer(self) -> int:
        """At most this many questions fall due per customer."""
        return math.ceil(self.rate * self.duration_s)

    @property
    def sessions(self) -> int:
        """Conversations a customer may need: one more after each handoff."""
        return math.ceil(self.questions_per_customer / self.human_every) + 1

    def validate(self) -> None:
        if self.customers < 1:
            raise ValueError("at least one customer")
        if not 0 < self.rate <= MAX_PERSON_RATE / 2:
            raise ValueError(
                f"rate {self.rate}/s per customer is out of (0, {MAX_PERSON_RATE / 2:.0f}]"
            )
        if self.human_every < 2:
            raise ValueError("human_every must be at least 2")
        if self.sessions > self.shops:
            raise ValueError(
                f"{self.questions_per_customer} questions per customer need "
                f"{self.sessions} conversations (one per handoff): add shops"
            )


# ------------------------------------------------------------ identities and CRM data


def shop_index(params: BotHeavyParams, number: int, session: int) -> int:
    return (number + session) % params.shops


def shop_name(tag: str, index: int) -> str:
    return f"{tag}-bshop{index}"


def order_id(number: int, shop: int) -> str:
    return str(ORDER_BASE + number * 1000 + shop)


def tracking_no(order: str) -> str:
    return f"ZT{order}"


def seed_crm(data_dir: Path, params: BotHeavyParams, tag: str) -> int:
    """Write the customers and their orders into ``DATA/workers/crm/crm.db`` (before the server
    starts, or into a running server's database); returns the number of orders."""
    from workers.crm.models import Order, OrderItem
    from workers.crm.repository import CrmRepository

    path = data_dir / CRM_DB
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    orders = []
    with CrmRepository(path) as repo:
        for number in range(params.customers):
            user = customer(tag, number).user
            repo.upsert_customer(user)
            for session in range(params.sessions):
                shop = shop_index(params, number, session)
                oid = order_id(number, shop)
                orders.append(
                    Order(
                        shop=shop_name(tag, shop),
                        order_id=oid,
                        customer=user,
                        channel="taobao",
                        status="in_transit",
                        amount_cents=19_900,
                        items=(OrderItem(title=ORDER_TITLE),),
                        carrier=CARRIER,
                        tracking_no=tracking_no(oid),
                        eta=(now + timedelta(days=2)).date(),
                        created_at=now - timedelta(days=1),
                        updated_at=now,
                    )
                )
        repo.upsert_orders(orders)
    return len(orders)


# ---------------------------------------------------------------- commands


class Setup(msgspec.Struct, frozen=True):
    pass


class SetupDone(msgspec.Struct, frozen=True):
    customers: int
    ready: int
    errors: list[str]


class Go(msgspec.Struct, frozen=True):
    start_ns: int
    stop_ns: int
    drain_s: float


class GoResult(msgspec.Struct, frozen=True, kw_only=True):
    counts: dict[str, int]
    """routine, human, unsent, deferred, not_asked, acked, answered, wrong, handoff_replies,
    handed_off, unexpected_handoffs, unanswered_routine, unanswered_human, not_queued,
    unexpected_replies, stray_replies, sessions_opened, open_failures (absent: 0)."""
    errors: dict[str, int]
    wrong_samples: list[str]
    reply: EncodedHistogram
    reply_routine: EncodedHistogram
    reply_handoff: EncodedHistogram
    queued: EncodedHistogram
    welcome: EncodedHistogram
    lag: EncodedHistogram
    cpu_s: float
    wall_s: float


# ------------------------------------------------------------------ worker


class _Question:
    __slots__ = ("expect", "human", "intended_ns", "queued", "replied")

    def __init__(self, human: bool, expect: tuple[str, ...], intended_ns: int) -> None:
        self.human = human
        self.expect = expect
        self.intended_ns = intended_ns
        self.replied = False
        self.queued = False


_OPEN: Final = "open"
"""Marks an OpenConversation in a customer's table of requests in flight."""


class _Customer:
    __slots__ = (
        "asked",
        "backlog",
        "client",
        "conv",
        "early",
        "handoff",
        "inflight",
        "number",
        "open_ns",
        "pending",
        "ready",
        "ready_ns",
        "retired",
        "rng",
        "session",
        "welcomed",
    )

    def __init__(self, client: ImClient, number: int) -> None:
        self.client = client
        self.number = number
        self.rng = random.Random(number * 1_000_003 + 7)
        self.session = -1
        self.conv: str | None = None
        self.open_ns = 0
        self.welcomed = False
        self.early: tuple[str, int] | None = None
        """A welcome that overtook the open's reply: (conversation, receive time)."""
        self.ready = False
        self.ready_ns = 0
        self.retired = False
        self.asked = 0
        self.backlog: deque[int] = deque()
        self.pending: deque[_Question] = deque()
        self.handoff: _Question | None = None
        self.inflight: dict[int, _Question | str] = {}


class BotHeavyWorker:
    def __init__(
        self, params: BotHeavyParams, url: str, secret: bytes, tag: str, index: int, count: int
    ) -> None:
        self.params, self.url, self.secret, self.tag = params, url, secret, tag
        self.index, self.count = index, count
        self.customers: list[_Customer] = []
        self.by_client: dict[ImClient, _Customer] = {}
        self.recording = False
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.wrong_samples: list[str] = []
        self.reply = LatencyHistogram()
        self.reply_routine = LatencyHistogram()
        self.reply_handoff = LatencyHistogram()
        self.queued = LatencyHistogram()
        self.welcome = LatencyHistogram()
        self.lag = LatencyHistogram()

    async def handle(self, command: object) -> object:
        if isinstance(command, Setup):
            return await self._setup()
        if isinstance(command, Go):
            return await self._go(command)
        raise TypeError(f"unexpected command {command!r}")

    async def close(self) -> None:
        await close_all(c.client for c in self.customers)

    # -- handler interface (called by the clients' reader tasks)

    def on_message(self, client: ImClient, message: Message, now_ns: int) -> None:
        cust = self.by_client.get(client)
        body = message.body
        if (
            cust is None
            or message.sender_role is not Role.WORKER
            or not isinstance(body, TextBody | QuickRepliesBody)
        ):
            return
        if message.conv != cust.conv:
            if cust.conv is None and not cust.welcomed:
                cust.early = (message.conv, now_ns)
            else:
                self.counts["stray_replies"] += 1  # late, in a conversation left behind
            return
        if not cust.welcomed:
            self._welcomed(cust, now_ns)
            return
        if not cust.pending:
            self.counts["unexpected_replies"] += 1
            self._sample(f"unasked: {body.text}")
            return
        question = cust.pending.popleft()
        question.replied = True
        latency = now_ns - question.intended_ns
        self.reply.record_ns(latency)
        if question.human:
            self.counts["handoff_replies"] += 1
            self.reply_handoff.record_ns(latency)
            self._maybe_switch(cust, now_ns)
            return
        self.reply_routine.record_ns(latency)
        if all(fragment in body.text for fragment in question.expect):
            self.counts["answered"] += 1
        else:
            self.counts["wrong"] += 1
            self._sample(f"expected {' + '.join(question.expect)}: {body.text}")

    def on_event(self, client: ImClient, frame: ServerFrameType, now_ns: int) -> None:
        cust = self.by_client.get(client)
        if (
            cust is None
            or type(frame) is not ConversationEvent
            or frame.conversation.id != cust.conv
            or frame.conversation.state is not ConvState.QUEUED
        ):
            return
        handoff = cust.handoff
        if handoff is not None:
            if not handoff.queued:
                handoff.queued = True
                self.counts["handed_off"] += 1
                self.queued.record_ns(now_ns - handoff.intended_ns)
                self._maybe_switch(cust, now_ns)
        elif not cust.retired:
            # The bot handed a routine question off: this conversation is the queue's now.
            self.counts["unexpected_handoffs"] += 1
            self._switch(cust, now_ns)

    def on_reply(self, client: ImClient, frame: ServerFrameType, now_ns: int) -> None:
        cust = self.by_client.get(client)
        if cust is None:
            return
        entry = cust.inflight.pop(getattr(frame, "id", -1), None)
        if entry is None:
            return
        if isinstance(entry, str):  # the OpenConversation of a new session
            if type(frame) is ConversationInfo:
                cust.conv = frame.conversation.id
                early = cust.early
                cust.early = None
                if early is not None and early[0] == cust.conv:
                    self._welcomed(cust, early[1])
            else:
                code = frame.code if isinstance(frame, Error) else type(frame).__name__
                self.errors[f"open:{code}"] += 1
                self.counts["open_failures"] += 1
                cust.retired = True
            return
        if type(frame) is Sent:
            self.counts["acked"] += 1
        elif isinstance(frame, Error):
            self.errors[frame.code] += 1
            if entry in cust.pending:  # refused: no reply will come for it
                cust.pending.remove(entry)
            if entry is cust.handoff:
                cust.handoff = None
                self._ready(cust, now_ns)

    # -- customer life cycle

    def _open(self, cust: _Customer) -> None:
        """Start the customer's next conversation (next shop); questions wait for the welcome."""
        cust.session += 1
        if cust.session >= self.params.sessions:
            cust.retired = True
            return
        cust.conv, cust.welcomed, cust.ready, cust.handoff, cust.early = (
            None,
            False,
            False,
            None,
            None,
        )
        shop = shop_name(self.tag, shop_index(self.params, cust.number, cust.session))
        cust.open_ns = time.monotonic_ns()
        request_id = cust.client.send_request(lambda rid: OpenConversation(id=rid, shop=shop))
        if request_id is None:
            self.counts["open_failures"] += 1
            cust.retired = True
            return
        cust.inflight[request_id] = _OPEN
        if self.recording:
            self.counts["sessions_opened"] += 1

    def _welcomed(self, cust: _Customer, now_ns: int) -> None:
        cust.welcomed = True
        if self.recording:
            self.welcome.record_ns(now_ns - cust.open_ns)
        self._ready(cust, now_ns)

    def _ready(self, cust: _Customer, now_ns: int) -> None:
        cust.ready = True
        cust.ready_ns = now_ns
        self._pump(cust)

    def _maybe_switch(self, cust: _Customer, now_ns: int) -> None:
        handoff = cust.handoff
        if handoff is not None and handoff.replied and handoff.queued:
            self._switch(cust, now_ns)

    def _switch(self, cust: _Customer, now_ns: int) -> None:
        for question in cust.pending:  # no reply will come in a queued conversation
            self.counts["unanswered_human" if question.human else "unanswered_routine"] += 1
            question.replied = True
        cust.pending.clear()
        self._open(cust)

    def _pump(self, cust: _Customer) -> None:
        """Ask the questions that fell due while the customer could not ask."""
        while cust.ready and cust.backlog:
            due = cust.backlog.popleft()
            if cust.ready_ns > due:
                self.counts["deferred"] += 1
            self._ask(cust, max(due, cust.ready_ns))

    def _ask(self, cust: _Customer, intended_ns: int) -> None:
        p = self.params
        conv = cust.conv
        assert conv is not None
        human = (cust.asked + cust.number) % p.human_every == p.human_every - 1
        cust.asked += 1
        expect: tuple[str, ...] = ()
        if human:
            text = cust.rng.choice(HUMAN)
        else:
            shop = shop_index(p, cust.number, cust.session)
            order = order_id(cust.number, shop)
            question = cust.rng.choice(ROUTINE)
            text = question.text.format(order=order)
            expect = tuple(
                f.format(order=order, tracking=tracking_no(order)) for f in question.expect
            )
        client = cust.client
        request_id = client.next_id()
        data = encode(
            Send(
                id=request_id,
                conv=conv,
                cmid=f"{client.user}-q{cust.asked}",
                body=TextBody(text=text),
            )
        )
        if not client.write(data):
            self.counts["unsent"] += 1
            return
        entry = _Question(human, expect, intended_ns)
        cust.inflight[request_id] = entry
        cust.pending.append(entry)
        self.counts["human" if human else "routine"] += 1
        if human:
            cust.handoff = entry
            cust.ready = False

    def _sample(self, text: str) -> None:
        if len(self.wrong_samples) < SAMPLES:
            self.wrong_samples.append(text.replace("\n", " ")[:SAMPLE_CHARS])

    # -- phases

    async def _connect(self, number: int) -> _Customer:
        client = ImClient(
            self.url, customer(self.tag, number), self.secret, self, on_event=self.on_event
        )
        await client.connect()
        return _Customer(client, number)

    async def _setup(self) -> SetupDone:
        found, errors = await gather_bounded(
            functools.partial(self._connect, i)
            for i in range(self.index, self.params.customers, self.count)
        )
        self.customers = sorted(found, key=lambda c: c.number)
        for cust in self.customers:
            self.by_client[cust.client] = cust
            self._open(cust)
            await asyncio.sleep(0)
        deadline = time.monotonic() + WELCOME_TIMEOUT_S
        while time.monotonic() < deadline:
            if all(c.welcomed or c.retired for c in self.customers):
                break
            await asyncio.sleep(DRAIN_POLL_S)
        ready = sum(1 for c in self.customers if c.welcomed)
        if ready < len(self.customers):
            errors.append(
                f"{len(self.customers) - ready} customers got no welcome within "
                f"{WELCOME_TIMEOUT_S:.0f} s"
            )
        errors += [f"{code} x{n}" for code, n in self.errors.items()]
        self.errors.clear()
        self.counts.clear()
        return SetupDone(customers=len(self.customers), ready=ready, errors=errors[:5])

    async def _drive(self, start_ns: int, stop_ns: int) -> None:
        customers = [c for c in self.customers if c.welcomed]
        if not customers:
            return

        def ask(i: int, due: int, now: int) -> None:
            self.lag.record_ns(now - due)
            cust = customers[i]
            if cust.retired:
                self.counts["not_asked"] += 1
                return
            cust.backlog.append(due)
            self._pump(cust)

        await pace(
            len(customers),
            int(1e9 / self.params.rate),
            start_ns,
            stop_ns,
            random.Random(self.index),
            ask,
        )

    def _settled(self) -> bool:
        return all(
            c.retired or (c.welcomed and not c.pending and not c.backlog and c.handoff is None)
            for c in self.customers
        )

    async def _go(self, cmd: Go) -> GoResult:
        await sleep_until(cmd.start_ns)
        self.recording = True
        cpu0, wall0 = process_cpu_s(), time.monotonic()
        await self._drive(cmd.start_ns, cmd.stop_ns)
        deadline = cmd.stop_ns + int(cmd.drain_s * 1e9)
        while time.monotonic_ns() < deadline:
            if self._settled():
                break
            await asyncio.sleep(DRAIN_POLL_S)
        cpu = process_cpu_s() - cpu0
        self.recording = False
        counts = self.counts
        for cust in self.customers:
            for question in cust.pending:
                counts["unanswered_human" if question.human else "unanswered_routine"] += 1
            handoff = cust.handoff
            if handoff is not None and handoff.replied and not handoff.queued:
                counts["not_queued"] += 1
            counts["not_asked"] += len(cust.backlog)
        return GoResult(
            counts=dict(counts),
            errors=dict(self.errors),
            wrong_samples=self.wrong_samples,
            reply=self.reply.encode(),
            reply_routine=self.reply_routine.encode(),
            reply_handoff=self.reply_handoff.encode(),
            queued=self.queued.encode(),
            welcome=self.welcome.encode(),
            lag=self.lag.encode(),
            cpu_s=cpu,
            wall_s=time.monotonic() - wall0,
        )


# ------------------------------------------------------------- coordinator


class BotHeavyReport(msgspec.Struct, frozen=True, kw_only=True, tag="bot_heavy"):
    params: BotHeavyParams
    workers: int
    customers_connected: int
    customers_ready: int
    """Customers who got the welcome of their first conversation during setup."""
    setup_s: float
    setup_errors: list[str]
    offered_questions_per_s: float
    questions: int
    routine: int
    human: int
    unsent: int
    deferred: int
    """Questions that fell due while their customer was switching conversations (after a
    handoff); sent when the new welcome arrived, latency counted from then."""
    not_asked: int
    """Questions that fell due but were never sent: the customer's next conversation had no
    welcome by the end of the drain, or the customer had used up its conversations."""
    acked: int
    errors: dict[str, int]
    answered_by_bot: int
    """Routine questions whose reply was the expected answer."""
    wrong_answers: int
    wrong_samples: list[str]
    handoff_replies: int
    handed_off: int
    """Human questions whose conversation went to the queue."""
    unexpected_handoffs: int
    unanswered: int
    not_queued: int
    unexpected_replies: int
    """Bot texts with no question waiting for them (the bot answered more than asked)."""
    stray_replies: int
    """Bot texts that arrived in a conversation the customer had already left."""
    sessions_opened: int
    open_failures: int
    bot_answered_share: float
    """answered_by_bot / questions (about 1 - 1/human_every when all is well)."""
    handed_off_share: float
    reply: LatencySummary
    """Every question: intended send -> the bot's reply (MessageEvent) to it."""
    reply_routine: LatencySummary
    reply_handoff: LatencySummary
    queued: LatencySummary
    """Human questions: intended send -> ConversationEvent state queued."""
    welcome: LatencySummary
    """Conversations opened during the run: OpenConversation -> the bot's welcome."""
    send_lag: LatencySummary
    server_cpu_s: float
    worker_cpu_s: float
    """CPU of the server's child processes: the bot worker."""
    server_cpu_us_per_question: float
    worker_cpu_us_per_question: float
    loadgen_cpu_pct: float
    generator_bound: bool
    foreign_cpu_pct: float
    steal_pct: float
    passed: bool
    verdict: str


def _judge(c: Counter[str], errors: dict[str, int], questions: int) -> list[str]:
    problems = []
    if questions == 0:
        problems.append("no questions asked")
    unanswered = c["unanswered_routine"] + c["unanswered_human"]
    if unanswered:
        problems.append(f"{unanswered} unanswered")
    if c["wrong"]:
        problems.append(f"{c['wrong']} wrong answers")
    if c["human"] > c["handed_off"]:
        problems.append(f"{c['human'] - c['handed_off']} handoffs not queued")
    for key, what in (
        ("unexpected_handoffs", "unexpected handoffs"),
        ("unexpected_replies", "unexpected replies"),
        ("unsent", "not sent (connection closed)"),
        (
            "not_asked",
            "not asked (no welcome in the customer's next "
            "conversation by the end, or out of conversations)",
        ),
        ("open_failures", "conversations not opened"),
    ):
        if c[key]:
            problems.append(f"{c[key]} {what}")
    if c["acked"] < questions:
        problems.append(f"{questions - c['acked']} unacked")
    if errors:
        problems.append("errors " + ", ".join(f"{k}={v}" for k, v in sorted(errors.items())))
    return problems


def _summary(results: list[GoResult], field: str) -> LatencySummary:
    return LatencyHistogram.merged([getattr(r, field) for r in results]).summary()


def run(
    params: BotHeavyParams,
    url: str,
    secret: bytes,
    tag: str,
    probe: ServerProbe,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> BotHeavyReport:
    params.validate()

    def factory(index: int, count: int) -> BotHeavyWorker:
        return BotHeavyWorker(params, url, secret, tag, index, count)

    with WorkerPool(factory, workers) as pool:
        t0 = time.monotonic()
        done = [r for r in pool.call(Setup(), SETUP_TIMEOUT_S) if isinstance(r, SetupDone)]
        setup_s = time.monotonic() - t0
        connected = sum(d.customers for d in done)
        ready = sum(d.ready for d in done)
        setup_errors = [e for d in done for e in d.errors]
        log(
            f"  bot-heavy: {connected}/{params.customers} customers connected, {ready} welcomed "
            f"by the bot in {setup_s:.1f} s" + (f" ({setup_errors[0]})" if setup_errors else "")
        )
        start = start_at()
        stop = start + int(params.duration_s * 1e9)
        (server0, worker0), host0, wall0 = probe.cpu_split_s(), HostCpu.sample(), time.monotonic()
        timeout = params.duration_s + params.drain_s + RUN_TIMEOUT_MARGIN_S
        results = [
            r
            for r in pool.call(Go(start, stop, params.drain_s), timeout)
            if isinstance(r, GoResult)
        ]
        server1, worker1 = probe.cpu_split_s()
        host1 = HostCpu.sample()
        wall = time.monotonic() - wall0
    server_cpu, worker_cpu = server1 - server0, worker1 - worker0
    steal = host1.steal_pct_since(host0)
    foreign = foreign_cpu_pct(
        host0, host1, server_cpu + worker_cpu + sum(r.cpu_s for r in results), wall
    )
    c: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for r in results:
        c.update(r.counts)
        errors.update(r.errors)
    questions = c["routine"] + c["human"]
    loadgen_pct = max((100 * r.cpu_s / r.wall_s for r in results if r.wall_s > 0), default=0.0)
    problems = _judge(c, dict(errors), questions)
    verdict = "; ".join(problems) or "ok"
    if loadgen_pct >= GENERATOR_BOUND_PCT:
        verdict += f" (generator-bound: load worker at {loadgen_pct:.0f}% cpu)"
    if foreign >= NOISY_FOREIGN_PCT:
        verdict += f" (noisy: other processes used {foreign:.0f}% cpu)"
    reply = _summary(results, "reply")

    def per_question(cpu_s: float) -> float:
        return round(1e6 * cpu_s / questions, 1) if questions else 0.0

    report = BotHeavyReport(
        params=params,
        workers=workers,
        customers_connected=connected,
        customers_ready=ready,
        setup_s=round(setup_s, 2),
        setup_errors=setup_errors,
        offered_questions_per_s=round(ready * params.rate, 1),
        questions=questions,
        routine=c["routine"],
        human=c["human"],
        unsent=c["unsent"],
        deferred=c["deferred"],
        not_asked=c["not_asked"],
        acked=c["acked"],
        errors=dict(errors),
        answered_by_bot=c["answered"],
        wrong_answers=c["wrong"],
        wrong_samples=[s for r in results for s in r.wrong_samples][:SAMPLES],
        handoff_replies=c["handoff_replies"],
        handed_off=c["handed_off"],
        unexpected_handoffs=c["unexpected_handoffs"],
        unanswered=c["unanswered_routine"] + c["unanswered_human"],
        not_queued=c["not_queued"],
        unexpected_replies=c["unexpected_replies"],
        stray_replies=c["stray_replies"],
        sessions_opened=c["sessions_opened"],
        open_failures=c["open_failures"],
        bot_answered_share=round(c["answered"] / questions, 4) if questions else 0.0,
        handed_off_share=round(c["handed_off"] / questions, 4) if questions else 0.0,
        reply=reply,
        reply_routine=_summary(results, "reply_routine"),
        reply_handoff=_summary(results, "reply_handoff"),
        queued=_summary(results, "queued"),
        welcome=_summary(results, "welcome"),
        send_lag=_summary(results, "lag"),
        server_cpu_s=round(server_cpu, 3),
        worker_cpu_s=round(worker_cpu, 3),
        server_cpu_us_per_question=per_question(server_cpu),
        worker_cpu_us_per_question=per_question(worker_cpu),
        loadgen_cpu_pct=round(loadgen_pct, 1),
        generator_bound=loadgen_pct >= GENERATOR_BOUND_PCT,
        foreign_cpu_pct=foreign,
        steal_pct=steal,
        passed=not problems,
        verdict=verdict,
    )
    log(
        f"  bot-heavy: {questions} questions at {report.offered_questions_per_s:g}/s "
        f"({c['routine']} routine, {c['human']} for a human): {c['answered']} answered by the "
        f"bot ({100 * report.bot_answered_share:.0f}%), {c['handed_off']} handed off, "
        f"{report.unanswered} unanswered, {c['wrong']} wrong; reply p50 {reply.p50_ms:.1f} ms, "
        f"p90 {reply.p90_ms:.1f} ms, p99 {reply.p99_ms:.1f} ms, max {reply.max_ms:.0f} ms; "
        f"server {report.server_cpu_us_per_question:.0f} + bot worker "
        f"{report.worker_cpu_us_per_question:.0f} us/question, loadgen {loadgen_pct:.0f}% cpu, "
        f"others {foreign:.0f}% cpu -> {verdict}"
    )
    return report
