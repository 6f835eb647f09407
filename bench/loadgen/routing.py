"""Routing under a burst, with the routing worker killed half-way: time to assignment, 0 stranded.

Usage::

    python -m bench.loadgen.routing [--handoffs 2000] [--agents 50] [--max-chats 5]
                                    [--handle-s 0.5] [--json out.json]

Theory of operation
-------------------
The scenario starts its own ``imserver serve`` (port 0, a temporary data
directory, a random secret, the shop registered) and one ``imserver worker
routing`` process. It
opens ``handoffs`` buyer conversations of one shop beforehand (setup, not
measured), puts ``agents`` agents online (``max_chats`` each, the routing
default for agents it was not told about), and subscribes an observer to the
shop's ``conversations`` topic. Then the burst: a worker connection hands
every conversation off at once, the way the bot does (``state=queued``, the
bot's tags and priority; at most ``IN_FLIGHT`` requests outstanding). Each
agent closes a chat ``handle_s`` after it was assigned, so capacity frees at
about ``agents * max_chats / handle_s`` chats/s and most of the burst waits in
the queue.

When half of the conversations have been assigned, the routing process is
killed with SIGKILL and a new one is started at once (what the supervisor of
``serve --workers`` does, without its backoff); the new one waits out its
ownership settle time, reads the queue from the store and carries on.

Measured, in the load generator's clock: time to assignment per
conversation, from the moment its handoff request was sent to the first
``assigned`` event the observer saw (p50, p90, p99, max), split into the
conversations assigned before the kill and after it. Checked: every
conversation assigned (``stranded`` = not assigned by ``DEADLINE_S`` after the
burst), each exactly once (``double_assigned``), no agent ever above
``max_chats`` as the observer's ledger saw it (``max_load``). The report is
JSON on stdout (or ``--json``); bench/ROUTING.md has a recorded run.
"""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Final

import msgspec
import trio

from bench.loadgen.sysstat import HostCpu, ServerProbe, foreign_cpu_pct
from imserver.auth import mint_token
from imserver.client import Client, ServerError, connect
from protocol import (
    AgentStatus,
    ConversationEvent,
    ConvState,
    OpenConversation,
    SetAgentStatus,
    Subscribe,
    Topic,
    UpdateConversation,
)
from workers.handoff import HANDOFF_PRIORITY, HandoffReason, handoff_tags

SHOP: Final = "bench-shop"
IN_FLIGHT: Final = 200
"""Handoff requests outstanding at once (below the server's MAX_INFLIGHT_REQUESTS)."""
SETUP_CONCURRENCY: Final = 32
"""Buyers opening their conversation at once during setup."""
DEADLINE_S: Final = 180.0
"""After the burst, how long the scenario waits for the last assignment."""
STARTUP_TIMEOUT_S: Final = 60.0


class RoutingParams(msgspec.Struct, frozen=True, kw_only=True):
    handoffs: int = 2000
    agents: int = 50
    max_chats: int = 5
    handle_s: float = 0.5
    kill: bool = True
    """Kill routing half-way (``--no-kill``: the same burst undisturbed, for comparison)."""


class Latency(msgspec.Struct, frozen=True, kw_only=True):
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


class RoutingReport(msgspec.Struct, frozen=True, kw_only=True):
    params: RoutingParams
    burst_s: float
    """From the first handoff sent to the last handoff acknowledged."""
    all_assigned_s: float
    """From the first handoff sent to the last conversation assigned."""
    killed_at_assigned: int
    restart_s: float
    """From SIGKILL to the new routing process's first assignment."""
    time_to_assignment: Latency
    before_kill: Latency
    after_kill: Latency
    stranded: int
    double_assigned: int
    refused_closes: int
    """Agents' closes refused because the chat had left them (moved by mistake): 0."""
    max_load: int
    server_cpu_s: float
    """CPU of the server process tree (its store writer included) from the burst to the end."""
    routing_cpu_s: float
    """CPU of the routing processes (the killed one up to its kill, then the new one)."""
    generator_cpu_s: float
    """CPU of this load generator (50 agents, the observer, the stand-in bot)."""
    others_cpu_pct: float
    """CPU used by everything else on the host meanwhile, % of one core (shared host)."""
    cpu_count: int
    load_average: tuple[float, float, float]
    """The host's 1/5/15-minute load average at the end (the machine is shared)."""


