"""One task that reads every plain-TCP connection: a level-triggered epoll set.

Theory of operation
-------------------
Under trio every ``receive_some`` (or ``wait_readable``) of a connection
re-arms that socket in trio's epoll (trio registers one-shot, so that is one
``epoll_ctl`` system call per wait), and every message wakes that
connection's reader task: a reschedule, a task switch and an ``Outcome`` per
message. Profiled at 13,000 msg/s this machinery was about a third of the
trio thread.

``ReadMux`` keeps its own epoll object with every idle connection registered
once, *level-triggered*, and one task waits (through trio, so the rest of
the program runs as usual) for that epoll's own descriptor to become
readable. Each round it polls the set without blocking and calls the
callback of every ready connection, synchronously: the callback reads once
(``os.read``, up to ``RECEIVE_CHUNK_BYTES``) and processes what it got. A
socket with more left is simply reported again next round (level-triggered),
so one busy client cannot starve the others, and nothing is re-armed. One
``epoll_ctl`` happens per connection when it starts or stops using the mux,
not per message; one task wake per round, not per message.

A callback that cannot finish synchronously (backpressure from a full shard
queue, the end of the connection) removes its descriptor and hands over to
its own session task, which ``add``s it again when it may read. A callback
must not raise; if one does anyway, its descriptor is removed and the
exception is logged, and the other connections carry on. TLS connections
keep a reader task each (their bytes must go through the SSL object).
"""

from __future__ import annotations

import contextlib
import logging
import select
from collections.abc import Callable

import trio

from ..limits import READ_MUX_EVENTS_PER_ROUND
from ..logs import event

log = logging.getLogger("imserver.gateway")


class ReadMux:
    """See the module docstring. ``run`` must be running for callbacks to fire."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}

    def __len__(self) -> int:
        return len(self._callbacks)

    def add(self, fd: int, on_readable: Callable[[], None]) -> None:
        """Call ``on_readable`` (in the mux task) whenever ``fd`` has data or EOF."""
        if self._epoll.closed:
            raise trio.ClosedResourceError("the read mux has stopped")
        self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = on_readable

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (idempotent). Call before closing it."""
        if self._callbacks.pop(fd, None) is not None:
            # fd closed already (the kernel forgot it), or the mux has stopped
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    async def run(self) -> None:
        epoll, callbacks = self._epoll, self._callbacks
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0, READ_MUX_EVENTS_PER_ROUND):
                    # Looked up per event: an earlier callback of this round may
                    # have removed this descriptor.
                    callback = callbacks.get(fd)
                    if callback is None:
                        continue
                    try:
                        callback()
                    except Exception as exc:  # a bug: isolate it to its connection
                        self.remove(fd)
                        event(
                            log, "read_callback_failed", level=logging.ERROR, fd=fd, error=repr(exc)
                        )
        finally:
            self._callbacks.clear()
            self._epoll.close()
