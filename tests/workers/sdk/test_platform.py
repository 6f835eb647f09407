"""The worker platform end to end: real server, real worker processes."""

from __future__ import annotations

import signal
from collections import Counter
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
            if (isinstance(frame, MessageEvent) and frame.message.conv == conv
                    and frame.message.sender != client.welcome.user
                    and isinstance(frame.message.body, TextBody)):
                texts.append(frame.message.body.text)
                if len(texts) == count:
                    return texts
    raise AssertionError(f"only {len(texts)} replies")


async def test_every_question_answered_once_even_when_a_worker_is_killed(
        server: RunningServer, tmp_path: Path) -> None:
    plugin = "tests.workers.sdk.plugins:EchoPlugin"
    customers = [f"buyer{i}" for i in range(8)]
    async with (
        worker_process(server, plugin, tmp_path) as first,
        worker_process(server, plugin, tmp_path),trio.open_nursery() as nursery
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
        server: RunningServer, tmp_path: Path) -> None:
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
