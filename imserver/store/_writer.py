"""The store's writer process: SQLite transactions away from the server's GIL.

Theory of operation
-------------------
The store's writer thread (``SqliteStore``) used to run each transaction
itself. The SQLite work proper runs without the GIL, but binding parameters,
building rows and every return from ``sqlite3_step`` need it, and under load
the trio thread holds it most of the time: the two threads convoyed. Measured
at 13,000 msg/s: delivery p50 150-180 ms with the writer in-process, 21 ms
with a store that did nothing -- the gateway and actors alone were not the
limit. So the transactions run in a child process, with its own interpreter
and GIL, on the other core.

``WriterProcess`` is the parent's end, used by the store's writer thread
only (it blocks). ``transact(works)`` sends one batch -- the same ops and
prune steps the thread would have committed -- as one msgpack message over a
``multiprocessing`` pipe, and blocks (GIL released) until the child answers
with one outcome per work: a result, or the error it raised (type and text,
rebuilt as the same ``sqlite3`` exception class in the parent), the ids of
its ``PutEvent`` ops, and the stats of the committed transactions. The child
runs ``_sqlite._transact`` exactly as the thread did (one transaction, and on
failure each work alone), on its own connection with the same pragmas.

Processes come from a ``forkserver`` (fork would copy the trio threads'
state; spawn would pay a whole interpreter start per store). The child asks
the kernel to kill it when its parent dies (``PR_SET_PDEATHSIG`` on Linux),
and it exits at the end of its pipe, so it never outlives the server by more
than the transaction it was committing -- and a transaction killed half way
is rolled back by SQLite. A batch whose answer never comes (the child died)
fails with ``WriterDied``; the store starts a new child for the next batch.
Whether the lost batch committed is unknown, as after any failed write: the
actors reload their state from the database before going on.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import signal
import sqlite3
import sys
from multiprocessing.connection import Connection
from typing import Final

import msgspec

from ._base import PutEvent, WriteOp

PR_SET_PDEATHSIG: Final = 1


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


class WriterProcess:
    """The parent's end; not thread-safe (the store's writer thread owns it)."""

    def __init__(self, path: str, synchronous: str, busy_timeout_s: float) -> None:
        self._args = (path, synchronous, busy_timeout_s)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None

    @property
    def pid(self) -> int | None:
        """The current child's process id (None: not running)."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the child now (else the first ``transact`` does; blocks)."""
        if self._conn is None:
            self._start()

    def _start(self) -> Connection:
        context = multiprocessing.get_context("forkserver")
        # Before the fork server's first start: children then fork with the
        # store's modules already imported (milliseconds, not an import each).
        context.set_forkserver_preload(["imserver.store._sqlite"])
        ours, theirs = context.Pipe()
        process = context.Process(target=_child_main, args=(theirs, *self._args),
                                  name="imserver-store-writer", daemon=True)
        process.start()
        theirs.close()
        self._process, self._conn = process, ours
        return ours

    def transact(
        self, works: list[WireWork]
    ) -> tuple[list[int | Exception], list[list[int]], list[tuple[float, int, int]]]:
        """Commit ``works`` in the child: (result or error, event ids) per work,
        and the stats of the committed transactions."""
        conn = self._conn or self._start()
        try:
            conn.send_bytes(_encoder.encode(_Batch(works)))
            answer = _answer_decoder.decode(conn.recv_bytes())
        except (EOFError, OSError) as exc:
            self.close()
            died = WriterDied(f"the store's writer process ended: {exc!r}")
            return [died] * len(works), [[] for _ in works], []
        results: list[int | Exception] = [
            _rebuild(o.error) if o.error is not None else o.result for o in answer.outcomes
        ]
        return results, [o.event_ids for o in answer.outcomes], answer.stats

    def close(self) -> None:
        """Let the child finish and exit (it commits nothing more)."""
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            conn.close()  # the child's recv sees EOF and exits
        if process is not None:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _child_main(conn: Connection, path: str, synchronous: str, busy_timeout_s: float) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop
    from ._sqlite import _PruneStep, _transact, _Work  # here: _sqlite imports this module

    db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
    try:
        db.execute(f"PRAGMA synchronous = {synchronous}")  # one of a fixed set
        db.execute("PRAGMA foreign_keys = ON")
        while True:
            try:
                batch = _batch_decoder.decode(conn.recv_bytes())
            except (EOFError, OSError):
                return  # the parent closed the pipe, or died
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
                    ids = [op.id for op in work if isinstance(op, PutEvent)] if isinstance(
                        work, list) else []
                    outcomes.append(_Outcome(result=result, event_ids=ids))
            try:
                conn.send_bytes(_encoder.encode(_Answer(outcomes, stats)))
            except OSError:
                return
    finally:
        db.close()
