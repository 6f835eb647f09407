"""A shop owner's first hour with the CRM, for real: orders imported with the
`imserver crm` command (a subprocess writing the CRM database) before the buyers
ever chatted, then the buyers ask the running bot about them; an order pushed
while everything runs is what the next answer says; a chat user mapped to a Taobao
identity through the customers file gets that identity's orders; a stranger gets
nothing; the agent's sidebar shows the mapped customer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

from imserver.client import Client
from protocol import (
    Channel,
    MessageEvent,
    OpenConversation,
    PluginEvent,
    QuickRepliesBody,
    TextBody,
    UpdateConversation,
)
from tests.conftest import RunningServer
from tests.workers.conftest import worker_process
from workers.crm.repository import customer_id_for

HEADER = "shop,order_id,channel,external_id,status,amount,items,carrier,tracking_no,created_at,updated_at\n"


async def _crm(data: Path, *args: str) -> str:
    done = await trio.run_process(
        [sys.executable, "-m", "imserver", "crm", "--data", str(data), *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


async def _bot_says(client: Client, conv: str, after: int = 0) -> str:
    """The bot's next message in ``conv`` with a seq above ``after``."""
    with trio.fail_after(30):
        async for frame in client.events:
            if (
                isinstance(frame, MessageEvent)
                and frame.message.conv == conv
                and frame.message.seq > after
                and frame.message.sender.startswith("worker:")
                and isinstance(frame.message.body, TextBody | QuickRepliesBody)
            ):
                return frame.message.body.text
    raise AssertionError("no reply")  # pragma: no cover


async def _open(client: Client, channel: Channel = Channel.WEB) -> str:
    """Open the chat with shop1 and take the bot's welcome."""
    opened = await client.request(OpenConversation(id=0, shop="shop1", channel=channel))
    conv: str = opened.conversation.id
    await _bot_says(client, conv)
    return conv


async def _ask(client: Client, conv: str, text: str) -> str:
    """Send ``text``; the bot's reply."""
    sent = await client.send_text(conv, text)
    return await _bot_says(client, conv, sent.seq)


async def test_orders_imported_before_the_first_chat_reach_the_buyer(
    server: RunningServer, tmp_path: Path
) -> None:
    orders = tmp_path / "orders.csv"
    orders.write_text(
        HEADER + "shop1,12345,taobao,tb_buyer1,已发货,199.00,Down jacket x1,SF,"
        "SF100200,2026-11-11 10:00:00,2026-11-11 12:00:00\n"
        "shop1,777,taobao,alice_tb,paid,59.00,Scarf,,,2026-11-11 09:00:00,\n",
        encoding="utf-8",
    )
    customers = tmp_path / "customers.csv"
    customers.write_text(
        "customer,channel,external_id,user,display_name\nc-alice,taobao,alice_tb,alice,Alice\n",
        encoding="utf-8",
    )
    out = await _crm(tmp_path, "import-orders", str(orders))
    assert out.startswith("imported 2 (new 2,")
    await _crm(tmp_path, "import-customers", str(customers))  # the web user alice is alice_tb

    async with (
        worker_process(server, "crm", tmp_path),
        worker_process(server, "bot", tmp_path),
        server.connect("tb_buyer1") as buyer,
        server.connect("alice") as alice,
        server.connect("mallory") as mallory,
    ):
        conv = await _open(buyer, Channel.TAOBAO)
        answer = await _ask(buyer, conv, "帮我查下订单12345")
        assert "12345" in answer and "已发货" in answer, answer

        # Pushed during the sale: delivered now. The next answer says so.
        later = tmp_path / "update.csv"
        later.write_text(
            HEADER + "shop1,12345,taobao,tb_buyer1,已签收,199.00,Down jacket x1,SF,"
            "SF100200,2026-11-11 10:00:00,2026-11-13 08:00:00\n",
            encoding="utf-8",
        )
        assert (await _crm(tmp_path, "import-orders", str(later))).startswith(
            "imported 1 (new 0, updated 1,"
        )
        answer = await _ask(buyer, conv, "订单12345怎么样了")
        assert "12345" in answer and "已签收" in answer, answer

        # alice chats on the web; the customers file says she is alice_tb on Taobao.
        alice_conv = await _open(alice)
        answer = await _ask(alice, alice_conv, "帮我查下订单777")
        assert "777" in answer and "已付款" in answer, answer

        # Nobody else learns anything about order 12345.
        mallory_conv = await _open(mallory, Channel.TAOBAO)
        answer = await _ask(mallory, mallory_conv, "帮我查下订单12345")
        assert "没有查到订单12345" in answer, answer

        # The agent who takes the Taobao buyer's chat sees their CRM profile.
        async with server.connect("agent1", "agent", "shop1") as agent:
            await agent.request(UpdateConversation(id=0, conv=conv, agent="agent1"))
            with trio.fail_after(30):
                async for frame in agent.events:
                    if isinstance(frame, PluginEvent) and frame.kind == "profile":
                        profile = frame.data
                        break
    assert profile["customer"] == customer_id_for("taobao", "tb_buyer1")
    assert profile["conv"] == conv and profile["order_count"] == 1
    assert profile["recent_orders"][0]["status"] == "delivered"


def test_the_crm_command_reports_bad_rows(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "shop1,1,taobao,tb1,paid,1.00,,,,not a date,\n", encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "imserver",
            "crm",
            "--data",
            str(tmp_path),
            "import-orders",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout.startswith("imported 0 (") and "rejected 1" in done.stdout
    assert done.stderr.startswith("line 2 [1]: created_at: not an ISO 8601 timestamp")
