"""The targets under test, each started as a subprocess on port 0, and how to stop them.

Theory of operation
-------------------
A target is a command line that starts a server on 127.0.0.1, port 0, and
prints a line containing ``listening on ws://HOST:PORT/PATH`` once it
accepts connections. ``RunningServer`` starts it with a fresh temporary
data directory and a fresh token secret, sends its stdout and stderr to log
files in that directory, and polls the stdout log for that line (no pipes,
so a chatty server can never block on a full pipe). If the process exits
first, or ``STARTUP_TIMEOUT_S`` passes, the target is unavailable and the
reason carries the tail of its output. Stopping is SIGTERM, then SIGKILL
after ``STOP_TIMEOUT_S``; the data directory is then removed.

imserver's target is skipped up front while ``python -m imserver`` does not
exist, so that no figure is ever reported for a server that did not run.
"""

from __future__ import annotations

import importlib.util
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

from bench.loadgen.sysstat import ServerProbe

HOST: Final = "127.0.0.1"
STARTUP_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 15.0
"""imserver drains on SIGTERM (its DRAIN_TIMEOUT_S is 10 s)."""
POLL_S: Final = 0.05
LISTENING: Final = re.compile(r"listening on (ws://\S+)")
OUTPUT_TAIL_CHARS: Final = 1500
REPO: Final = Path(__file__).resolve().parent.parent


class Target(NamedTuple):
    name: str
    description: str
    argv: Callable[[str, str], list[str]]
    """(data dir, secret) -> command line."""
    missing: Callable[[], str | None]
    """Why it cannot run at all yet, or None."""


def _imserver_missing() -> str | None:
    try:
        spec = importlib.util.find_spec("imserver.__main__")
    except (ImportError, ValueError) as exc:
        return f"imserver cannot be imported: {exc}"
    if spec is None:
        return ("`python -m imserver serve` does not exist yet (no imserver/__main__.py); "
                "imserver target skipped, no figures")
    return None


def _always() -> str | None:
    return None


TARGETS: Final[dict[str, Target]] = {
    "imserver": Target(
        "imserver", "imserver (trio + wsproto, auth, SQLite store)",
        lambda data, secret: [sys.executable, "-m", "imserver", "serve", "--data", data,
                              "--host", HOST, "--port", "0", "--secret", secret],
        _imserver_missing),
    "trio_wsproto": Target(
        "trio_wsproto", "bare relay: trio + wsproto, coalesced writes",
        lambda data, secret: [sys.executable, "-m", "bench.baselines.trio_wsproto_relay",
                              "--port", "0"],
        _always),
    "websockets": Target(
        "websockets", "bare relay: asyncio + uvloop + websockets",
        lambda data, secret: [sys.executable, "-m", "bench.baselines.ws_relay", "--port", "0"],
        _always),
}


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

    def __init__(self, target: Target) -> None:
        self.target = target
        self.secret = secrets.token_hex(16)
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"imbench-{target.name}-"))
        self.url = ""
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

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        reason = self.target.missing()
        if reason is not None:
            raise TargetUnavailable(reason)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        argv = self.target.argv(str(self.data_dir / "data"), self.secret)
        (self.data_dir / "data").mkdir()
        with self._out.open("wb") as out, self._err.open("wb") as err:
            self._process = subprocess.Popen(argv, stdout=out, stderr=err, cwd=REPO, env=env)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            match = LISTENING.search(self._out.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
                return
            code = self._process.poll()
            if code is not None:
                raise TargetUnavailable(self._why(f"exited with status {code} before listening"))
            time.sleep(POLL_S)
        raise TargetUnavailable(self._why(
            f"printed no 'listening on ws://...' line within {STARTUP_TIMEOUT_S:.0f} s"))

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
        shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def secret_bytes(self) -> bytes:
        return self.secret.encode()
