"""Operating the server: one server per data dir, private files, no secret on a
command line, one-line start-up errors, honest health, and running out of
descriptors (issue 10, findings 6-9). Real subprocesses, real files."""

from __future__ import annotations

import os
import resource
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from imserver.auth import mint_token
from imserver.client import ServerError, connect
from imserver.server import Server, ServerConfig, load_or_create_secret
from protocol import OpenConversation, Ping, Pong, Sent, TextBody
from tests.conftest import SECRET, RunningServer

SERVE = [sys.executable, "-m", "imserver", "serve", "--port", "0", "--log-level", "warning"]
POLL_S = 0.05


async def _until(condition: Callable[[], bool], bound_s: float, what: str) -> None:
    """Poll a cheap local ``condition`` (nothing to wait on) for at most ``bound_s``."""
    for _ in range(int(bound_s / POLL_S) + 1):
        if condition():
            return
        await trio.sleep(POLL_S)
    assert condition(), f"{what}: not within {bound_s} s"


async def _http(url: str, path: str) -> bytes:
    parts = urlsplit(url)
    stream = await trio.open_tcp_stream(parts.hostname or "", parts.port or 0)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
        return data


async def _run(
    args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a command that must exit on its own, quickly."""
    with trio.fail_after(30):
        return await trio.run_process(
            args, capture_stdout=True, capture_stderr=True, check=False, env=env
        )


class Proc:
    def __init__(self, process: trio.Process, url: str) -> None:
        self.process = process
        self.url = url

    @property
    def pid(self) -> int:
        return self.process.pid


@asynccontextmanager
async def _serve_process(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> AsyncIterator[Proc]:
    """``imserver serve ARGS`` as a child; yields once it listens; SIGTERM at the end."""
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                SERVE + args,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
                env=env,
                preexec_fn=preexec_fn,
            )
        )
        assert process.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1)
                assert chunk, "the server exited before listening"
                line += chunk
        try:
            yield Proc(process, line.decode().rsplit(" ", 1)[1].strip())
        finally:
            process.send_signal(signal.SIGTERM)


def _one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    err = result.stderr.decode()
    assert result.returncode != 0, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# -- finding 8: one server per data dir


async def test_a_second_server_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with _serve_process(["--data", str(data), "--secret", SECRET.decode()]) as first:
        second = await _run([*SERVE, "--data", str(data), "--secret", SECRET.decode()])
        line = _one_line_error(second)
        assert "in use" in line and str(first.pid) in line
        # The first one is untouched.
        assert (await _http(first.url, "/healthz")).startswith(b"HTTP/1.1 200")


# -- finding 9: start-up errors are one line


def _corrupt_database(data: Path) -> None:
    """A real database with one page overwritten, as a bad disk would."""
    data.mkdir()
    db = sqlite3.connect(data / "imserver.db")
    db.execute("CREATE TABLE t (x)")
    db.executemany("INSERT INTO t VALUES (randomblob(300))", [()] * 3000)
    db.commit()
    db.close()
    with open(data / "imserver.db", "r+b") as f:
        f.seek(4096 * 5)
        f.write(b"\xff" * 4096)


async def test_start_up_errors_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    _corrupt_database(tmp_path / "corrupt")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "imserver.db").write_bytes(os.urandom(20_000))
    (tmp_path / "a-file").write_bytes(b"")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    secret = ["--secret", SECRET.decode()]
    cases = {
        "corrupt": ["--data", str(tmp_path / "corrupt")],
        "garbage": ["--data", str(tmp_path / "garbage")],
        "port in use": ["--data", str(tmp_path / "p"), "--port", str(taken.getsockname()[1])],
        "not a dir": ["--data", str(tmp_path / "a-file" / "data")],
        "short secret": ["--data", str(tmp_path / "s"), "--secret", "too-short"],
        "bad cert": [
            "--data",
            str(tmp_path / "c"),
            "--cert",
            str(tmp_path / "no.pem"),
            "--key",
            str(tmp_path / "no.key"),
        ],
    }
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def run(name: str, args: list[str]) -> None:
        results[name] = await _run([*SERVE, *secret, *args])  # a case's own flags win

    with taken:
        async with trio.open_nursery() as nursery:
            for name, args in cases.items():
                nursery.start_soon(run, name, args)
    lines = {name: _one_line_error(result) for name, result in results.items()}
    assert "corrupt" in lines["corrupt"] and "malformed" in lines["corrupt"]
    assert "corrupt" in lines["garbage"]
    assert "Address already in use" in lines["port in use"]
    assert "no.pem" in lines["bad cert"]
    assert "a-file" in lines["not a dir"]
    assert "secret" in lines["short secret"]


# -- finding 7: private files, no secret on a command line


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_data_dir_files_are_private(server: RunningServer, tmp_path: Path) -> None:
    async with server.connect("ann") as ann:  # a commit: the WAL and its index exist
        await ann.request(OpenConversation(id=0, shop="shop1"))
    data = server.data_dir
    assert _mode(data) == 0o700
    for name in ("imserver.db", "imserver.db-wal", "imserver.db-shm", "lock"):
        assert _mode(data / name) == 0o600, name
    fresh = tmp_path / "fresh"
    load_or_create_secret(fresh)
    assert _mode(fresh) == 0o700 and _mode(fresh / "secret") == 0o600


async def test_an_older_data_dir_is_tightened(tmp_path: Path) -> None:
    data = tmp_path / "old"
    data.mkdir()
    for name in ("imserver.db", "secret"):
        (data / name).write_bytes(b"" if name.endswith(".db") else b"s" * 32)
        os.chmod(data / name, 0o644)
    assert load_or_create_secret(data) == b"s" * 32
    srv = Server(ServerConfig(data_dir=data, secret=SECRET, port=0))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        srv.stop()
    assert _mode(data / "imserver.db") == 0o600 and _mode(data / "secret") == 0o600


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat_line = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat_line.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


async def test_workers_get_the_secret_without_a_command_line(tmp_path: Path) -> None:
    env = {**os.environ, "IMSERVER_SECRET": SECRET.decode()}
    async with _serve_process(
        ["--data", str(tmp_path / "data"), "--workers", "bot"], env=env
    ) as proc:

        def worker_joined() -> bool:
            return any(b"worker" in _cmdline(p) for p in _descendants(proc.pid))

        await _until(worker_joined, 30, "the bot worker started")
        # It authenticated with a token minted from the secret it was given.
        for _ in range(int(30 / POLL_S)):
            metrics = await _http(proc.url, "/metrics")
            if b"\nimserver_sessions 1.0" in metrics:
                break
            await trio.sleep(POLL_S)
        assert b"\nimserver_sessions 1.0" in metrics
        children = _descendants(proc.pid)
        assert children
        for pid in [proc.pid, *children]:
            assert SECRET not in _cmdline(pid), _cmdline(pid)


# -- finding 9: health reflects the store


async def test_health_is_503_while_the_store_writer_is_dead(server: RunningServer) -> None:
    store = server.server.store
    assert store is not None and store.writer is not None and store.writer.pid is not None
    assert (await _http(server.url, "/healthz")).startswith(b"HTTP/1.1 200")
    os.kill(store.writer.pid, signal.SIGKILL)
    answers: list[bytes] = []

    async def probe() -> bool:
        answers.append(await _http(server.url, "/healthz"))
        return answers[-1].startswith(b"HTTP/1.1 503")

    for _ in range(int(10 / POLL_S)):
        if await probe():
            break
        await trio.sleep(POLL_S)
    assert answers[-1].startswith(b"HTTP/1.1 503"), answers[-1]
    assert answers[-1].endswith(b"store: writer process died\n")
    # The probe had a new writer started: health recovers without any traffic,
    # and messages are stored again.
    for _ in range(int(10 / POLL_S)):
        if not await probe():
            break
        await trio.sleep(POLL_S)
    assert answers[-1].startswith(b"HTTP/1.1 200"), answers[-1]
    async with server.connect("bea") as bea:
        conv = (await bea.request(OpenConversation(id=0, shop="shop1"))).conversation.id
        sent: Sent = await bea.send(conv, TextBody(text="still here"))
        assert sent.seq >= 1


@asynccontextmanager
async def _tmpfs(path: Path, size: str) -> AsyncIterator[Path]:
    """A small filesystem of its own, so that "disk full" is real (ENOSPC)."""
    await trio.Path(path).mkdir()
    mounted = await trio.run_process(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        check=False,
        capture_stderr=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        await trio.run_process(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> None:
    """Write zeros until the filesystem says no."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)


async def test_health_is_503_while_the_disk_is_full_and_recovers(tmp_path: Path) -> None:
    async with _tmpfs(tmp_path / "small", "4m") as data:
        srv = Server(ServerConfig(data_dir=data, secret=SECRET, port=0, shops=("shop1",)))
        async with trio.open_nursery() as nursery:
            url = await nursery.start(srv.serve)
            async with connect(
                url, mint_token(SECRET, user="cy", role="customer"), device="d"
            ) as cy:
                conv = (await cy.request(OpenConversation(id=0, shop="shop1"))).conversation.id
                # Fill the filesystem with something else.
                filler = data / "filler"
                await trio.to_thread.run_sync(_fill, filler)
                health = b""
                for i in range(200):  # the WAL grows until a commit finds no room
                    with suppress(ServerError):  # refused: not stored
                        await cy.send(conv, TextBody(text=f"{i} " + "x" * 4000))
                    health = await _http(url, "/healthz")
                    if health.startswith(b"HTTP/1.1 503"):
                        break
                assert health.startswith(b"HTTP/1.1 503") and health.endswith(b"disk full\n"), (
                    health
                )
                await trio.Path(filler).unlink()
                for _ in range(20):
                    try:
                        await cy.send(conv, TextBody(text="room again"))
                        break
                    except Exception:
                        await trio.sleep(POLL_S)
                assert (await _http(url, "/healthz")).startswith(b"HTTP/1.1 200")
            srv.stop()


# -- finding 6: out of descriptors


NOFILE = 96


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


async def test_out_of_descriptors_backs_off_and_keeps_serving(tmp_path: Path) -> None:
    async with _serve_process(
        ["--data", str(tmp_path / "data"), "--secret", SECRET.decode()], preexec_fn=_low_nofile
    ) as proc:
        async with connect(
            proc.url, mint_token(SECRET, user="early", role="customer"), device="e"
        ) as early:
            # More connections than the server has descriptors.
            parts = urlsplit(proc.url)
            flood: list[trio.SocketStream] = []
            try:
                for _ in range(NOFILE + 30):
                    flood.append(await trio.open_tcp_stream(parts.hostname or "", parts.port or 0))
                    await flood[-1].send_all(
                        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: "
                        b"dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\n\r\n"
                    )
                # The client that was in before still works, and so does /healthz.
                pong = await early.request(Ping(id=0))
                assert isinstance(pong, Pong)
                assert (await _http(proc.url, "/healthz")).startswith(b"HTTP/1.1 200")
            finally:
                for stream in flood:
                    await stream.aclose()
            # Descriptors free again: new clients get in.
            with trio.fail_after(20):
                while True:
                    try:
                        async with connect(
                            proc.url, mint_token(SECRET, user="late", role="customer"), device="l"
                        ) as late:
                            assert isinstance(await late.request(Ping(id=0)), Pong)
                            break
                    except Exception:
                        await trio.sleep(POLL_S)
        metrics = (await _http(proc.url, "/metrics")).decode()
        proc.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await proc.process.wait()
        assert proc.process.stderr is not None
        log = b""
        while chunk := await proc.process.stderr.receive_some(65536):
            log += chunk
    # Logged once per episode, not once per failed accept.
    backoffs = next(
        float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("imserver_accept_backoffs_total ")
    )
    episodes = log.count(b'"accept_exhausted"')
    assert 1 <= episodes < backoffs
    assert log.count(b'"accept_recovered"') >= episodes - 1
