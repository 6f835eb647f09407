"""One WebSocket binary frame, built once and shared by every recipient.

Server-to-client frames are not masked, so the bytes of a frame do not depend
on the connection: fan-out encodes an event once and every outbox gets the
same ``bytes`` object. The framing itself is the ``websockets`` library's.
"""

from websockets.frames import Frame, Opcode


def binary_frame(payload: bytes) -> bytes:
    """A complete (FIN) binary WebSocket frame carrying ``payload``."""
    return Frame(Opcode.BINARY, payload).serialize(mask=False)
