"""Shared fixtures: a real server on 127.0.0.1, port 0, with a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, settings

from imserver.auth import mint_token
from imserver.client import Client, connect
from imserver.server import Server, ServerConfig

SECRET = b"test-secret-0123456789abcdef-0123456"

SHOPS = (
    *(f"shop{i}" for i in range(1, 40)),
    *("shop-1", "shop-2", "s", "s1", "s2", "s3", "t", "shopx", "elsewhere"),
)
"""The shops every test server registers (conversations need a registered shop).
A test that needs another one registers it (``imserver.store.add_shops``)."""

# The suite runs on shared 2-core machines: a neighbour's load must not fail a
# property test through Hypothesis' timing checks (deadline, "input generation
# is slow"). What the properties assert is unaffected.
settings.register_profile(
    "imserver",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("imserver")


@dataclass
class RunningServer:
    server: Server
    url: str
    data_dir: Path

    def token(self, user: str, role: str = "customer", shop: str = "", **kw: object) -> str:
        return mint_token(SECRET, user=user, role=role, shop=shop, **kw)  # type: ignore[arg-type]

    def connect(
        self,
        user: str,
        role: str = "customer",
        shop: str = "",
        *,
        device: str | None = None,
        resume: dict[str, int] | None = None,
        **claims: object,
    ) -> AbstractAsyncContextManager[Client]:
        """``claims``: more token claims (``plugin`` for workers)."""
        return connect(
            self.url,
            self.token(user, role, shop, **claims),
            device=device or f"{user}-dev",
            resume=resume,
        )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    config = ServerConfig(data_dir=tmp_path / "data", secret=SECRET, port=0, shops=SHOPS)
    srv = Server(config)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(srv.serve)
        yield RunningServer(server=srv, url=url, data_dir=config.data_dir)
        srv.stop()


ServerFactory = Callable[[], RunningServer]


@dataclass
class ServerProcess:
    process: trio.Process
    url: str
    data_dir: Path

    def token(self, user: str, role: str = "customer", shop: str = "") -> str:
        return mint_token(SECRET, user=user, role=role, shop=shop)

    def connect(
        self,
        user: str,
        role: str = "customer",
        shop: str = "",
        *,
        resume: dict[str, int] | None = None,
    ) -> AbstractAsyncContextManager[Client]:
        return connect(self.url, self.token(user, role, shop), device=f"{user}-dev", resume=resume)


async def start_server_process(data_dir: Path, nursery: trio.Nursery) -> ServerProcess:
    """``imserver serve`` as a child process on a free port; returns once it listens."""
    import subprocess
    import sys

    process = await nursery.start(
        partial(
            trio.run_process,
            [
                sys.executable,
                "-m",
                "imserver",
                "serve",
                "--data",
                str(data_dir),
                "--port",
                "0",
                "--secret",
                SECRET.decode(),
                "--log-level",
                "warning",
                "--shops",
                ",".join(SHOPS),
            ],
            stdout=subprocess.PIPE,
            check=False,
        )
    )
    assert process.stdout is not None
    line = b""
    with trio.fail_after(30):
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            assert chunk, "server exited before listening"
            line += chunk
    url = line.decode().rsplit(" ", 1)[1].strip()
    return ServerProcess(process=process, url=url, data_dir=data_dir)
