"""Helpers for worker tests: plugins run in real worker processes."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from tests.conftest import SECRET, RunningServer


@asynccontextmanager
async def worker_process(
    server: RunningServer, plugin: str, data: Path, config: Path | None = None
) -> AsyncIterator[trio.Process]:
    """``imserver worker`` as a child process, ready once it has joined its plugin group."""
    command = [
        sys.executable,
        "-m",
        "imserver",
        "worker",
        plugin,
        "--server",
        server.url,
        "--secret",
        SECRET.decode(),
        "--data",
        str(data),
        "--log-level",
        "warning",
    ]
    if config is not None:
        command += ["--config", str(config)]
    dispatcher = server.server.dispatcher
    assert dispatcher is not None
    name = plugin.rsplit(":", 1)[-1].removesuffix("Plugin").lower()

    def instances() -> int:
        group = dispatcher.groups.get(name)
        return len(group.instances) if group else 0

    before = instances()
    async with trio.open_nursery() as nursery:
        # stderr is inherited: pytest shows the worker's log when a test fails.
        process: trio.Process = await nursery.start(partial(trio.run_process, command, check=False))
        with trio.fail_after(30):
            while instances() <= before:
                await dispatcher.membership_changed()
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
            nursery.cancel_scope.cancel()
