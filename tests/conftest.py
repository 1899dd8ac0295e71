"""Shared test setup.

Integration tests (tests/integration) need systemd as PID 1: the project's
sandbox (tests/sandbox/systemd-sandbox, used by scripts/test) or a real VM.
Outside both they skip, except under CI=true, where a skip of a systemd test is
an error: CI must never pass by not testing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def systemd_is_pid1() -> bool:
    """True when the system manager is running (here: the sandbox or a real boot)."""
    return (Path("/run/systemd/system").is_dir()
            and Path("/proc/1/comm").read_text().strip() == "systemd")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.systemd)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("systemd") and not systemd_is_pid1():
        reason = "needs systemd as PID 1: run scripts/test (it boots the sandbox)"
        if IN_CI:
            pytest.fail(f"CI=true and systemd is unreachable: {reason}", pytrace=False)
        pytest.skip(reason)
    if item.get_closest_marker("systemd"):
        state = subprocess.run(
            ["systemctl", "is-system-running"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        assert state in ("running", "degraded"), f"systemd is {state!r}"


def require_file(path: Path, how: str) -> None:
    """Skip when a prepared test input is missing; under CI that is a failure."""
    if not path.exists():
        msg = f"{path} missing: {how}"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
