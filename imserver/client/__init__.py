"""Python client SDK (trio). See ``_trio`` for the theory of operation."""

from ._trio import Client, ConnectionClosed, PendingReply, ReconnectingClient, ServerError, connect

__all__ = [
    "Client",
    "ConnectionClosed",
    "PendingReply",
    "ReconnectingClient",
    "ServerError",
    "connect",
]
