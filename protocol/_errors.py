"""Stable error codes (inside Error frames) and WebSocket close codes.

Codes are part of the protocol: clients switch on them, so they never change
meaning. The human ``message`` next to a code is for logs and may change.
"""

import enum


class ErrorCode(enum.StrEnum):
    BAD_FRAME = "bad_frame"
    """The frame could not be decoded, or a field has the wrong type or range."""
    UNAUTHORIZED = "unauthorized"
    """No valid credentials: bad signature, expired, replayed, or frame before Hello."""
    FORBIDDEN = "forbidden"
    """Authenticated, but this user may not do this (another shop's conversation...)."""
    NOT_FOUND = "not_found"
    UNKNOWN_SHOP = "unknown_shop"
    """The request names a shop that is not registered on this server."""
    TOO_LARGE = "too_large"
    """A field is over its limit (text length, page size, member count)."""
    RATE_LIMITED = "rate_limited"
    """Too many frames or in-flight requests; retry after ``retry_after_ms``."""
    CONFLICT = "conflict"
    """The request contradicts current state (recall window passed, closed conversation...)."""
    UNAVAILABLE = "unavailable"
    """The server is overloaded or draining; safe to retry after ``retry_after_ms``."""
    UNSUPPORTED_VERSION = "unsupported_version"
    INTERNAL = "internal"
    """A bug on the server side. The request may be retried (sends are idempotent)."""


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses, and why."""

    NORMAL = 1000
    GOING_AWAY = 1001
    """Server shutting down (SIGTERM drain). Reconnect (elsewhere) and resume."""
    PROTOCOL_ERROR = 1002
    """WebSocket-level violation (bad framing), as detected by the WebSocket layer."""
    UNSUPPORTED_DATA = 1003
    """A text WebSocket message: this protocol is binary only."""
    POLICY_VIOLATION = 1008
    """Repeated abuse after error frames (rate limit ignored, bad frames in a row)."""
    MESSAGE_TOO_BIG = 1009
    """A WebSocket message over ``MAX_FRAME_BYTES``."""
    INTERNAL_ERROR = 1011
    BAD_HANDSHAKE = 4000
    """The first frame was not a valid Hello."""
    UNAUTHORIZED = 4001
    """Hello's token was refused (signature, expiry, replay). Get a new token."""
    UNSUPPORTED_VERSION = 4002
    """Hello's protocol version is not spoken here; see ``Error.detail``."""
    SLOW_CONSUMER = 4008
    """The client did not read fast enough and its outbound buffer overflowed.
    Nothing is lost: reconnect and resume from the last seq seen."""
    IDLE_TIMEOUT = 4009
    """No frame for ``IDLE_TIMEOUT_MS``."""
    SESSION_REPLACED = 4010
    """Another connection logged in with the same user and device id."""
