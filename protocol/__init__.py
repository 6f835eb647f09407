"""imserver wire protocol: msgpack frames over binary WebSocket messages, sans-IO.

The public API is re-exported here; the underscored modules are private.
See docs/PROTOCOL.md for the specification written for client authors.
"""

from ._codec import FrameError, decode_client_frame, decode_server_frame, encode
from ._connection import (
    MAX_REFUSALS_IN_A_ROW,
    ClientConnection,
    ClientState,
    ConnectionState,
    HelloReceived,
    Ignored,
    NoticeReceived,
    ProtocolError,
    Refused,
    RequestReceived,
    ServerConnection,
    ServerEvent,
    TokenBucket,
)
from ._errors import CloseCode, ErrorCode
from ._frames import *  # noqa: F403  (the frame catalogue is the API)
from ._frames import __all__ as _frame_names
from ._limits import *  # noqa: F403
from ._limits import MAX_SERVER_FRAME_BYTES, PROTOCOL_VERSION, SUPPORTED_VERSIONS

__all__ = [
    "MAX_REFUSALS_IN_A_ROW",
    "MAX_SERVER_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "ClientConnection",
    "ClientState",
    "CloseCode",
    "ConnectionState",
    "ErrorCode",
    "FrameError",
    "HelloReceived",
    "Ignored",
    "NoticeReceived",
    "ProtocolError",
    "Refused",
    "RequestReceived",
    "ServerConnection",
    "ServerEvent",
    "TokenBucket",
    "decode_client_frame",
    "decode_server_frame",
    "encode",
    *_frame_names,
]
