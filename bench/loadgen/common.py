"""Pieces shared by the scenarios: identities, pair setup, bounded gathering, CPU clocks.

A *pair* is the unit of 1:1 traffic, set up exactly as imserver's contract
says: the customer (role customer, shop "") sends ``OpenConversation(shop)``
and gets the conversation id; the agent of that shop claims it with
``UpdateConversation(state=assigned, agent=<agent>)``. User ids carry a
per-run tag so that runs never collide, and shops are spread over
``SHOPS`` tenants. Identities are the same for every target.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import resource
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, NamedTuple, TypeVar

from protocol import (
    ConversationInfo,
    ConvState,
    OpenConversation,
    Role,
    UpdateConversation,
)

from .client import Handler, Identity, ImClient

SHOPS: Final = 10
"""Tenants the pairs are spread over."""
SETUP_CONCURRENCY: Final = 64
"""Connections or setup requests under way at once per worker."""
MAX_PERSON_RATE: Final = 45.0
"""Highest frames/s a scenario may ask of one customer or agent connection:
imserver limits people to 50 frames/s sustained (200 burst)."""

TIMER_RESOLUTION_NS: Final = 1_000_000
"""uvloop's (libuv's) timers count whole milliseconds: a shorter ``sleep`` is a
0 ms timer. A pacer that slept until each next due time therefore spun
between sends (measured: 430,000 wake-ups/s at 98 % CPU), and every step
above ~8,000 msg/s looked generator-bound when it was not."""

T = TypeVar("T")


SENDS_BETWEEN_YIELDS: Final = 64
"""Sends a late pacer makes before it lets the readers run."""

PacedSend = Callable[[int, int, int], object]
"""(stream index, due time ns, now ns) -> anything: one due send."""


async def pace(
    count: int, interval_ns: int, start_ns: int, stop_ns: int, rng: random.Random, send: PacedSend
) -> None:
    """Open-loop pacing of ``count`` streams, each due every ``interval_ns``
    from a random phase after ``start_ns``, until ``stop_ns``: ``send`` is
    called for each due send, in due order, at once (never awaited), so a slow
    connection delays nobody. The wait for the next due send is at least one
    timer tick: the sends due within a millisecond go out together (their
    lateness is the caller's send lag, and is charged to latency, since
    payloads carry the due time)."""
    heap = [(start_ns + rng.randrange(interval_ns), i) for i in range(count)]
    heapq.heapify(heap)
    monotonic_ns = time.monotonic_ns
    burst = 0
    while heap:
        due, i = heap[0]
        if due >= stop_ns:
            return
        now = monotonic_ns()
        if due > now:
            burst = 0
            await asyncio.sleep(max(due - now, TIMER_RESOLUTION_NS) / 1e9)
            continue
        heapq.heapreplace(heap, (due + interval_ns, i))
        send(i, due, now)
        burst += 1
        if burst >= SENDS_BETWEEN_YIELDS:
            burst = 0
            await asyncio.sleep(0)


def customer(tag: str, index: int) -> Identity:
    user = f"{tag}-c{index}"
    return Identity(user=user, role=Role.CUSTOMER, shop="", device=f"{user}-d")


def agent(tag: str, index: int, shops: int = SHOPS) -> Identity:
    user = f"{tag}-a{index}"
    return Identity(
        user=user, role=Role.AGENT, shop=f"{tag}-shop{index % shops}", device=f"{user}-d"
    )


def member(tag: str, index: int) -> Identity:
    user = f"{tag}-m{index}"
    return Identity(user=user, role=Role.CUSTOMER, shop="", device=f"{user}-d")


class Pair(NamedTuple):
    number: int
    customer: ImClient
    agent: ImClient
    conv: str


async def open_pair(url: str, secret: bytes, tag: str, index: int, handler: Handler) -> Pair:
    """Connect a customer and an agent and put them in one assigned conversation."""
    cust = ImClient(url, customer(tag, index), secret, handler)
    agnt = ImClient(url, agent(tag, index), secret, handler)
    await asyncio.gather(cust.connect(), agnt.connect())
    shop = agnt.identity.shop
    info = await cust.request(lambda rid: OpenConversation(id=rid, shop=shop))
    if not isinstance(info, ConversationInfo):
        raise RuntimeError(f"open: expected ConversationInfo, got {info!r}")
    conv = info.conversation.id
    await agnt.request(
        lambda rid: UpdateConversation(id=rid, conv=conv, state=ConvState.ASSIGNED, agent=agnt.user)
    )
    return Pair(index, cust, agnt, conv)


async def gather_bounded(
    factories: Iterable[Callable[[], Awaitable[T]]], limit: int = SETUP_CONCURRENCY
) -> tuple[list[T], list[str]]:
    """Run the coroutines, at most ``limit`` at once; (results, error texts)."""
    semaphore = asyncio.Semaphore(limit)
    results: list[T] = []
    errors: list[str] = []

    async def one(factory: Callable[[], Awaitable[T]]) -> None:
        async with semaphore:
            try:
                results.append(await factory())
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one(f) for f in factories))
    return results, errors


async def close_all(clients: Iterable[ImClient]) -> None:
    """Drop every connection at once (no close handshakes: fast teardown)."""
    for client in clients:
        client.abort()
    await asyncio.sleep(0)


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def share(total: int, index: int, count: int) -> range:
    """The items of ``range(total)`` a worker takes: every count-th from index."""
    return range(index, total, count)
