"""The worked session in docs/PROTOCOL.md (section 17) is a set of test
vectors: every hex dump decodes with the reference decoder to the JSON line
under it and encodes back to the same bytes, and its length is the one stated."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest

from protocol import FrameError, decode_client_frame, decode_server_frame, encode

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
_DUMP = re.compile(
    r"#### (\S+)\. ([^\n]*?)\((client|server) → (?:server|client), (\d+) bytes\)\n\n"
    r"```text\n(.*?)```\n\n```json\n(.*?)\n```",
    re.S,
)


def _vectors() -> list[tuple[str, str, str, int, bytes, str]]:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## 17. Worked session") :]
    found = []
    for m in _DUMP.finditer(section):
        name, title, side, size, dump, js = m.groups()
        data = bytes.fromhex("".join(line[6:55] for line in dump.splitlines()))
        found.append((name, title, side, int(size), data, js))
    return found


def test_the_worked_session_has_its_vectors() -> None:
    assert len(_vectors()) >= 16


@pytest.mark.parametrize(("name", "title", "side", "size", "data", "js"), _vectors())
def test_worked_session_vector(
    name: str, title: str, side: str, size: int, data: bytes, js: str
) -> None:
    assert len(data) == size
    assert msgspec.msgpack.decode(data) == json.loads(js)
    decode = decode_client_frame if side == "client" else decode_server_frame
    if "over the maximum" in title:  # shown to be refused
        with pytest.raises(FrameError):
            decode(data)
        return
    assert encode(decode(data)) == data
