"""The host's own lines: stdout for progress, stderr for problems, each prefixed and flushed.

Both streams go to the journal under the unit's SyslogIdentifier; the prefix
tells the host's lines from the agent's.  Flushed at once so a line is in the
journal before the process exits.
"""

from __future__ import annotations

import sys

PREFIX = "par-agent-host: "
# sd-daemon(3) priority prefix: journald files the line at PRIORITY=3 (err) and
# strips the prefix, so `journalctl -p err` finds the host's failures.
ERR = "<3>"


def info(message: str) -> None:
    print(PREFIX + message, file=sys.stdout, flush=True)


def error(message: str) -> None:
    """One line about a failure, at priority err."""
    print(ERR + PREFIX + message, file=sys.stderr, flush=True)


def exception(exc: BaseException) -> None:
    """The full traceback of an agent failure, on stderr, every line at priority err."""
    import traceback  # only on a failure: every agent's start would pay for it

    for chunk in traceback.format_exception(exc):
        for line in chunk.rstrip("\n").splitlines():
            sys.stderr.write(ERR + line + "\n")
    sys.stderr.flush()
