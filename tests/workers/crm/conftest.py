"""Fixtures for the CRM plugin tests: a real SQLite file per test, a fixed clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.workers.crm.factories import NOW
from workers.crm.repository import CrmRepository


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[CrmRepository]:
    with CrmRepository(tmp_path / "crm.db", clock=lambda: NOW) as repository:
        yield repository
