"""One WebSocket binary frame, built once and shared by every recipient.

Server-to-client frames are not masked, so the bytes of a frame do not depend
on the connection: fan-out encodes an event once and every outbox gets the
same ``bytes`` object. The framing itself is wsproto's.
"""

from typing import Final

from wsproto.frame_protocol import FrameProtocol

_framer: Final = FrameProtocol(client=False, extensions=[])


def binary_frame(payload: bytes) -> bytes:
    """A complete (FIN) binary WebSocket frame carrying ``payload``."""
    return bytes(_framer.send_data(payload, fin=True))