def _latency(values_s: list[float]) -> Latency:
    if not values_s:
        return Latency(count=0, p50_ms=0.0, p90_ms=0.0, p99_ms=0.0, max_ms=0.0)
    ordered = sorted(values_s)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 1)

    return Latency(
        count=len(ordered),
        p50_ms=pct(0.50),
        p90_ms=pct(0.90),
        p99_ms=pct(0.99),
        max_ms=round(ordered[-1] * 1000, 1),
    )


async def _start(
    command: list[str], marker: bytes, nursery: trio.Nursery
) -> tuple[trio.Process, str]:
    """Start a process and wait for the stdout line containing ``marker``; the rest of
    its stdout is drained in the background (a full pipe must never block it)."""
    process: trio.Process = await nursery.start(
        functools.partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
    )
    assert process.stdout is not None
    stdout = process.stdout
    buffer = b""
    with trio.fail_after(STARTUP_TIMEOUT_S):
        while marker not in buffer:
            chunk = await stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"{command[3]} exited before {marker!r}")
            buffer += chunk

    async def drain() -> None:
        while await stdout.receive_some(65536):
            pass

    nursery.start_soon(drain)
    line = next(x for x in buffer.splitlines() if marker in x)
    return process, line.decode()


@asynccontextmanager
async def _clients(
    url: str, secret: bytes, names: list[tuple[str, str, str]]
) -> AsyncIterator[list[Client]]:
    async with AsyncExitStack() as stack:
        out = []
        for user, role, shop in names:
            token = mint_token(secret, user=user, role=role, shop=shop)
            out.append(await stack.enter_async_context(connect(url, token, device=f"{user}-d")))
        yield out


async def run(params: RoutingParams) -> RoutingReport:
    secret = secrets.token_hex(16).encode()
    with tempfile.TemporaryDirectory(prefix="imserver-routing-bench-") as tmp:
        data = Path(tmp) / "data"
        config = Path(tmp) / "workers.yaml"
        config.write_text(
            "routing:\n  sla_seconds: 3600\n  agent_grace_seconds: 3600\n"
            f"  default_skills: [pre-sale]\n  default_max_chats: {params.max_chats}\n",
            encoding="utf-8",
        )
        py = sys.executable
        server_cmd = [
            py,
            "-m",
            "imserver",
            "serve",
            "--data",
            str(data),
            "--port",
            "0",
            "--secret",
            secret.decode(),
            "--log-level",
            "warning",
            "--shops",
            SHOP,
        ]
        async with trio.open_nursery() as nursery:
            server, line = await _start(server_cmd, b"listening on", nursery)
            url = line.rsplit(" ", 1)[1].strip()
            worker_cmd = [
                py,
                "-m",
                "imserver",
                "worker",
                "routing",
                "--server",
                url,
                "--secret",
                secret.decode(),
                "--data",
                str(data),
                "--config",
                str(config),
                "--log-level",
                "warning",
            ]
            try:
                report = await _scenario(
                    params, url, secret, worker_cmd, nursery, ServerProbe(server.pid)
                )
            finally:
                server.send_signal(signal.SIGTERM)
                nursery.cancel_scope.cancel()
    return report


