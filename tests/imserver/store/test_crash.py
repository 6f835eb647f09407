"""Crash safety: every write acknowledged before a SIGKILL is on disk, once."""

from __future__ import annotations

import os
import select
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

# Eight writer tasks append to their own conversation and print "<conv> <seq>"
# after each write() returns (= acknowledged). They never stop on their own.
CHILD = r"""
import sys
from pathlib import Path

import trio

from imserver.store import PutConversation, PutMessage, SqliteStore
from protocol import Conversation, ConvKind, ConvState, Message, Role, TextBody

WRITERS = 8


async def writer(store: SqliteStore, conv: str) -> None:
    seq = 0
    while True:
        seq += 1
        body = TextBody(text=f"{conv} message {seq}")
        message = Message(conv=conv, seq=seq, sender="u", sender_role=Role.CUSTOMER,
                          cmid=f"m{seq}", ts=seq, body=body)
        await store.write([PutMessage(message=message)])
        print(conv, seq, flush=True)


async def main(path: str) -> None:
    store = SqliteStore(Path(path))  # synchronous=FULL
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.write([
            PutConversation(conversation=Conversation(
                id=f"w{i}", kind=ConvKind.DIRECT, shop="s", state=ConvState.BOT))
            for i in range(WRITERS)
        ])
        for i in range(WRITERS):
            nursery.start_soon(writer, store, f"w{i}")


trio.run(main, sys.argv[1])
"""

ACKS_BEFORE_KILL = 400


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").iterdir():
            children = [int(c) for c in (task / "children").read_text().split()]
            found += children
            todo += children
    return found


@pytest.mark.slow
def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    db_path = tmp_path / "crash.db"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert child.stdout is not None
    lines: list[str] = []
    try:
        while len(lines) < ACKS_BEFORE_KILL:
            line = child.stdout.readline()
            if not line:
                break  # the child died on its own: reported below
            lines.append(line)
        # Its helper processes (the store's writer process among them) must not
        # outlive it: pidfds become readable when their processes end.
        helpers = [os.pidfd_open(pid) for pid in _descendants(child.pid)]
        assert helpers, "the store's writer process is missing"
        child.send_signal(signal.SIGKILL)  # mid-stream: writes are in flight
        rest, stderr = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert len(lines) >= ACKS_BEFORE_KILL, f"child failed:\n{stderr}"
    assert child.returncode == -signal.SIGKILL
    try:
        for pidfd in helpers:
            readable, _, _ = select.select([pidfd], [], [], 30)
            assert readable, "a helper process outlived the killed server"
    finally:
        for pidfd in helpers:
            os.close(pidfd)
    # Lines still in the pipe were acknowledged too; a torn last line is not.
    lines += [line for line in rest.splitlines(keepends=True) if line.endswith("\n")]
    acked = {(conv, int(seq)) for conv, seq in (line.split() for line in lines)}
    assert len(acked) == len(lines)

    # The -wal and -shm files are left behind; SQLite recovers on open.
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = conn.execute(
            "SELECT conv, seq, COUNT(*) FROM messages GROUP BY conv, seq"
        ).fetchall()
        last_seq = dict(conn.execute("SELECT id, last_seq FROM conversations").fetchall())
    finally:
        conn.close()
    counts = {(conv, seq): n for conv, seq, n in stored}
    missing = acked - counts.keys()
    assert not missing, f"acknowledged but lost: {sorted(missing)[:10]}"
    assert all(counts[key] == 1 for key in acked)
    # Whatever was committed is a gapless prefix per writer (each waits for
    # its previous write), consistent with the conversation row.
    for conv, top in last_seq.items():
        assert sorted(seq for c, seq in counts if c == conv) == list(range(1, top + 1))
