"""The store's writer process: SQLite transactions away from the server's GIL.

Theory of operation
-------------------
Transactions used to run in a writer thread of the server. The SQLite work
proper runs without the GIL, but binding parameters, building rows and every
return from ``sqlite3_step`` need it, and under load the trio thread holds
it most of the time: the two threads convoyed. Measured at 13,000 msg/s:
delivery p50 150-180 ms with the writer in-process, 21 ms with a store that
did nothing. So the transactions run in a child process, with its own
interpreter and GIL, on the other core.

``WriterProcess`` is the parent's end, used by the store's committer task in
the trio thread. The two ends share one long-lived socket pair carrying
length-prefixed msgpack frames (a 4-byte big-endian length, then the
bytes). ``await transact(works)`` writes one batch -- the same ops and prune
steps the store would have committed in-process -- as one frame and waits,
in trio, until the socket is readable with the child's answer: one outcome
per work (a result, or the error it raised, type and text, rebuilt as the
same ``sqlite3`` exception class in the parent), the ids of its ``PutEvent``
ops, and the stats of the committed transactions. No thread sits between
the trio loop and the pipe: the answer wakes the loop through the same epoll
set as a client socket (a thread cost a condition-variable wake, a GIL
hand-over and a ``run_sync_soon`` wake-up socket per batch; on a 2-core VM
the difference in server CPU per message was within the noise, 5 %, see
bench/RESULTS.md: it is one thread and two wake-ups fewer, not a speed-up).
The child runs
``_sqlite._transact`` (one transaction, and on failure each work alone) on
its own connection with the same pragmas.

Processes come from a ``forkserver`` (fork would copy the trio threads'
state; spawn would pay a whole interpreter start per store). The child asks
the kernel to kill it when its parent dies (``PR_SET_PDEATHSIG`` on Linux),
and it exits at the end of its socket, so it never outlives the server by
more than the transaction it was committing -- and a transaction killed half
way is rolled back by SQLite. A batch whose answer never comes (the child
died) fails with ``WriterDied``; the store starts a new child for the next
batch. Whether the lost batch committed is unknown, as after any failed
write: the actors reload their state from the database before going on.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import signal
import socket
import sqlite3
import struct
import sys
from typing import Final

import msgspec
import trio

from ._base import PutEvent, WriteOp

PR_SET_PDEATHSIG: Final = 1
_HEADER: Final = struct.Struct("!I")
"""A frame's length prefix."""
_RECEIVE_BYTES: Final = 65_536


class PruneWork(msgspec.Struct, frozen=True, kw_only=True):
    table: str
    cutoff: int
    limit: int


WireWork = list[WriteOp] | PruneWork


class _Batch(msgspec.Struct, array_like=True):
    works: list[WireWork]


class _Outcome(msgspec.Struct, array_like=True):
    result: int = 0
    error: tuple[str, str] | None = None
    """(sqlite3 exception class name, message)"""
    event_ids: list[int] = []


class _Answer(msgspec.Struct, array_like=True):
    outcomes: list[_Outcome]
    stats: list[tuple[float, int, int]]


class WriterDied(sqlite3.OperationalError):
    """The writer process ended before answering; the batch may or may not
    have committed."""


_encoder: Final = msgspec.msgpack.Encoder()
_batch_decoder: Final = msgspec.msgpack.Decoder(_Batch)
_answer_decoder: Final = msgspec.msgpack.Decoder(_Answer)


def _rebuild(error: tuple[str, str]) -> Exception:
    name, message = error
    cls = getattr(sqlite3, name, None)
    if isinstance(cls, type) and issubclass(cls, sqlite3.Error):
        return cls(message)
    return sqlite3.OperationalError(f"{name}: {message}")


def _frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


