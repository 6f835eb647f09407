"""Worker processes started by ``imserver serve --workers a,b``: supervised children.

Each configured plugin runs as ``python -m imserver worker NAME`` in its own
process (the signing secret goes in its environment, ``IMSERVER_SECRET``,
never on its command line), so a slow or crashing plugin never slows the chat path. A child
that exits is restarted with exponential backoff (reset after it has run
``HEALTHY_AFTER_S``). On shutdown children get SIGTERM, then SIGKILL after
``STOP_GRACE_S``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Final

import trio

from .logs import event

log = logging.getLogger("imserver.supervisor")

BACKOFF_S: Final = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
HEALTHY_AFTER_S: Final = 60.0
STOP_GRACE_S: Final = 5.0


async def supervise(
    name: str, *, url: str, secret: bytes, data_dir: Path, config: Path | None = None
) -> None:
    """Keep one worker process running until cancelled."""
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
        process = await trio.lowlevel.open_process(command, env=env)
        event(log, "worker_started", plugin=name, pid=process.pid)
        try:
            code = await process.wait()
        finally:
            if process.returncode is None:
                with trio.CancelScope(shield=True):
                    process.send_signal(signal.SIGTERM)
                    with trio.move_on_after(STOP_GRACE_S):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
        failures = 0 if trio.current_time() - started > HEALTHY_AFTER_S else failures + 1
        delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
        event(log, "worker_exited", level=logging.WARNING, plugin=name, code=code, restart_in=delay)
        await trio.sleep(delay)
