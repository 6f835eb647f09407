"""The text payload of load messages: a stamp (step, send time) padded to a fixed size.

Theory of operation
-------------------
A load message's ``TextBody.text`` is ``b1|<step>|<sent_ns>|`` followed by
filler up to ``PAYLOAD_CHARS`` characters (200, the size in the bench
notes). ``sent_ns`` is the *intended* send time on ``time.monotonic_ns()``
(CLOCK_MONOTONIC, shared by every process of the host), so a receiver in
another process computes send->delivery with no clock sync, and a sender
that falls behind schedule is charged for it (no coordinated omission).
``step`` lets a late message be attributed to the load step that sent it.
The locustfile uses the same format.
"""

from __future__ import annotations

from typing import Final, NamedTuple

PAYLOAD_CHARS: Final = 200
MAGIC: Final = "b1|"
_FILL: Final = "0123456789abcdefghijklmnopqrstuvwxyz" * 200


class Stamp(NamedTuple):
    step: int
    sent_ns: int


def make_text(step: int, sent_ns: int, size: int = PAYLOAD_CHARS) -> str:
    head = f"{MAGIC}{step}|{sent_ns}|"
    return head + _FILL[: max(0, size - len(head))]


def parse_text(text: str) -> Stamp | None:
    """The stamp of a load message, or None for any other text."""
    if not text.startswith(MAGIC):
        return None
    parts = text.split("|", 3)
    if len(parts) < 4:
        return None
    try:
        return Stamp(int(parts[1]), int(parts[2]))
    except ValueError:
        return None
