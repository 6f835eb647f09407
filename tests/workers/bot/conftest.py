"""Prints the FAQ accuracy measured by test_faq_accuracy.py at the end of the run."""

from __future__ import annotations

import pytest

from tests.workers.bot.test_faq_accuracy import RESULTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RESULTS:
        terminalreporter.section("bot FAQ top-1 accuracy (default knowledge base)")
        for result in RESULTS.values():
            terminalreporter.write_line(result.summary())
