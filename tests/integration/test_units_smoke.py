"""Transient agent units against real systemd, through par.units (pystemd 0.11)."""

from __future__ import annotations

import subprocess

from par.units import Systemd, UnitSpec

from .conftest import journal_lines, wait_for

# A tiny Type=notify program: prints a line, sends READY=1 after a delay.
NOTIFY_PROG = r"""
import os, socket, sys, time
print("smoke says hello", flush=True)
time.sleep(float(sys.argv[1]))
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1\nSTATUS=smoke serving", addr)
while True:
    time.sleep(60)
"""

IGNORE_TERM_PROG = r"""
import os, signal, socket, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", addr)
while True:
    time.sleep(60)
"""


def spec(name: str, prog: str, *args: str, **kw) -> UnitSpec:
    return UnitSpec(name=name, description=f"PAR test {name}",
                    argv=["/usr/bin/python3", "-c", prog, *args], **kw)


def test_notify_unit_is_activating_until_ready(systemd: Systemd, unit_name) -> None:
    name = unit_name("smoke")
    systemd.start(spec(name, NOTIFY_PROG, "1.0", timeout_stop_s=5))
    # PID 1 answers before it runs the queued start job, so a unit just started may
    # still read "inactive" (see Systemd.wait_active); it is never active before READY=1
    assert systemd.status(name).active_state in ("inactive", "activating")
    # the program sleeps 1 s before READY=1: activating meanwhile
    wait_for(lambda: systemd.status(name).active_state == "activating", timeout=5,
             interval=0.01)
    st = systemd.wait_active(name, timeout=10)
    assert st.active_state == "active"
    assert st.status_text == "smoke serving"
    assert st.main_pid > 0


def test_status_and_journal(systemd: Systemd, unit_name) -> None:
    name = unit_name("smoke")
    systemd.start(spec(name, NOTIFY_PROG, "0", log_fields={"PAR_AGENT_APP_ID": name}))
    assert systemd.wait_active(name, timeout=10).active_state == "active"
    out = subprocess.run(["systemctl", "status", name, "--no-pager"],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Status: \"smoke serving\"" in out.stdout
    wait_for(lambda: "smoke says hello" in journal_lines(name))
    # the extra journal field names the agent
    by_field = subprocess.run(["journalctl", f"PAR_AGENT_APP_ID={name}", "-o", "cat", "--no-pager"],
                              capture_output=True, text=True, timeout=10).stdout
    assert "smoke says hello" in by_field


def test_sigterm_ignored_is_killed_after_timeout(systemd: Systemd, unit_name) -> None:
    name = unit_name("stubborn")
    systemd.start(spec(name, IGNORE_TERM_PROG, timeout_stop_s=2, restart="no"))
    assert systemd.wait_active(name, timeout=10).active_state == "active"
    systemd.stop(name)
    # CollectMode=inactive-or-failed would drop it; ours keeps failed units: Result is readable
    st = systemd.wait_inactive(name, timeout=10)
    assert st.active_state == "failed"
    assert st.result == "timeout"
    assert "SIGKILL" in journal_lines(name) or "Killing process" in journal_lines(name)


def test_unit_gone_after_stop(systemd: Systemd, unit_name) -> None:
    name = unit_name("gone")
    systemd.start(spec(name, NOTIFY_PROG, "0", timeout_stop_s=5))
    assert systemd.wait_active(name, timeout=10).active_state == "active"
    assert name in systemd.list_agent_units()
    systemd.stop(name, wait_s=10)
    wait_for(lambda: not systemd.status(name).exists, timeout=5)
    assert name not in systemd.list_agent_units()
    out = subprocess.run(["systemctl", "status", name], capture_output=True, timeout=10)
    assert out.returncode == 4  # "no such unit"


def test_reset_failed_of_an_unknown_unit_is_a_no_op_that_costs_no_memory(systemd: Systemd) -> None:
    """pystemd 0.11 leaks a few KiB on every failed method call; pard resets units
    often (every failed start, every replaced unit), so it must not call one that fails."""
    import gc

    import psutil

    proc = psutil.Process()
    systemd.reset_failed("par-agent@never-deployed.service")
    gc.collect()
    before = proc.memory_info().rss
    for _ in range(1000):
        systemd.reset_failed("par-agent@never-deployed.service")
    gc.collect()
    grown = proc.memory_info().rss - before
    assert grown < 1024 * 1024, f"RSS grew {grown / 1024:.0f} KiB over 1000 resets"
    assert not systemd.status("par-agent@never-deployed.service").exists
