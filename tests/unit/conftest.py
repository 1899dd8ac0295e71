"""Fixtures shared by the unit tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from par import installers, journal
from par.build_sandbox import RootRunner
from tests.unit.core_env import CoreEnv, close_env, make_env
from tests.unit.test_client import FakePard


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short temp dir: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="par-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pard(sockdir: Path) -> Iterator[FakePard]:
    """A fake pard answering on a unix socket, as parctl's tests talk to it."""
    fake = FakePard(sockdir / "par.sock").start()
    yield fake
    fake.stop()


@pytest.fixture
def core_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CoreEnv]:
    """The orchestration core on a FakeSystemd; journalctl reads the fake's journal."""
    e = make_env(tmp_path)
    monkeypatch.setattr(journal, "lines", e.fake.journal_lines)
    try:
        yield e
    finally:
        close_env(e)


@pytest.fixture(autouse=True)
def builds_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests have no systemd: builds run in-process (the `installer.sandbox: false`
    runner).  The sandboxed build unit is proven by tests/integration/
    test_unprivileged_build.py; tests of UnitRunner itself construct it directly."""
    monkeypatch.setattr(installers, "runner_for", lambda cfg: RootRunner())
