"""The one way PAR spawns a subprocess: argv list, timeout, process-group kill.

The child runs in its own session, so a timeout kills everything it started
(an installer's build backends, compilers, ...) with one `killpg`, and a
signal sent to `pard`'s terminal never reaches it.  stdout and stderr are
merged and kept, so a failure can show the installer's last lines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Output kept per run; an installer's verbose log can be large, its tail is what matters.
MAX_OUTPUT_CHARS = 256 * 1024
# Seconds to wait for the pipe to close after the group was killed (a member
# that escaped the group may keep it open; we stop reading rather than hang).
_DRAIN_AFTER_KILL_S = 5.0

# Inherited variables that would make a child Python or installer behave
# unlike what PAR asked for.
_DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "CONDA_PREFIX")


@dataclass(frozen=True)
class ProcResult:
    """What a finished (or killed) child did.

    returncode: the exit status; negative for a signal; 127 when it could not start;
    None when it was killed on timeout.
    output: stdout and stderr interleaved, decoded as UTF-8 (bad bytes replaced).
    """

    argv: tuple[str, ...]
    returncode: int | None
    output: str
    seconds: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True when the child ran to completion and exited 0."""
        return self.returncode == 0 and not self.timed_out

    def tail(self, lines: int = 40) -> str:
        """The last `lines` lines of output (what an error message shows)."""
        return "\n".join(self.output.rstrip("\n").splitlines()[-lines:])


def child_env(
    overrides: Mapping[str, str | None] | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A clean environment for a child: `base` (default: ours) minus variables
    that redirect Python (PYTHONPATH, VIRTUAL_ENV, ...), then `overrides`
    (a None value removes the variable)."""
    env = dict(os.environ if base is None else base)
    for name in _DROPPED_ENV:
        env.pop(name, None)
    for name, value in (overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
) -> ProcResult:
    """Run `argv` to completion or until `timeout` seconds have passed.

    The child starts in a new session (its own process group).  On timeout the
    whole group gets SIGKILL and the result has `timed_out=True`.  Never raises
    for the child's behaviour: a missing executable is returncode 127 with the
    reason as output.  `env` is the complete environment (see `child_env`);
    None inherits ours.
    """
    args = tuple(str(a) for a in argv)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as exc:
        return ProcResult(args, 127, f"cannot run {args[0]}: {exc.strerror or exc}\n",
                          round(time.monotonic() - start, 3))
    timed_out = False
    try:
        raw, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc.pid)
        try:
            raw, _ = proc.communicate(timeout=_DRAIN_AFTER_KILL_S)
        except subprocess.TimeoutExpired:
            # Something outside the group holds the pipe: give up reading.
            if proc.stdout:
                proc.stdout.close()
            proc.wait()
            raw = b""
    except BaseException:
        # KeyboardInterrupt or similar in the caller: leave no child behind.
        _kill_group(proc.pid)
        proc.wait()
        raise
    output = (raw or b"").decode("utf-8", errors="replace")
    if len(output) > MAX_OUTPUT_CHARS:
        output = output[-MAX_OUTPUT_CHARS:]
    return ProcResult(
        argv=args,
        returncode=None if timed_out else proc.returncode,
        output=output,
        seconds=round(time.monotonic() - start, 3),
        timed_out=timed_out,
    )
