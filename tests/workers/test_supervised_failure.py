"""``imserver serve --workers`` with a plugin that cannot start: one JSON line per event
on stderr (the plugin's raw stderr output wrapped, no bare traceback), nothing but
the listening line on stdout, and ``/healthz`` saying ``degraded`` with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio

from tests.conftest import SECRET

ROOT = Path(__file__).resolve().parents[2]


async def _lines(
    stream: trio.abc.ReceiveStream, into: list[str], seen: trio.Event, until: str
) -> None:
    buffer = b""
    while chunk := await stream.receive_some(65_536):
        buffer += chunk
        *done, buffer = buffer.split(b"\n")
        for raw in done:
            line = raw.decode()
            into.append(line)
            if until in line:
                seen.set()


async def _get(port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some(65_536):
            data += chunk
    return data


async def test_a_worker_that_cannot_start_is_one_json_line_and_degraded_health(
    tmp_path: Path,
) -> None:
    config = tmp_path / "workers.yaml"
    config.write_text("tests.workers.broken:BrokenPlugin: {threshold: 7}\n", encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "imserver",
        "serve",
        "--data",
        str(tmp_path / "data"),
        "--port",
        "0",
        "--secret",
        SECRET.decode(),
        "--workers",
        "tests.workers.broken:BrokenPlugin",
        "--workers-config",
        str(config),
    ]
    err: list[str] = []
    exited = trio.Event()
    process = await trio.lowlevel.open_process(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_lines, process.stderr, err, exited, '"event":"worker_exited"')
            with trio.fail_after(60):
                first = b""
                while not first.endswith(b"\n"):
                    first += await process.stdout.receive_some(1)
                port = int(first.decode().rsplit(":", 1)[1].split("/")[0])
                await exited.wait()
            health = await _get(port, "/healthz")
            process.terminate()
            rest = b""
            while chunk := await process.stdout.receive_some(65_536):
                rest += chunk
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    assert first.startswith(b"imserver listening on ws://") and rest == b""
    head, body = health.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    lines = body.decode().splitlines()
    assert lines[0] == "degraded"
    assert lines[1].startswith("worker tests.workers.broken:BrokenPlugin: failing")
    assert "last exit 3" in lines[1] and "ValueError: bad setting threshold=7" in lines[1]
    records = [json.loads(line) for line in err if line]  # every line is JSON
    events = [r["event"] for r in records]
    assert "worker_started" in events and "worker_exited" in events
    failed = next(r for r in records if r["event"] == "worker_failed")
    assert failed["stage"] == "run" and failed["error"].startswith("ValueError: bad setting")
    outputs = [r for r in records if r["event"] == "worker_output"]
    traceback = [r for r in outputs if "Traceback" in r["text"]]
    assert len(traceback) == 1 and "KeyError" in traceback[0]["text"]  # one event, not lines
    assert traceback[0]["level"] == "error"
    assert any("start-up banner" in r["text"] for r in outputs)
