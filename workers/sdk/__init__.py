"""Worker SDK: write a plugin class, run it in its own process (asyncio + uvloop)."""

from ._client import AsyncClient, Disconnected, RequestFailed
from ._discovery import GROUP, available, load
from ._plugin import Plugin, WorkerContext
from ._runner import HANDLER_TIMEOUT_S, MAX_ATTEMPTS, WorkerRunner

__all__ = [
    "GROUP",
    "HANDLER_TIMEOUT_S",
    "MAX_ATTEMPTS",
    "AsyncClient",
    "Disconnected",
    "Plugin",
    "RequestFailed",
    "WorkerContext",
    "WorkerRunner",
    "available",
    "load",
]
