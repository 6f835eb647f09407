"""Structured logs: one JSON object per line on stderr.

``log.info("event_name", extra={"fields": {...}})`` is awkward, so modules use
``event(logger, "name", key=value, ...)`` which keeps the event name and its
fields machine-readable. Printf-style calls (plugins, libraries) get their template
as the event and the filled-in text as ``message``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()


class _Words:
    """An exception as ``Type: message`` under both ``%s`` and ``%r``."""

    __slots__ = ("text",)

    def __init__(self, exc: BaseException) -> None:
        self.text = f"{type(exc).__name__}: {exc}"

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        if isinstance(record.args, tuple) and record.args:
            # printf-style (``log.warning("tick failed: %r", exc)``): the template is the
            # event (one name however the values vary), the values go into ``message``
            # with exceptions in words rather than their reprs.
            args = tuple(_Words(a) if isinstance(a, BaseException) else a for a in record.args)
            entry["event"] = str(record.msg)
            try:
                entry["message"] = str(record.msg) % args
            except (TypeError, ValueError):
                entry["message"] = record.getMessage()
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode()


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("imserver")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def event(logger: logging.Logger, name: str, *, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"fields": fields})


def now_ms() -> int:
    return int(time.time() * 1000)
