"""WebSocket framing on the hot path: server frames built once, client frames
split without the library when they are the plain kind.

Theory of operation
-------------------
Server-to-client frames are not masked, so the bytes of a frame do not depend
on the connection: fan-out encodes an event once and every outbox gets the
same ``bytes`` object (``binary_frame``, built by the ``websockets`` library).

Client-to-server, nearly every frame is a complete, unfragmented, masked
binary frame of at most 64 KiB, and nearly every read holds whole frames.
``websockets`` parses each one with a generator-based reader: about a tenth
of the trio thread at 18,000 msg/s. ``split_plain_frames`` recognises that
common case only -- every frame of the chunk ``0x82`` (FIN, no RSV bits,
binary), masked, a 7- or 16-bit length within the limit, and the chunk ending
exactly at a frame end -- and returns the unmasked payloads (masks are
removed by the library's C ``apply_mask``). Anything else returns None and
the caller gives the chunk to the library, which validates and fails bad
input with the right close code. The two parsers never share a frame: the
caller uses this only while the library sits at a frame boundary
(``ends_on_frame_boundary`` tells whether a chunk given to it left it so).
"""

from __future__ import annotations

from typing import Final

from websockets.frames import Frame, Opcode

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the pure-Python build
    from websockets.utils import apply_mask

_PLAIN_BINARY: Final = 0x82
"""FIN, RSV1-3 clear, opcode 2 (binary)."""
_MASKED: Final = 0x80


def binary_frame(payload: bytes) -> bytes:
    """A complete (FIN) binary WebSocket frame carrying ``payload``."""
    return Frame(Opcode.BINARY, payload).serialize(mask=False)


def split_plain_frames(data: bytes, max_size: int) -> list[bytes] | None:
    """The payloads of ``data`` if it is nothing but whole plain client binary
    frames (see the module docstring), else None."""
    payloads = []
    end = len(data)
    at = 0
    while at < end:
        if end - at < 6 or data[at] != _PLAIN_BINARY:
            return None
        second = data[at + 1]
        if not second & _MASKED:
            return None
        length = second & 0x7F
        if length == 126:
            if end - at < 8:
                return None
            length = int.from_bytes(data[at + 2 : at + 4], "big")
            if length < 126:  # not the minimal encoding: let the library judge it
                return None
            head = at + 4
        elif length == 127:
            return None  # over 64 KiB: the library's business
        else:
            head = at + 2
        if length > max_size or head + 4 + length > end:
            return None
        payloads.append(apply_mask(data[head + 4 : head + 4 + length], data[head : head + 4]))
        at = head + 4 + length
    return payloads


def ends_on_frame_boundary(data: bytes) -> bool:
    """Whether ``data``, starting at a frame boundary, also ends on one (any
    kind of frame, valid or not: only the lengths are read)."""
    end = len(data)
    at = 0
    while at < end:
        if end - at < 2:
            return False
        second = data[at + 1]
        length = second & 0x7F
        head = at + 2
        if length == 126:
            if end - head < 2:
                return False
            length = int.from_bytes(data[head : head + 2], "big")
            head += 2
        elif length == 127:
            if end - head < 8:
                return False
            length = int.from_bytes(data[head : head + 8], "big")
            head += 8
        if second & _MASKED:
            head += 4
        at = head + length
    return at == end
