"""Whole-process guarantees: kill -9 and SIGTERM never lose or duplicate an acked message."""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from imserver.client import ConnectionClosed, ServerError
from protocol import History, HistoryPage, OpenConversation, Send, Sent, TextBody
from tests.conftest import ServerProcess, start_server_process

SENDERS = 6


async def _storm(
    proc: ServerProcess,
    acked: dict[str, tuple[str, int]],
    convs: dict[str, str],
    enough: trio.Event,
    threshold: int,
) -> None:
    """Each sender pipelines sends until its connection dies; records what was acked."""

    async def sender(name: str) -> None:
        try:
            async with proc.connect(name) as client:
                conv = (await client.request(OpenConversation(id=0, shop="shop1"))).conversation.id
                convs[name] = conv
                i = 0
                while True:
                    batch = []
                    for _ in range(20):
                        cmid = f"{name}-{i}"
                        batch.append(
                            (
                                cmid,
                                await client.start_request(
                                    Send(id=0, conv=conv, cmid=cmid, body=TextBody(text=cmid))
                                ),
                            )
                        )
                        i += 1
                    for cmid, pending in batch:
                        try:
                            sent: Sent = await pending.result()
                        except ServerError:
                            continue  # refused (rate limit, draining): not acked, may retry
                        acked[cmid] = (conv, sent.seq)
                    if len(acked) >= threshold:
                        enough.set()
                    await trio.sleep(0.05)  # stay near the per-connection rate
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return

    async with trio.open_nursery() as nursery:
        for n in range(SENDERS):
            nursery.start_soon(sender, f"buyer{n}")


async def _verify(
    proc: ServerProcess, acked: dict[str, tuple[str, int]], convs: dict[str, str]
) -> None:
    async with proc.connect("auditor", "admin", "*") as admin:
        for conv in set(convs.values()):
            messages = []
            after = 0
            while True:
                page: HistoryPage = await admin.request(
                    History(id=0, conv=conv, after=after, limit=200)
                )
                messages += page.messages
                if not page.has_more:
                    break
                after = page.messages[-1].seq
            seqs = [m.seq for m in messages]
            assert seqs == list(range(1, len(seqs) + 1)), "gap or reorder in seqs"
            cmids = [m.cmid for m in messages]
            assert len(cmids) == len(set(cmids)), "a message was stored twice"
            stored = {m.cmid: m.seq for m in messages}
            for cmid, (c, seq) in acked.items():
                if c == conv:
                    assert stored.get(cmid) == seq, f"acked {cmid} lost or moved"


async def _storm_then_signal(
    data: Path, threshold: int, sig: signal.Signals
) -> tuple[ServerProcess, dict[str, tuple[str, int]], dict[str, str]]:
    """Run a send storm against a server process until ``threshold`` sends are
    acked, then send it ``sig`` and wait for it to exit."""
    acked: dict[str, tuple[str, int]] = {}
    convs: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        proc = await start_server_process(data, nursery)
        enough = trio.Event()
        nursery.start_soon(_storm, proc, acked, convs, enough, threshold)
        with trio.fail_after(60):
            await enough.wait()
        proc.process.send_signal(sig)
        with trio.fail_after(30):
            await proc.process.wait()
    assert len(acked) >= threshold
    return proc, acked, convs


async def test_kill_9_during_send_storm_loses_nothing_acked(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, acked, convs = await _storm_then_signal(data, 400, signal.SIGKILL)
    assert proc.process.returncode == -signal.SIGKILL
    async with trio.open_nursery() as nursery:
        proc2 = await start_server_process(data, nursery)
        await _verify(proc2, acked, convs)
        # Retrying every send with its cmid stores nothing twice.
        async with proc2.connect("buyer0") as client:
            conv = convs["buyer0"]
            for cmid, (c, seq) in list(acked.items())[:50]:
                if c == conv:
                    again: Sent = await client.send(conv, TextBody(text=cmid), cmid=cmid)
                    assert again.duplicate and again.seq == seq
        await _verify(proc2, acked, convs)
        proc2.process.send_signal(signal.SIGTERM)


async def test_sigterm_drains_without_loss(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, acked, convs = await _storm_then_signal(data, 300, signal.SIGTERM)
    assert proc.process.returncode == 0
    async with trio.open_nursery() as nursery:
        proc2 = await start_server_process(data, nursery)
        await _verify(proc2, acked, convs)
        proc2.process.send_signal(signal.SIGTERM)


async def test_second_sigterm_during_drain_still_exits_cleanly(tmp_path: Path) -> None:
    """A peer that never answers our close keeps the drain in its linger; a
    second SIGTERM then (an impatient orchestrator) must not kill the process."""
    from urllib.parse import urlsplit

    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Message, Request

    from protocol import PROTOCOL_VERSION, ClientConnection, Hello, Welcome

    async with trio.open_nursery() as nursery:
        proc = await start_server_process(tmp_path / "data", nursery)
        url = urlsplit(proc.url)
        assert url.hostname is not None and url.port is not None
        stream = await trio.open_tcp_stream(url.hostname, url.port)
        ws, conn = WSConnection(ConnectionType.CLIENT), ClientConnection()
        await stream.send_all(ws.send(Request(host=url.netloc, target=url.path)))

        async def until(kind: type) -> object:
            with trio.fail_after(10):
                while True:
                    for ev in ws.events():
                        item = conn.receive(bytes(ev.data)) if isinstance(ev, BytesMessage) else ev
                        if isinstance(item, kind):
                            return item
                    ws.receive_data(await stream.receive_some())

        async with stream:
            await until(AcceptConnection)
            await stream.send_all(
                ws.send(
                    Message(
                        data=conn.hello(
                            Hello(v=PROTOCOL_VERSION, token=proc.token("quiet"), device="d")
                        )
                    )
                )
            )
            await until(Welcome)
            proc.process.send_signal(signal.SIGTERM)
            close = await until(CloseConnection)
            assert isinstance(close, CloseConnection) and close.code == 1001  # draining now
            proc.process.send_signal(signal.SIGTERM)  # and we never answer the close
            with trio.fail_after(30):
                await proc.process.wait()
    assert proc.process.returncode == 0
