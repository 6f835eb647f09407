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
import resource
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


async def sleep_until_due(due_ns: int, now_ns: int) -> None:
    """A pacer's wait for its next due send: at least one timer tick, so the
    sends due within a millisecond go out together (their lateness is recorded
    as send lag, and charged to the latency, since payloads carry the due time)."""
    await asyncio.sleep(max(due_ns - now_ns, TIMER_RESOLUTION_NS) / 1e9)


def customer(tag: str, index: int) -> Identity:
    user = f"{tag}-c{index}"
    return Identity(user=user, role=Role.CUSTOMER, shop="", device=f"{user}-d")


def agent(tag: str, index: int, shops: int = SHOPS) -> Identity:
    user = f"{tag}-a{index}"
    return Identity(user=user, role=Role.AGENT, shop=f"{tag}-shop{index % shops}", device=f"{user}-d")


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
    await agnt.request(lambda rid: UpdateConversation(
        id=rid, conv=conv, state=ConvState.ASSIGNED, agent=agnt.user))
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
