"""Whether the store can serve, and the checks of its files before it opens.

Theory of operation
-------------------
A server whose store cannot commit must tell its load balancer (``/healthz``
answers 503 with the reason) instead of taking messages it cannot keep.
``WatchedSqliteStore`` is the SQLite engine plus that knowledge:

- **the writer process is dead and not replaced** -- it is replaced by the
  next write; ``revive()`` makes one (a write that changes nothing), so an
  idle server recovers on its next health probe instead of waiting for
  traffic that its failing probe keeps away;
- **the disk is full** (SQLITE_FULL) or **an I/O error** (SQLITE_IOERR) made
  the last transaction fail -- until a later transaction that changed rows
  commits (one that changed nothing wrote nothing, so it proves nothing);
- **the database is corrupt** (SQLITE_CORRUPT, SQLITE_NOTADB seen by any read
  or write) -- until a restart, where ``prepare_database`` refuses the file.

Errors are recognised by SQLite's own texts (``sqlite3_errstr``): the writer
process hands an error back as (class, message), so the numeric code does not
survive the trip, and those texts are fixed strings of the library.

``prepare_database`` runs before the store opens the file: it creates the
database mode 0600 -- SQLite gives the ``-wal`` and ``-shm`` files the mode of
the database file -- tightens the files of an older data dir to 0600, and
runs ``PRAGMA quick_check``. A file that fails it is refused with
``DatabaseCorrupt`` (one line: the path and SQLite's first complaint).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

from ..logs import event
from ._sqlite import SqliteStore, _Job, _Stat

log = logging.getLogger(__name__)

T = TypeVar("T")

FILE_MODE: Final = 0o600
"""The database, its -wal and -shm, and the secret: the server's user only."""

_FULL: Final = "database or disk is full"
_IOERR: Final = "disk I/O error"
_CORRUPT: Final = ("database disk image is malformed", "file is not a database")

DISK_FULL: Final = "store: disk full"
IO_ERROR: Final = "store: disk I/O error"
CORRUPT: Final = "store: database corrupt"
WRITER_DEAD: Final = "store: writer process died"


class DatabaseCorrupt(Exception):
    """The database file fails SQLite's integrity check (message: one line)."""


def prepare_database(path: Path) -> None:
    """Create ``path`` (mode 0600) if missing, tighten its files to 0600, and
    refuse it if ``PRAGMA quick_check`` finds it damaged. Blocking."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE))
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(name, FILE_MODE)
    try:
        db = sqlite3.connect(path)
        try:
            rows = db.execute("PRAGMA quick_check").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise DatabaseCorrupt(f"{path}: {exc}") from None
    if rows != [("ok",)]:
        raise DatabaseCorrupt(f"{path} is corrupt: {rows[0][0]}")


def _classify(error: BaseException) -> str | None:
    if not isinstance(error, sqlite3.Error):
        return None
    text = str(error)
    if any(marker in text for marker in _CORRUPT):
        return CORRUPT
    if _FULL in text:
        return DISK_FULL
    if _IOERR in text:
        return IO_ERROR
    return None


def _alive(pid: int | None) -> bool:
    """Without opening anything: it must work when descriptors run out. The
    writer's parent (the fork server) reaps it at once, so a dead one is gone."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process now
        return False
    return True


class WatchedSqliteStore(SqliteStore):
    """``SqliteStore`` that knows whether it can serve (module docstring)."""

    _failure: str | None = None
    """Why the last transaction failed (disk full, I/O error), until one commits."""
    _corrupt = False

    def health(self) -> str | None:
        """Why the store cannot serve now, or None."""
        if self._corrupt:
            return CORRUPT
        writer = self.writer
        if writer is not None and not _alive(writer.pid):
            return WRITER_DEAD
        return self._failure

    async def revive(self) -> None:
        """Start a new writer process if the last one died: a write that
        changes nothing (the first one after a death finds its pipe broken)."""
        for _ in range(2):
            try:
                await self.prune_used_tokens(0)  # deletes tokens expired before 1970
                return
            except sqlite3.Error:
                continue

    def _observe(self, error: BaseException) -> None:
        reason = _classify(error)
        if reason is None:
            return
        if reason == CORRUPT:
            self._corrupt = True
        if reason != self._failure:
            event(log, "store_unhealthy", level=logging.ERROR, reason=reason, error=str(error))
        self._failure = reason

    def _committed(
        self, batch: list[_Job], results: list[int | Exception], stats: list[_Stat]
    ) -> None:
        super()._committed(batch, results, stats)
        for result in results:
            if isinstance(result, Exception):
                self._observe(result)
        if self._failure is not None and not self._corrupt and any(ops for _, ops, _ in stats):
            event(log, "store_healthy", was=self._failure)
            self._failure = None

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await super()._read(query)
        except sqlite3.DatabaseError as exc:
            self._observe(exc)
            raise


__all__ = ["WRITER_DEAD", "DatabaseCorrupt", "WatchedSqliteStore", "prepare_database"]
