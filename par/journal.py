"""What journald holds about an agent's unit: why it failed, how its runs ended."""

from __future__ import annotations

import re
from dataclasses import dataclass

from par import procs
from par.agent_host.par_agent_host.log import PREFIX as HOST_PREFIX
from par.agent_unit import EXIT_MEANING
from par.units import UnitStatus

# systemd's own lines about a unit that say nothing about why it failed
_SYSTEMD_NOISE = re.compile(
    r"^(Start(ed|ing)|Stopp(ed|ing)|Failed to start|Scheduled restart job|Start request repeated"
    r"|Main process exited|Failed with result|Consumed|Deactivated successfully|Killing process)"
)
# systemd's line for each end of a unit's main process
_EXIT = re.compile(r"Main process exited, code=(\w+), status=(\d+)/")


@dataclass(frozen=True)
class MainExit:
    """One end of the unit's main process, as systemd logged it."""

    code: str  # exited, killed, dumped
    status: int  # the exit status, or the signal's number


def lines(unit: str, since: float | None = None, count: int = 60) -> list[str]:
    """The unit's last `count` journal lines (message text), those after `since` (epoch
    seconds) only when given: older ones are about another deployment or run."""
    argv = ["journalctl", "-u", unit, "-n", str(count), "-o", "cat", "--no-pager"]
    if since is not None:
        argv.append(f"--since=@{int(since)}")
    return procs.run(argv, timeout=10).output.splitlines()


def meaningful_tail(text: list[str], keep: int = 3) -> str:
    """The last `keep` lines that are not systemd's restart bookkeeping, joined by " | "."""
    kept: list[str] = []
    for line in text:
        msg = line.split(".service: ", 1)[-1].strip()
        if not msg or _SYSTEMD_NOISE.match(msg) or msg in kept:
            continue
        kept.append(msg)
    return " | ".join(kept[-keep:])


def main_exits(text: list[str]) -> list[MainExit]:
    """Every end of the main process systemd logged in `text`, oldest first."""
    return [MainExit(m.group(1), int(m.group(2))) for line in text if (m := _EXIT.search(line))]


def tail(unit: str, keep: int = 3, since: float | None = None) -> str:
    """The last meaningful journal lines of a unit (see `lines`, `meaningful_tail`)."""
    return meaningful_tail(lines(unit, since), keep)


def failure_reason(st: UnitStatus, boot_timeout_s: float, since: float | None = None) -> str:
    """Why the unit's last run ended, in words, with its last journal lines since `since`."""
    code = st.exec_main_status
    if st.result == "timeout":
        why = (f"the agent did not report ready within {boot_timeout_s} s "
               "(agents.boot_timeout_s)")
    elif st.result == "exit-code" and code in EXIT_MEANING:
        why = f"{EXIT_MEANING[code]} (exit status {code})"
    elif st.result == "signal":
        why = f"the agent was killed by signal {code}"
    else:
        why = f"the agent exited ({st.result}, status {code})"
    text = lines(st.name, since)
    # the host's own line names the agent's file:line and the exception; the
    # traceback above it is in the journal for whoever wants all of it
    own = [line for line in text if line.startswith(HOST_PREFIX)]
    said = own[-1][len(HOST_PREFIX):] if own else meaningful_tail(text)
    return f"{why}: {said}" if said else why
