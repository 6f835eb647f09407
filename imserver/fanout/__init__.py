"""Fan-out of conversation events to online sessions."""

from ._hub import Hub, Peer

__all__ = ["Hub", "Peer"]
