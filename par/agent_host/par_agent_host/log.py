"""The host's own lines: stdout for progress, stderr for problems, each prefixed and flushed.

Both streams go to the journal under the unit's SyslogIdentifier; the prefix
tells the host's lines from the agent's.  Flushed at once so a line is in the
journal before the process exits.
"""

from __future__ import annotations

import sys

PREFIX = "par-agent-host: "


def info(message: str) -> None:
    print(PREFIX + message, file=sys.stdout, flush=True)


def error(message: str) -> None:
    print(PREFIX + message, file=sys.stderr, flush=True)


def exception(exc: BaseException) -> None:
    """The traceback of an agent failure, on stderr."""
    import traceback  # only on a failure: every agent's start would pay for it

    traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.flush()
