"""Fixtures for tests that talk to real systemd."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from par.units import Systemd


@pytest.fixture
def systemd() -> Systemd:
    return Systemd()


@pytest.fixture
def unit_name(systemd: Systemd) -> Iterator[Callable[[str], str]]:
    """Makes unique `par-agent@<prefix>-<random>.service` names and stops them afterwards."""
    made: list[str] = []

    def make(prefix: str = "t") -> str:
        name = f"par-agent@{prefix}-{uuid.uuid4().hex[:8]}.service"
        made.append(name)
        return name

    yield make
    for name in made:
        subprocess.run(["systemctl", "kill", "-s", "KILL", name], capture_output=True, timeout=10)
        subprocess.run(["systemctl", "stop", name], capture_output=True, timeout=30)
        subprocess.run(["systemctl", "reset-failed", name], capture_output=True, timeout=10)


def journal_lines(unit: str) -> str:
    """The unit's journal as text."""
    return subprocess.run(
        ["journalctl", "-u", unit, "--no-pager", "-o", "cat"],
        capture_output=True, text=True, timeout=10,
    ).stdout


def wait_for(predicate: Callable[[], object], timeout: float = 10.0,
             interval: float = 0.05) -> object:
    """Poll `predicate` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def pard():
    """A pard (par.service from the source tree) for the whole test module."""
    from .pard import running_pard

    with running_pard("pard") as p:
        yield p