async def _scenario(
    params: RoutingParams,
    url: str,
    secret: bytes,
    worker_cmd: list[str],
    nursery: trio.Nursery,
    server: ServerProbe,
) -> RoutingReport:
    routing, _ = await _start(worker_cmd, b"joined as", nursery)
    # setup: every buyer opens their conversation (not measured)
    convs: list[str] = []
    gate = trio.Semaphore(SETUP_CONCURRENCY)

    async def open_one(i: int) -> None:
        async with gate:
            token = mint_token(secret, user=f"buyer{i}", role="customer", shop="")
            async with connect(url, token, device=f"b{i}") as buyer:
                info = await buyer.request(OpenConversation(id=0, shop=SHOP))
                convs.append(info.conversation.id)

    async with trio.open_nursery() as setup:
        for i in range(params.handoffs + 1):
            setup.start_soon(open_one, i)
    warm_up = convs.pop()  # handed off first, alone: routing is serving once it is assigned

    agent_names = [f"agent{i:03d}" for i in range(params.agents)]
    sent: dict[str, float] = {}
    assigned: dict[str, float] = {}
    assignments: dict[str, int] = {}
    holding: dict[str, set[str]] = {}
    max_load = 0
    done = trio.Event()
    half = trio.Event()
    warmed = trio.Event()
    pending = set(convs)
    restarted = trio.Event()
    first_after_restart: list[float] = []
    refused: list[str] = []

    async with _clients(
        url,
        secret,
        [("observer", "supervisor", SHOP), ("bot", "worker", "*")]
        + [(a, "agent", SHOP) for a in agent_names],
    ) as clients:
        observer, bot, agents = (
            clients[0],
            clients[1],
            dict(zip(agent_names, clients[2:], strict=True)),
        )
        await observer.request(Subscribe(id=0, topics=[Topic.CONVERSATIONS]))
        for agent in agents.values():
            await agent.request(SetAgentStatus(id=0, status=AgentStatus.ONLINE))

        async def work(name: str, client: Client) -> None:
            """The agent: close each chat ``handle_s`` after it arrived."""
            mine: set[str] = set()  # the assignment comes twice: as participant, with the note
            async with trio.open_nursery() as chats:
                async for frame in client.events:
                    if (
                        isinstance(frame, ConversationEvent)
                        and frame.change in ("assigned", "transferred")
                        and frame.conversation.agent == name
                        and frame.conversation.id not in mine
                    ):
                        mine.add(frame.conversation.id)
                        chats.start_soon(finish, client, frame.conversation.id)

        async def finish(client: Client, conv: str) -> None:
            await trio.sleep(params.handle_s)  # the agent's handle time (load shape)
            try:
                await client.request(UpdateConversation(id=0, conv=conv, state=ConvState.CLOSED))
            except ServerError as exc:  # the chat moved on meanwhile: counted, not fatal
                refused.append(f"{conv}: {exc}")

        async def observe() -> None:
            nonlocal max_load
            async for frame in observer.events:
                if not isinstance(frame, ConversationEvent):
                    continue
                conv = frame.conversation
                for chats in holding.values():
                    chats.discard(conv.id)
                if conv.state is ConvState.ASSIGNED and conv.agent:
                    holding.setdefault(conv.agent, set()).add(conv.id)
                    max_load = max(max_load, len(holding[conv.agent]))
                    if frame.change in ("assigned", "transferred"):
                        now = time.monotonic()
                        assignments[conv.id] = assignments.get(conv.id, 0) + 1
                        assigned.setdefault(conv.id, now)
                        if restarted.is_set() and not first_after_restart:
                            first_after_restart.append(now)
                        if conv.id == warm_up:
                            warmed.set()
                        pending.discard(conv.id)
                        if len(pending) <= params.handoffs // 2:
                            half.set()
                        if not pending:
                            done.set()

        tags = handoff_tags(HandoffReason.REQUESTED, "pre-sale")
        priority = HANDOFF_PRIORITY[HandoffReason.REQUESTED]
        slots = trio.Semaphore(IN_FLIGHT)
        burst_end = 0.0

        async def hand_off(conv: str) -> None:
            nonlocal burst_end
            async with slots:
                sent[conv] = time.monotonic()
                await bot.request(
                    UpdateConversation(
                        id=0, conv=conv, state=ConvState.QUEUED, priority=priority, tags_add=tags
                    )
                )
                burst_end = max(burst_end, time.monotonic())

        killed_at = 0
        kill_time = 0.0
        async with trio.open_nursery() as live:
            live.start_soon(observe)
            for name, client in agents.items():
                live.start_soon(work, name, client)
            await hand_off(warm_up)
            with trio.fail_after(STARTUP_TIMEOUT_S):
                await warmed.wait()
            for ledger in (assigned, sent, assignments):
                ledger.pop(warm_up)
            start = time.monotonic()
            host0, server0, ours0 = HostCpu.sample(), server.cpu_s(), time.process_time()
            routing_probe = ServerProbe(routing.pid)
            routing_cpu = -routing_probe.cpu_s()
            async with trio.open_nursery() as burst:
                for conv in convs:
                    burst.start_soon(hand_off, conv)
                await half.wait()
                killed_at = params.handoffs - len(pending)
                kill_time = time.monotonic()
                if params.kill:
                    routing_cpu += routing_probe.cpu_s()
                    routing.kill()  # SIGKILL, in the middle of the burst's service
                    await routing.wait()
                    again, _ = await _start(worker_cmd, b"joined as", nursery)
                    routing_probe = ServerProbe(again.pid)
                restarted.set()
            with trio.move_on_after(DEADLINE_S):
                await done.wait()
            end = time.monotonic()
            routing_cpu += routing_probe.cpu_s()
            server_cpu, ours = server.cpu_s() - server0, time.process_time() - ours0
            others = foreign_cpu_pct(
                host0, HostCpu.sample(), server_cpu + routing_cpu + ours, end - start
            )
            live.cancel_scope.cancel()

    waits = {c: assigned[c] - sent[c] for c in assigned if c in sent}
    return RoutingReport(
        params=params,
        burst_s=round(burst_end - start, 3),
        all_assigned_s=round((max(assigned.values()) if assigned else end) - start, 3),
        killed_at_assigned=killed_at,
        restart_s=round(first_after_restart[0] - kill_time, 3) if first_after_restart else -1.0,
        time_to_assignment=_latency(list(waits.values())),
        before_kill=_latency([w for c, w in waits.items() if assigned[c] <= kill_time]),
        after_kill=_latency([w for c, w in waits.items() if assigned[c] > kill_time]),
        stranded=sum(1 for c in convs if c not in assigned),
        double_assigned=sum(1 for n in assignments.values() if n > 1),
        refused_closes=len(refused),
        max_load=max_load,
        server_cpu_s=round(server_cpu, 2),
        routing_cpu_s=round(routing_cpu, 2),
        generator_cpu_s=round(ours, 2),
        others_cpu_pct=round(others, 1),
        cpu_count=os.cpu_count() or 0,
        load_average=os.getloadavg(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen.routing",
        description=__doc__.split("\n")[0] if __doc__ else "",
    )
    defaults = RoutingParams()
    parser.add_argument("--handoffs", type=int, default=defaults.handoffs)
    parser.add_argument("--agents", type=int, default=defaults.agents)
    parser.add_argument("--max-chats", type=int, default=defaults.max_chats)
    parser.add_argument("--handle-s", type=float, default=defaults.handle_s)
    parser.add_argument(
        "--no-kill",
        action="store_true",
        help="leave routing alone (the same burst, for comparison)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    params = RoutingParams(
        handoffs=args.handoffs,
        agents=args.agents,
        max_chats=args.max_chats,
        handle_s=args.handle_s,
        kill=not args.no_kill,
    )
    report = trio.run(run, params)
    data = msgspec.json.format(msgspec.json.encode(report)).decode()
    if args.json is not None:
        args.json.write_text(data + "\n", encoding="utf-8")
    print(data)
    healthy = report.stranded == report.double_assigned == report.refused_closes == 0
    return 0 if healthy and report.max_load <= params.max_chats else 1


if __name__ == "__main__":
    sys.exit(main())
