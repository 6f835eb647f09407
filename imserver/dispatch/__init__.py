"""Sharded, acked, at-least-once delivery of events to worker plugins."""

from ._dispatcher import Instance, WorkerDispatcher, WorkerPeer, group_key

__all__ = ["Instance", "WorkerDispatcher", "WorkerPeer", "group_key"]
