"""par.procs.run: output, exit codes, timeouts that kill the whole process group."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from par import procs

PY = sys.executable


def _gone(pid: int, within: float = 5.0) -> bool:
    """True once `pid` no longer runs (a zombie counts as gone)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_success_keeps_stdout_and_stderr_in_order():
    r = procs.run([PY, "-c", "import sys; print('out', flush=True); print('err', file=sys.stderr)"],
                  timeout=30)
    assert r.ok and r.returncode == 0 and not r.timed_out
    assert r.output.split() == ["out", "err"]
    assert r.argv[0] == PY and r.seconds >= 0


def test_nonzero_exit_is_returned_not_raised():
    r = procs.run([PY, "-c", "import sys; print('boom'); sys.exit(3)"], timeout=30)
    assert not r.ok and r.returncode == 3 and "boom" in r.output


def test_missing_executable_is_127():
    r = procs.run(["/nonexistent/par-tool", "x"], timeout=5)
    assert r.returncode == 127 and not r.ok
    assert "/nonexistent/par-tool" in r.output


def test_child_runs_in_its_own_session():
    r = procs.run([PY, "-c", "import os; print(os.getsid(0), os.getpgid(0), os.getpid())"],
                  timeout=30)
    sid, pgid, pid = map(int, r.output.split())
    assert sid == pgid == pid != os.getsid(0)


def test_timeout_kills_the_whole_group_and_keeps_output(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    script = f"echo started; sleep 300 & echo $! > {pidfile}; wait"
    start = time.monotonic()
    r = procs.run(["sh", "-c", script], timeout=1.0)
    assert time.monotonic() - start < 10
    assert r.timed_out and r.returncode is None and not r.ok
    assert "started" in r.output
    assert _gone(int(pidfile.read_text())), "grandchild survived the timeout"


def test_env_and_cwd(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setenv("PAR_KEEP", "kept")
    env = procs.child_env({"PAR_EXTRA": "1", "PAR_KEEP": None})
    assert "PYTHONPATH" not in env and "PAR_KEEP" not in env and env["PAR_EXTRA"] == "1"
    r = procs.run([PY, "-c", "import os; print(os.getcwd(), os.environ.get('PAR_EXTRA'))"],
                  timeout=30, env=env, cwd=tmp_path)
    assert r.output.split() == [str(tmp_path), "1"]


def test_tail_and_output_cap():
    r = procs.run([PY, "-c", "[print(f'line {i}') for i in range(100)]"], timeout=30)
    tail = r.tail(40).splitlines()
    assert len(tail) == 40 and tail[0] == "line 60" and tail[-1] == "line 99"
    big = procs.run([PY, "-c", f"print('x' * {procs.MAX_OUTPUT_CHARS * 2})"], timeout=30)
    assert len(big.output) == procs.MAX_OUTPUT_CHARS
