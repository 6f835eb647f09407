"""Log lines are JSON with words, not reprs: printf-style records (plugins, the
worker SDK) keep their template as the event and carry exceptions as ``Type: text``."""

from __future__ import annotations

import json
import logging

from imserver.logs import JsonFormatter


def _line(msg: str, *args: object) -> dict[str, object]:
    record = logging.LogRecord("imserver.worker", logging.WARNING, __file__, 1, msg, args, None)
    parsed: dict[str, object] = json.loads(JsonFormatter().format(record))
    return parsed


def test_printf_records_have_a_stable_event_and_exceptions_in_words() -> None:
    first = _line("tick failed: %r", ValueError("bad shop 'x'"))
    second = _line("tick failed: %r", KeyError("k"))
    assert first["event"] == second["event"] == "tick failed: %r"
    assert first["message"] == "tick failed: ValueError: bad shop 'x'"
    assert second["message"] == "tick failed: KeyError: 'k'"
    assert _line("retrying in %.1fs", 0.5)["message"] == "retrying in 0.5s"


def test_structured_events_are_unchanged() -> None:
    plain = _line("listening")
    assert plain["event"] == "listening" and "message" not in plain
