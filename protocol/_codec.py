"""Encoding and the two typed decoders (one per direction).

A decode both parses and validates (see ``_frames``). Failures are turned into
a ``FrameError`` carrying the stable error code and, when the bytes were at
least a msgpack map with an integer ``id``, the request id, so that even a
malformed request gets its one reply.
"""

from __future__ import annotations

from typing import Final

import msgspec

from ._errors import ErrorCode
from ._frames import ClientFrameType, ServerFrameType


class FrameError(Exception):
    """Bytes that are not a valid frame."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        request_id: int | None,
        hello_version: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.hello_version = hello_version
        """For an invalid Hello: the version it claims, so that a future-shaped
        Hello is told ``unsupported_version`` rather than ``bad_frame``."""


class _HelloProbe(msgspec.Struct):
    t: str | None = None
    v: int | None = None


class _IdProbe(msgspec.Struct):
    """Reads just the ``id`` of a frame that failed validation."""

    id: int | None = None


_encoder: Final = msgspec.msgpack.Encoder()
_client_decoder: Final[msgspec.msgpack.Decoder[ClientFrameType]] = msgspec.msgpack.Decoder(
    ClientFrameType
)
_server_decoder: Final[msgspec.msgpack.Decoder[ServerFrameType]] = msgspec.msgpack.Decoder(
    ServerFrameType
)
_probe_decoder: Final = msgspec.msgpack.Decoder(_IdProbe)


def encode(frame: msgspec.Struct) -> bytes:
    """Encode any frame (or record) to msgpack."""
    return _encoder.encode(frame)


def _classify(exc: msgspec.DecodeError) -> ErrorCode:
    # msgspec reports a violated max_length as "... of length <= N".
    text = str(exc)
    if "length <=" in text:
        return ErrorCode.TOO_LARGE
    return ErrorCode.BAD_FRAME


def _probe_id(data: bytes) -> int | None:
    try:
        request_id = _probe_decoder.decode(data).id
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None
    if request_id is None or not 0 <= request_id < 2**32:
        return None
    return request_id


def _probe_hello(data: bytes) -> int | None:
    try:
        probe = _hello_probe_decoder.decode(data)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None
    return probe.v if probe.t == "hello" else None


_hello_probe_decoder: Final = msgspec.msgpack.Decoder(_HelloProbe)


def decode_client_frame(data: bytes) -> ClientFrameType:
    """Decode one frame sent by a client. Raises ``FrameError``."""
    try:
        return _client_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise FrameError(_classify(exc), str(exc), _probe_id(data), _probe_hello(data)) from None
    except (msgspec.DecodeError, ValueError) as exc:  # not msgpack at all, or trailing bytes
        raise FrameError(ErrorCode.BAD_FRAME, f"invalid msgpack: {exc}", None) from None
    except RecursionError:  # msgspec bounds nesting depth; a 64 KiB frame can nest deeper
        raise FrameError(ErrorCode.BAD_FRAME, "msgpack nested too deeply", None) from None


def decode_server_frame(data: bytes) -> ServerFrameType:
    """Decode one frame sent by a server. Raises ``FrameError``."""
    try:
        return _server_decoder.decode(data)
    except (msgspec.DecodeError, ValueError) as exc:
        raise FrameError(ErrorCode.BAD_FRAME, str(exc), None) from None
    except RecursionError:
        raise FrameError(ErrorCode.BAD_FRAME, "msgpack nested too deeply", None) from None
