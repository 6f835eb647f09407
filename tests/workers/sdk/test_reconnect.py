"""A worker whose join the server refuses backs off instead of spinning, and
says why in one JSON line (a real server, real worker processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio

from imserver.metrics import METRICS
from tests.conftest import RunningServer
from workers.sdk import (
    RECONNECT_BACKOFF_BASE_S,
    RECONNECT_BACKOFF_MAX_S,
    RECONNECT_JITTER,
    reconnect_delay,
)

WINDOW_S = 1.0
"""How long the attempts are counted after the first refusal (a measurement,
not a wait for something to happen)."""
PLUGIN = "tests.workers.sdk.plugins:EchoPlugin"


def _accepted() -> float:
    value = METRICS.registry.get_sample_value("imserver_accepted_connections_total")
    return value or 0.0


def test_the_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    import random

    rng = random.Random(7)
    delays = [reconnect_delay(attempt, rng) for attempt in range(12)]
    for attempt, delay in enumerate(delays[:5]):
        nominal = RECONNECT_BACKOFF_BASE_S * 2**attempt
        assert nominal * (1 - RECONNECT_JITTER) <= delay <= nominal
    assert max(delays) <= RECONNECT_BACKOFF_MAX_S
    assert delays[-1] >= RECONNECT_BACKOFF_MAX_S * (1 - RECONNECT_JITTER)
    assert len(set(delays)) == len(delays)  # jittered: instances do not come back in step


async def _refusal_line(process: trio.Process, lines: list[str]) -> dict[str, object]:
    """Read the worker's stderr up to its refusal line."""
    assert process.stderr is not None
    buffer = b""
    while True:
        chunk = await process.stderr.receive_some()
        if not chunk:
            raise AssertionError(f"the worker ended: {lines}")
        buffer += chunk
        *done, buffer = buffer.split(b"\n")
        for raw in done:
            lines.append(raw.decode())
            if "worker_join_refused" in lines[-1]:
                return dict(json.loads(lines[-1]))


async def test_a_refused_worker_backs_off_and_logs_the_refusal_once(
    server: RunningServer, tmp_path: Path
) -> None:
    tokens = {
        "no plugin claim": server.token("w1", "worker", "*"),
        "another plugin": server.token("w2", "worker", "shop1", plugin="crm"),
    }
    processes: list[trio.Process] = []
    logs: dict[str, list[str]] = {name: [] for name in tokens}
    try:
        for name, token in tokens.items():
            command = [sys.executable, "-m", "imserver", "worker", PLUGIN, "--server",
                       server.url, "--token", token, "--data", str(tmp_path / name)]  # fmt: skip
            processes.append(await trio.lowlevel.open_process(command, stderr=subprocess.PIPE))
        with trio.fail_after(30):
            for process, name in zip(processes, tokens, strict=True):
                refusal = await _refusal_line(process, logs[name])
                assert refusal["level"] == "error" and refusal["code"] == "forbidden"
                assert refusal["plugin"] == "echo" and refusal["reason"]
        before = _accepted()
        await trio.sleep(WINDOW_S)
        attempts = _accepted() - before
    finally:
        for process in processes:
            process.kill()
            await process.wait()
    # doubling from 50-100 ms: at most 4 each in a second (without backoff, hundreds)
    assert 1 <= attempts <= 2 * 6, attempts
    for process, name in zip(processes, tokens, strict=True):
        assert process.stderr is not None
        rest = (await process.stderr.receive_some()) or b""
        while more := await process.stderr.receive_some():
            rest += more
        lines = logs[name] + rest.decode().splitlines()
        assert sum("worker_join_refused" in line for line in lines) == 1, lines
        for line in lines:
            json.loads(line)  # every line is one JSON object
