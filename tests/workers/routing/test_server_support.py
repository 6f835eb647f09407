"""The two server features routing relies on: conditional updates and ListAgents."""

from __future__ import annotations

import subprocess
import sys
from functools import partial

import pytest
import trio

from imserver.client import ServerError
from protocol import (
    AgentEvent,
    AgentList,
    AgentStatus,
    ConvState,
    GetConversation,
    ListAgents,
    OpenConversation,
    SetAgentStatus,
    Subscribe,
    Topic,
    UpdateConversation,
)
from tests.conftest import SECRET, RunningServer


async def test_conditional_assign_is_refused_once_the_chat_moved_on(server: RunningServer) -> None:
    for agent in ("a1", "a2"):  # assignees must be agents of the shop
        async with server.connect(agent, "agent", "shop1") as client:
            await client.request(SetAgentStatus(id=0, status=AgentStatus.ONLINE))
    async with server.connect("buyer") as buyer, server.connect("w", "worker", "shop1") as worker:
        conv = (await buyer.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        await worker.request(UpdateConversation(id=0, conv=conv, state=ConvState.QUEUED))
        await worker.request(
            UpdateConversation(
                id=0,
                conv=conv,
                state=ConvState.ASSIGNED,
                agent="a1",
                if_state=ConvState.QUEUED,
                key="k1",
            )
        )
        # a second decider (another routing instance) loses: the chat is no longer queued
        with pytest.raises(ServerError) as refused:
            await worker.request(
                UpdateConversation(
                    id=0,
                    conv=conv,
                    state=ConvState.ASSIGNED,
                    agent="a2",
                    if_state=ConvState.QUEUED,
                    key="k2",
                )
            )
        assert refused.value.code == "conflict"
        # a repeat of the applied update is still Ok (idempotency comes first)
        await worker.request(
            UpdateConversation(
                id=0,
                conv=conv,
                state=ConvState.ASSIGNED,
                agent="a1",
                if_state=ConvState.QUEUED,
                key="k1",
            )
        )
        # taking it back only works from the agent who holds it
        with pytest.raises(ServerError) as wrong_holder:
            await worker.request(
                UpdateConversation(
                    id=0,
                    conv=conv,
                    state=ConvState.QUEUED,
                    if_state=ConvState.ASSIGNED,
                    if_agent="a2",
                )
            )
        assert wrong_holder.value.code == "conflict"
        await worker.request(
            UpdateConversation(
                id=0, conv=conv, state=ConvState.QUEUED, if_state=ConvState.ASSIGNED, if_agent="a1"
            )
        )
        info = await worker.request(GetConversation(id=0, conv=conv))
        assert info.conversation.state is ConvState.QUEUED and info.conversation.agent is None


async def test_list_agents_reports_status_since_and_connection(server: RunningServer) -> None:
    async with server.connect("sup", "supervisor", "shop1") as sup:
        await sup.request(Subscribe(id=0, topics=[Topic.AGENTS]))
        async with server.connect("a1", "agent", "shop1") as a1:
            await a1.request(SetAgentStatus(id=0, status=AgentStatus.ONLINE))
            async with server.connect("a2", "agent", "shop1") as a2:
                await a2.request(SetAgentStatus(id=0, status=AgentStatus.AWAY))
            with trio.fail_after(10):  # the offline status is stored, then announced
                async for frame in sup.events:
                    if (
                        isinstance(frame, AgentEvent)
                        and frame.agent == "a2"
                        and frame.status is AgentStatus.OFFLINE
                    ):
                        break
            listed: AgentList = await sup.request(ListAgents(id=0))
            by_id = {a.agent: a for a in listed.agents}
            assert [a.agent for a in listed.agents] == ["a1", "a2"]
            assert by_id["a1"].status is AgentStatus.ONLINE and by_id["a1"].connected
            # a2's last connection closed: offline, and not connected
            assert by_id["a2"].status is AgentStatus.OFFLINE and not by_id["a2"].connected
            assert by_id["a2"].since >= by_id["a1"].since > 0
        async with server.connect("w", "worker", "*") as worker:
            assert len((await worker.request(ListAgents(id=0, shop="shop1"))).agents) == 2
            with pytest.raises(ServerError) as unnamed:
                await worker.request(ListAgents(id=0))
            assert unnamed.value.code == "bad_frame"
        async with server.connect("other", "supervisor", "shop2") as other:
            with pytest.raises(ServerError) as foreign:
                await other.request(ListAgents(id=0, shop="shop1"))
            assert foreign.value.code == "forbidden"


async def test_the_cli_agent_goes_online(server: RunningServer) -> None:
    """``imserver chat --role agent`` sets its status online (routing assigns it chats)
    and, when it quits, its last connection closing sets it offline."""
    async with server.connect("sup", "supervisor", "shop1") as sup:
        await sup.request(Subscribe(id=0, topics=[Topic.AGENTS]))
        command = [
            sys.executable,
            "-m",
            "imserver",
            "chat",
            "--url",
            server.url,
            "--secret",
            SECRET.decode(),
            "--data",
            str(server.data_dir),
            "--role",
            "agent",
            "--shop",
            "shop1",
            "cli-agent",
        ]
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    check=False,
                )
            )
            statuses: list[AgentStatus] = []
            with trio.fail_after(30):
                async for frame in sup.events:
                    if isinstance(frame, AgentEvent) and frame.agent == "cli-agent":
                        statuses.append(frame.status)
                        if frame.status is AgentStatus.ONLINE:
                            assert process.stdin is not None
                            await process.stdin.send_all(b"/quit\n")
                        if frame.status is AgentStatus.OFFLINE:
                            break
            assert statuses == [AgentStatus.ONLINE, AgentStatus.OFFLINE]