class WriterProcess:
    """The parent's end; used by one task at a time (the store's committer)."""

    def __init__(self, path: str, synchronous: str, busy_timeout_s: float) -> None:
        self._args = (path, synchronous, busy_timeout_s)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._sock: socket.socket | None = None
        self._stream: trio.SocketStream | None = None
        self._buffer = bytearray()

    @property
    def pid(self) -> int | None:
        """The current child's process id (None: not running)."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the child now (else the first ``transact`` does); blocks, so
        call it from a thread."""
        if self._sock is None:
            context = multiprocessing.get_context("forkserver")
            # Before the fork server's first start: children then fork with the
            # store's modules already imported (milliseconds, not an import each).
            context.set_forkserver_preload(["imserver.store._sqlite"])
            ours, theirs = socket.socketpair()
            process = context.Process(
                target=_child_main,
                args=(theirs, *self._args),
                name="imserver-store-writer",
                daemon=True,
            )
            try:
                process.start()
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            self._process, self._sock = process, ours

    async def transact(
        self, works: list[WireWork]
    ) -> tuple[list[int | Exception], list[list[int]], list[tuple[float, int, int]]]:
        """Commit ``works`` in the child: (result or error, event ids) per work,
        and the stats of the committed transactions. Not cancellable half way:
        call it shielded (a batch is never left without its answer)."""
        if self._sock is None:
            await trio.to_thread.run_sync(self.start)
        if self._stream is None:
            assert self._sock is not None
            self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(self._sock))
        try:
            await self._stream.send_all(_frame(_encoder.encode(_Batch(works))))
            answer = _answer_decoder.decode(await self._receive_frame(self._stream))
        except (EOFError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await self.aclose()
            died = WriterDied(f"the store's writer process ended: {exc!r}")
            return [died] * len(works), [[] for _ in works], []
        results: list[int | Exception] = [
            _rebuild(o.error) if o.error is not None else o.result for o in answer.outcomes
        ]
        return results, [o.event_ids for o in answer.outcomes], answer.stats

    async def _receive_frame(self, stream: trio.SocketStream) -> bytes:
        buffer = self._buffer
        while True:
            if len(buffer) >= _HEADER.size:
                end = _HEADER.size + _HEADER.unpack_from(buffer)[0]
                if len(buffer) >= end:
                    frame = bytes(buffer[_HEADER.size : end])
                    del buffer[:end]
                    return frame
            chunk = await stream.receive_some(_RECEIVE_BYTES)
            if not chunk:
                raise EOFError("the writer process closed its socket")
            buffer += chunk

    async def aclose(self) -> None:
        """Let the child finish and exit (it commits nothing more)."""
        sock, stream, process = self._sock, self._stream, self._process
        self._sock = self._stream = self._process = None
        self._buffer.clear()
        if stream is not None:
            await stream.aclose()  # the child's recv sees EOF and exits
        elif sock is not None:
            sock.close()
        if process is not None:
            await trio.to_thread.run_sync(_reap, process)


def _reap(process: multiprocessing.process.BaseProcess) -> None:
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _receive_exactly(sock: socket.socket, size: int) -> bytes | None:
    """``size`` bytes, or None at the end of the stream."""
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(data)


def _child_main(sock: socket.socket, path: str, synchronous: str, busy_timeout_s: float) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop
    from ._sqlite import _PruneStep, _transact, _Work  # here: _sqlite imports this module

    db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
    try:
        db.execute(f"PRAGMA synchronous = {synchronous}")  # one of a fixed set
        db.execute("PRAGMA foreign_keys = ON")
        while True:
            try:
                header = _receive_exactly(sock, _HEADER.size)
                payload = header and _receive_exactly(sock, _HEADER.unpack(header)[0])
            except OSError:
                return  # the parent died
            if payload is None:
                return  # the parent closed the socket
            batch = _batch_decoder.decode(payload)
            works: list[_Work] = [
                _PruneStep(w.table, w.cutoff, w.limit) if isinstance(w, PruneWork) else w  # type: ignore[arg-type]
                for w in batch.works
            ]
            results, stats = _transact(db, works)
            outcomes = []
            for work, result in zip(works, results, strict=True):
                if isinstance(result, Exception):
                    outcomes.append(_Outcome(error=(type(result).__name__, str(result))))
                else:
                    ids = (
                        [op.id for op in work if isinstance(op, PutEvent)]
                        if isinstance(work, list)
                        else []
                    )
                    outcomes.append(_Outcome(result=result, event_ids=ids))
            try:
                sock.sendall(_frame(_encoder.encode(_Answer(outcomes, stats))))
            except OSError:
                return
    finally:
        db.close()
        sock.close()
