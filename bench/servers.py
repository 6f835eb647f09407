"""The targets under test, each started as a subprocess on port 0, and how to stop them.

Theory of operation
-------------------
A target is a command line that starts a server on 127.0.0.1, port 0, and
prints a line containing ``listening on ws://HOST:PORT/PATH`` once it
accepts connections. ``RunningServer`` starts it with a fresh temporary
data directory and a fresh token secret, sends its stdout and stderr to log
files in that directory, and polls the stdout log for that line (no pipes,
so a chatty server can never block on a full pipe). A target may also name
a ``ready`` line to wait for after that: imserver's bot variant
(``BOT_VARIANTS``, ``serve --workers bot``) is ready once its worker
printed ``imserver worker bot joined as ...`` (the worker's stdout is the
server's). A ``prepare`` callback may fill the data directory first (the
bot-heavy scenario seeds the CRM database the bot reads orders from). If the
process exits first, or ``STARTUP_TIMEOUT_S`` passes, the target is
unavailable and the reason carries the tail of its output. Stopping is
SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``; the logs are then read for
warnings and errors (``ServerLog``: imserver logs one JSON object per line
on stderr) and the data directory is removed.

imserver's target is skipped up front while ``python -m imserver`` does not
exist, so that no figure is ever reported for a server that did not run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple

import msgspec

from bench.loadgen.sysstat import ServerProbe

HOST: Final = "127.0.0.1"
STARTUP_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 15.0
"""imserver drains on SIGTERM (its DRAIN_TIMEOUT_S is 10 s)."""
POLL_S: Final = 0.05
LISTENING: Final = re.compile(r"listening on (ws://\S+)")
WORKER_JOINED: Final = re.compile(r"imserver worker (\S+) joined as (\S+)")
LOG_SAMPLES: Final = 8
LOG_SAMPLE_CHARS: Final = 400
OUTPUT_TAIL_CHARS: Final = 1500
REPO: Final = Path(__file__).resolve().parent.parent


class Target(NamedTuple):
    name: str
    description: str
    argv: Callable[[str, str], list[str]]
    """(data dir, secret) -> command line."""
    missing: Callable[[], str | None]
    """Why it cannot run at all yet, or None."""
    ready: re.Pattern[str] | None = None
    """A line to wait for on stdout after the listening line (workers joined)."""


def _imserver_missing() -> str | None:
    try:
        spec = importlib.util.find_spec("imserver.__main__")
    except (ImportError, ValueError) as exc:
        return f"imserver cannot be imported: {exc}"
    if spec is None:
        return (
            "`python -m imserver serve` does not exist yet (no imserver/__main__.py); "
            "imserver target skipped, no figures"
        )
    return None


def _always() -> str | None:
    return None


TARGETS: Final[dict[str, Target]] = {
    "imserver": Target(
        "imserver",
        "imserver (trio + websockets sans-I/O framing, auth, SQLite store)",
        lambda data, secret: [
            sys.executable,
            "-m",
            "imserver",
            "serve",
            "--data",
            data,
            "--host",
            HOST,
            "--port",
            "0",
            "--secret",
            secret,
        ],
        _imserver_missing,
    ),
    "trio_wsproto": Target(
        "trio_wsproto",
        "bare relay: trio + wsproto, coalesced writes",
        lambda data, secret: [
            sys.executable,
            "-m",
            "bench.baselines.trio_wsproto_relay",
            "--port",
            "0",
        ],
        _always,
    ),
    "trio_sansio": Target(
        "trio_sansio",
        "bare relay: trio + websockets sans-I/O (imserver's I/O stack), coalesced writes",
        lambda data, secret: [
            sys.executable,
            "-m",
            "bench.baselines.trio_sansio_relay",
            "--port",
            "0",
        ],
        _always,
    ),
    "websockets": Target(
        "websockets",
        "bare relay: asyncio + uvloop + websockets",
        lambda data, secret: [sys.executable, "-m", "bench.baselines.ws_relay", "--port", "0"],
        _always,
    ),
}


BOT_VARIANTS: Final[dict[str, Target]] = {
    "imserver": Target(
        "imserver",
        "imserver + bot worker (serve --workers bot, example KB, seeded CRM)",
        lambda data, secret: [
            sys.executable,
            "-m",
            "imserver",
            "serve",
            "--data",
            data,
            "--host",
            HOST,
            "--port",
            "0",
            "--secret",
            secret,
            "--workers",
            "bot",
        ],
        _imserver_missing,
        ready=WORKER_JOINED,
    ),
}
"""Targets that can run the bot-heavy scenario, by target name: the relays have no bot."""


class ServerLog(msgspec.Struct, kw_only=True):
    """What a server wrote while it ran (stdout and stderr, workers' output included)."""

    warnings: int = 0
    errors: int = 0
    """Log records at level error or critical."""
    unstructured: int = 0
    """stderr lines that are not JSON log records (tracebacks, prints)."""
    events: dict[str, int] = {}
    """Warning and error records by "level event" (imserver's JSON logs)."""
    samples: list[str] = []
    """The first few warning/error records and unstructured lines, truncated."""
    worker_joins: int = 0
    """'imserver worker ... joined' lines: more than the workers started means restarts or
    reconnections."""


def read_server_log(stdout: str, stderr: str) -> ServerLog:
    log = ServerLog(worker_joins=len(WORKER_JOINED.findall(stdout)))
    events: dict[str, int] = {}
    samples: list[str] = []
    for line in stderr.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            log.unstructured += 1
            if len(samples) < LOG_SAMPLES:
                samples.append(line[:LOG_SAMPLE_CHARS])
            continue
        level = str(record.get("level", ""))
        if level not in ("warning", "error", "critical"):
            continue
        if level == "warning":
            log.warnings += 1
        else:
            log.errors += 1
        key = f"{level} {record.get('event', '?')}"
        events[key] = events.get(key, 0) + 1
        if len(samples) < LOG_SAMPLES:
            samples.append(line[:LOG_SAMPLE_CHARS])
    log.events, log.samples = events, samples
    return log


class TargetUnavailable(Exception):
    """The target did not start; the message says why."""


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-OUTPUT_TAIL_CHARS:].strip()


