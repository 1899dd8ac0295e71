"""Fixtures shared by the unit tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_client import FakePard


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short temp dir: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="par-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pard(sockdir: Path) -> Iterator[FakePard]:
    fake = FakePard(sockdir / "par.sock").start()
    yield fake
    fake.stop()
