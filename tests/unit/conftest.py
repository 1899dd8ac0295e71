"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from par import journal
from tests.unit.core_env import CoreEnv, close_env, make_env


@pytest.fixture
def core_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CoreEnv]:
    """The orchestration core on a FakeSystemd; journalctl reads the fake's journal."""
    e = make_env(tmp_path)
    monkeypatch.setattr(journal, "lines", e.fake.journal_lines)
    try:
        yield e
    finally:
        close_env(e)
