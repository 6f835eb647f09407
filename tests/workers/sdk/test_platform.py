"""The worker platform end to end: real server, real worker processes."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from functools import partial
from pathlib import Path

import trio

from imserver.client import Client
from protocol import MessageEvent, OpenConversation, TextBody, UpdateConversation
from tests.conftest import RunningServer
from tests.workers.conftest import worker_process


async def _bot_replies(client: Client, conv: str, count: int) -> list[str]:
    texts: list[str] = []
    with trio.fail_after(60):
        async for frame in client.events:
            if (
                isinstance(frame, MessageEvent)
                and frame.message.conv == conv
                and frame.message.sender != client.welcome.user
                and isinstance(frame.message.body, TextBody)
            ):
                texts.append(frame.message.body.text)
                if len(texts) == count:
                    return texts
    raise AssertionError(f"only {len(texts)} replies")


async def test_every_question_answered_once_even_when_a_worker_is_killed(
    server: RunningServer, tmp_path: Path
) -> None:
    plugin = "tests.workers.sdk.plugins:EchoPlugin"
    customers = [f"buyer{i}" for i in range(8)]
    async with (
        worker_process(server, plugin, tmp_path) as first,
        worker_process(server, plugin, tmp_path),
        trio.open_nursery() as nursery,
    ):
        results: dict[str, list[str]] = {}

        async def customer(name: str) -> None:
            async with server.connect(name) as client:
                conv = (await client.request(OpenConversation(id=0, shop="shop1"))).conversation.id
                for i in range(15):
                    await client.send_text(conv, f"{name} q{i}")
                    if name == customers[0] and i == 5:
                        first.send_signal(signal.SIGKILL)  # mid-stream
                results[name] = await _bot_replies(client, conv, 15)

        for name in customers:
            nursery.start_soon(customer, name)
    for name in customers:
        expected = Counter(f"echo: {name} q{i}" for i in range(15))
        assert Counter(results[name]) == expected, f"{name}: missing or doubled answers"


async def test_raising_or_hanging_plugin_does_not_affect_chat(
    server: RunningServer, tmp_path: Path
) -> None:
    async with (
        worker_process(server, "tests.workers.sdk.plugins:FlakyPlugin", tmp_path),
        server.connect("zoe") as zoe,
        server.connect("yan") as yan,
        server.connect("ag", "agent", "shop1") as agent,
    ):
        stuck = (await yan.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await yan.send_text(stuck, "hang")  # the plugin hangs on this conversation
        conv = (await zoe.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await zoe.send_text(conv, "boom")  # ... and raises on this one
        await zoe.send_text(conv, "hello")
        # other conversations are still served, by the same plugin instance
        with trio.fail_after(5):
            replies = await _bot_replies(zoe, conv, 1)
        assert replies == ["ok: hello (attempt 1)"]
        # and the chat itself never waits for plugins: an agent takes the stuck one
        await agent.request(UpdateConversation(id=0, conv=stuck, agent="ag"))
        with trio.fail_after(5):
            await agent.send_text(stuck, "human here")
            sent = await yan.send_text(stuck, "thanks")
            async for frame in agent.events:
                if isinstance(frame, MessageEvent) and frame.message.seq == sent.seq:
                    break


async def test_question_asked_while_worker_and_server_were_down_is_answered_once(
    tmp_path: Path,
) -> None:
    """The event log is durable: kill -9 the worker, then the server; the question
    asked in between is answered when both are back, exactly once."""
    import signal as _signal
    import sys as _sys

    from tests.conftest import SECRET, start_server_process

    data = tmp_path / "data"
    plugin = "tests.workers.sdk.plugins:EchoPlugin"

    async def start_worker(url: str) -> trio.Process:
        process = await trio.lowlevel.open_process(
            [
                _sys.executable,
                "-m",
                "imserver",
                "worker",
                plugin,
                "--server",
                url,
                "--secret",
                SECRET.decode(),
                "--data",
                str(tmp_path),
                "--log-level",
                "warning",
            ],
            stdout=subprocess.PIPE,
        )
        assert process.stdout is not None
        line = b""
        with trio.fail_after(30):
            while b"joined" not in line:
                chunk = await process.stdout.receive_some(1)
                assert chunk, "worker exited"
                line = b"" if chunk == b"\n" else line + chunk
        return process

    async with trio.open_nursery() as nursery:
        proc = await start_server_process(data, nursery)
        worker = await start_worker(proc.url)
        try:
            async with proc.connect("kim") as kim:
                conv = (await kim.request(OpenConversation(id=0, shop="shop1"))).conversation.id
                await kim.send_text(conv, "q1")
                assert await _bot_replies(kim, conv, 1) == ["echo: q1"]
                worker.send_signal(_signal.SIGKILL)
                await worker.wait()
                await kim.send_text(conv, "q2")  # nobody is there to answer
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
        proc.process.send_signal(_signal.SIGKILL)
    async with trio.open_nursery() as nursery:
        proc = await start_server_process(data, nursery)
        worker = await start_worker(proc.url)
        try:
            async with proc.connect("kim") as kim:
                from protocol import History, HistoryPage

                with trio.fail_after(30):
                    while True:
                        page: HistoryPage = await kim.request(History(id=0, conv=conv))
                        texts = [m.body.text for m in page.messages if isinstance(m.body, TextBody)]
                        if "echo: q2" in texts:
                            break
                        await _next_message(kim, conv)
                assert texts.count("echo: q1") == 1 and texts.count("echo: q2") == 1
        finally:
            worker.kill()
            await worker.wait()
            proc.process.send_signal(_signal.SIGTERM)


async def _next_message(client: Client, conv: str) -> None:
    async for frame in client.events:
        if isinstance(frame, MessageEvent) and frame.message.conv == conv:
            return


async def test_serve_supervises_worker_processes(tmp_path: Path) -> None:
    """``imserver serve --workers X`` runs X as a child and restarts it after a crash."""
    import os
    import signal as _signal
    import sys as _sys

    from tests.conftest import SECRET, SHOPS, ServerProcess

    plugin = "tests.workers.sdk.plugins:EchoPlugin"
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [
                    _sys.executable,
                    "-m",
                    "imserver",
                    "serve",
                    "--data",
                    str(tmp_path / "data"),
                    "--port",
                    "0",
                    "--secret",
                    SECRET.decode(),
                    "--log-level",
                    "warning",
                    "--workers",
                    plugin,
                    "--shops",
                    ",".join(SHOPS),
                ],
                stdout=subprocess.PIPE,
                check=False,
            )
        )
        assert process.stdout is not None
        lines = _Lines(process.stdout)
        url = (await lines.until(b"listening on")).rsplit(" ", 1)[1]
        await lines.until(b"joined")
        server = ServerProcess(process=process, url=url, data_dir=tmp_path / "data")
        async with server.connect("una") as una:
            conv = (await una.request(OpenConversation(id=0, shop="shop1"))).conversation.id
            await una.send_text(conv, "first")
            assert await _bot_replies(una, conv, 1) == ["echo: first"]
            # The server's children are the worker, and the store's writer process
            # (with multiprocessing's fork server and resource tracker).
            workers = [
                pid
                for pid in await _children(process.pid)
                if plugin in await trio.Path(f"/proc/{pid}/cmdline").read_text()
            ]
            assert len(workers) == 1
            os.kill(workers[0], _signal.SIGKILL)
            await lines.until(b"joined")  # the supervisor started a new one
            await una.send_text(conv, "second")
            assert await _bot_replies(una, conv, 1) == ["echo: second"]
        process.send_signal(_signal.SIGTERM)
        with trio.fail_after(30):
            await process.wait()
        assert process.returncode == 0


async def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` (any of its threads may have spawned them)."""
    found: list[int] = []
    for task in await trio.Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (await (task / "children").read_text()).split()]
    return found


class _Lines:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def until(self, marker: bytes) -> str:
        with trio.fail_after(30):
            while True:
                line, newline, rest = self.buffer.partition(b"\n")
                if newline:
                    self.buffer = rest
                    if marker in line:
                        return line.decode().strip()
                    continue
                chunk = await self.stream.receive_some(4096)
                assert chunk, "process exited"
                self.buffer += chunk
