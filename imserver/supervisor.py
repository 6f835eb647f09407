"""Worker processes started by ``imserver serve --workers a,b``: supervised children.

Each configured plugin runs as ``python -m imserver worker NAME`` in its own
process (the signing secret goes in its environment, ``IMSERVER_SECRET``,
never on its command line), so a slow or crashing plugin never slows the chat path. A child
that exits is restarted with exponential backoff (reset after it has run
``HEALTHY_AFTER_S``). On shutdown children get SIGTERM, then SIGKILL after
``STOP_GRACE_S``.

A child's stdout is ours (its status lines: ``imserver worker bot joined as
...``). Its stderr comes back through a pipe and leaves on our stderr as JSON
lines: its own log lines pass unchanged; anything else (a library's banner, a
traceback from before logging was set up) becomes one ``worker_output`` event
per burst. ``WorkerStates`` keeps each plugin's state (running,
restarting; failures in a row, the last error) for ``/healthz``: a worker that
cannot start shows as ``degraded`` there with the reason, not as ``ok``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
import trio

from .logs import event

log = logging.getLogger("imserver.supervisor")

BACKOFF_S: Final = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
HEALTHY_AFTER_S: Final = 60.0
STOP_GRACE_S: Final = 5.0
OUTPUT_LINE_BYTES: Final = 16_384
"""A child's output line longer than this is cut (its log lines are far shorter)."""
OUTPUT_BURST_LINES: Final = 200
"""Non-JSON lines of a child gathered into one ``worker_output`` event at most."""
OUTPUT_QUIET_S: Final = 0.2
"""Non-JSON output is flushed as one event once the child has been quiet this long."""

_decode_line = msgspec.json.Decoder(dict[str, Any]).decode


@dataclass
class WorkerState:
    """What ``/healthz`` says about one supervised plugin."""

    plugin: str
    running: bool = False
    pid: int | None = None
    started_at: float = 0.0
    failures: int = 0
    """Exits in a row, each before it had run ``HEALTHY_AFTER_S``."""
    last_exit: int | None = None
    last_error: str = ""

    def well(self, now: float) -> bool:
        return self.failures == 0 or (self.running and now - self.started_at > HEALTHY_AFTER_S)

    def line(self, now: float) -> str:
        state = "running" if self.running else "restarting"
        if not self.well(now):
            state = "failing"
        parts = [f"worker {self.plugin}: {state}"]
        if self.running:
            parts.append(f"pid {self.pid}")
        if self.failures:
            parts.append(f"{self.failures} failed starts in a row, last exit {self.last_exit}")
        if self.last_error:
            parts.append(f"last error: {self.last_error}")
        return "; ".join(parts)


@dataclass
class WorkerStates:
    workers: dict[str, WorkerState] = field(default_factory=dict)

    def of(self, plugin: str) -> WorkerState:
        return self.workers.setdefault(plugin, WorkerState(plugin))

    def health(self) -> tuple[bool, bytes]:
        now = trio.current_time()
        states = sorted(self.workers.values(), key=lambda w: w.plugin)
        lines = "".join(w.line(now)[:OUTPUT_LINE_BYTES] + "\n" for w in states)
        return all(w.well(now) for w in states), lines.encode()


async def _forward_output(stream: trio.abc.ReceiveStream, state: WorkerState) -> None:
    """Our stderr gets the child's JSON log lines as they are and its other stderr
    output as ``worker_output`` events; an error line is remembered for ``/healthz``."""
    buffer = bytearray()
    pending: list[str] = []

    def flush() -> None:
        if not pending:
            return
        text = "\n".join(pending)
        traceback = "Traceback (most recent call last)" in text
        if traceback:
            state.last_error = pending[-1]
        level = logging.ERROR if traceback else logging.INFO
        event(log, "worker_output", level=level, plugin=state.plugin, pid=state.pid, text=text)
        pending.clear()

    while True:
        chunk: bytes | bytearray = b""
        with trio.move_on_after(OUTPUT_QUIET_S if pending else float("inf")):
            chunk = await stream.receive_some(65_536)
            if not chunk:
                break
        if not chunk:
            flush()  # quiet for a while: the burst is over
            continue
        buffer += chunk
        *lines, rest = buffer.split(b"\n")
        buffer = bytearray(rest)
        if len(buffer) > OUTPUT_LINE_BYTES:
            lines.append(buffer[:OUTPUT_LINE_BYTES])
            buffer.clear()
        for raw in lines:
            line = raw[:OUTPUT_LINE_BYTES].decode("utf-8", "replace").rstrip()
            if not line:
                continue
            try:
                record = _decode_line(line)
            except msgspec.DecodeError:
                pending.append(line)
                if len(pending) >= OUTPUT_BURST_LINES:
                    flush()
                continue
            flush()
            sys.stderr.write(line + "\n")
            if record.get("level") in ("error", "critical"):
                state.last_error = str(record.get("error") or record.get("event") or "")
    if buffer.strip():
        pending.append(buffer[:OUTPUT_LINE_BYTES].decode("utf-8", "replace"))
    flush()
    sys.stderr.flush()


async def supervise(
    name: str,
    *,
    url: str,
    secret: bytes,
    data_dir: Path,
    config: Path | None = None,
    states: WorkerStates | None = None,
) -> None:
    """Keep one worker process running until cancelled."""
    state = (states or WorkerStates()).of(name)
    command = [
        sys.executable,
        "-m",
        "imserver",
        "worker",
        name,
        "--server",
        url,
        "--data",
        str(data_dir),
    ]
    if config is not None:
        command += ["--config", str(config)]
    # By environment, never argv: /proc/PID/cmdline is readable by every local
    # user, /proc/PID/environ by the process's own user only.
    env = {**os.environ, "IMSERVER_SECRET": secret.decode()}
    failures = 0
    while True:
        started = trio.current_time()
        process = await trio.lowlevel.open_process(command, env=env, stderr=subprocess.PIPE)
        state.running, state.pid, state.started_at = True, process.pid, started
        event(log, "worker_started", plugin=name, pid=process.pid)
        try:
            assert process.stderr is not None
            async with trio.open_nursery() as output:
                output.start_soon(_forward_output, process.stderr, state)
                code = await process.wait()
        finally:
            state.running = False
            if process.returncode is None:
                with trio.CancelScope(shield=True):
                    process.send_signal(signal.SIGTERM)
                    with trio.move_on_after(STOP_GRACE_S):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
        failures = 0 if trio.current_time() - started > HEALTHY_AFTER_S else failures + 1
        state.failures, state.last_exit = failures, code
        delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
        event(log, "worker_exited", level=logging.WARNING, plugin=name, code=code, restart_in=delay)
        await trio.sleep(delay)