class RunningServer:
    """A started target; use as a context manager."""

    def __init__(self, target: Target, prepare: Callable[[Path], object] | None = None) -> None:
        self.target = target
        self.prepare = prepare
        """Called with the server's (empty) data directory before it starts."""
        self.secret = secrets.token_hex(16)
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"imbench-{target.name}-"))
        self.url = ""
        self.log: ServerLog | None = None
        """Read from the output once the server has stopped."""
        self._out = self.data_dir / "server.stdout.log"
        self._err = self.data_dir / "server.stderr.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def probe(self) -> ServerProbe:
        return ServerProbe(self.pid)

    def __enter__(self) -> RunningServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        reason = self.target.missing()
        if reason is not None:
            raise TargetUnavailable(reason)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        data = self.data_dir / "data"
        argv = self.target.argv(str(data), self.secret)
        data.mkdir()
        if self.prepare is not None:
            self.prepare(data)
        with self._out.open("wb") as out, self._err.open("wb") as err:
            self._process = subprocess.Popen(argv, stdout=out, stderr=err, cwd=REPO, env=env)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        ready = self.target.ready
        while time.monotonic() < deadline:
            output = self._out.read_text(errors="replace")
            match = LISTENING.search(output)
            if match:
                self.url = match.group(1)
                if ready is None or ready.search(output, match.end()):
                    return
            code = self._process.poll()
            if code is not None:
                what = f"before {ready.pattern!r}" if self.url and ready else "before listening"
                raise TargetUnavailable(self._why(f"exited with status {code} {what}"))
            time.sleep(POLL_S)
        if self.url and ready is not None:
            raise TargetUnavailable(
                self._why(
                    f"listened but printed no {ready.pattern!r} line within {STARTUP_TIMEOUT_S:.0f} s"
                )
            )
        raise TargetUnavailable(
            self._why(f"printed no 'listening on ws://...' line within {STARTUP_TIMEOUT_S:.0f} s")
        )

    def _why(self, what: str) -> str:
        """One summary line (with the output's last line), then the output's tail."""
        output = _tail(self._err) or _tail(self._out)
        last = output.splitlines()[-1] if output else "no output"
        return f"{self.target.name} {what}: {last}\n{output}"

    def stop(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if process is not None:
            with contextlib.suppress(OSError):
                self.log = read_server_log(
                    self._out.read_text(errors="replace"), self._err.read_text(errors="replace")
                )
        shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def secret_bytes(self) -> bytes:
        return self.secret.encode()
