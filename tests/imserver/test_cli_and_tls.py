"""The CLI (token, export) as a user runs it, and TLS (wss://)."""

from __future__ import annotations

import csv
import io
import json
import ssl
import subprocess
import sys
from pathlib import Path

import trio
import trustme

from imserver.auth import TokenVerifier
from imserver.client import connect
from imserver.server import Server, ServerConfig
from protocol import OpenConversation, Role
from tests.conftest import SECRET, SHOPS, RunningServer


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imserver", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


def test_token_command_mints_a_verifiable_token(tmp_path: Path) -> None:
    out = _cli("token", "--data", str(tmp_path), "--role", "agent", "--shop", "s1", "a7").stdout
    secret = (tmp_path / "secret").read_bytes().strip()
    claims = TokenVerifier(secret).verify(out.strip())
    assert (claims.sub, claims.role, claims.shop) == ("a7", Role.AGENT, "s1")


async def test_export_writes_jsonl_and_csv(server: RunningServer, tmp_path: Path) -> None:
    async with server.connect("exporter") as client:
        conv = (await client.request(OpenConversation(id=0, shop="shopx"))).conversation.id
        for text in ("第一条", "second, with a comma"):
            await client.send_text(conv, text)
    data = str(server.data_dir)
    jsonl = await trio.to_thread.run_sync(
        lambda: _cli("export", "--data", data, "--conv", conv).stdout
    )
    rows = [json.loads(line) for line in jsonl.splitlines()]
    assert [(r["seq"], r["body"]["text"]) for r in rows] == [
        (1, "第一条"),
        (2, "second, with a comma"),
    ]
    out = tmp_path / "shop.csv"
    await trio.to_thread.run_sync(
        lambda: _cli(
            "export", "--data", data, "--shop", "shopx", "--format", "csv", "--out", str(out)
        )
    )
    table = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert [row["text"] for row in table] == ["第一条", "second, with a comma"]


async def test_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    config = ServerConfig(
        data_dir=tmp_path / "d", secret=SECRET, port=0, shops=SHOPS, cert=cert_file, key=key_file
    )
    srv = Server(config)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(srv.serve)
        assert url.startswith("wss://")
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        running = RunningServer(server=srv, url=url, data_dir=config.data_dir)
        async with connect(url, running.token("tls-user"), ssl_context=client_ctx) as client:
            info = await client.request(OpenConversation(id=0, shop="s"))
            sent = await client.send_text(info.conversation.id, "over TLS")
            assert sent.seq == 1
        srv.stop()
