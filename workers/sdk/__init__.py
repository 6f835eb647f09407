"""Worker SDK: write a plugin class, run it in its own process (asyncio + uvloop)."""

from ._client import AsyncClient, Disconnected, RequestFailed
from ._discovery import GROUP, available, load
from ._plugin import Plugin, WorkerContext
from ._runner import (
    HANDLER_TIMEOUT_S,
    MAX_ATTEMPTS,
    RECONNECT_BACKOFF_BASE_S,
    RECONNECT_BACKOFF_MAX_S,
    RECONNECT_JITTER,
    WorkerRunner,
    reconnect_delay,
)

__all__ = [
    "GROUP",
    "HANDLER_TIMEOUT_S",
    "MAX_ATTEMPTS",
    "RECONNECT_BACKOFF_BASE_S",
    "RECONNECT_BACKOFF_MAX_S",
    "RECONNECT_JITTER",
    "AsyncClient",
    "Disconnected",
    "Plugin",
    "RequestFailed",
    "WorkerContext",
    "WorkerRunner",
    "available",
    "load",
    "reconnect_delay",
]
