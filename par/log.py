"""Structured logs as journald expects them.

Every entry is one JSON object (ts, level, event, fields) with a real syslog
priority.  Under journald (`JOURNAL_STREAM` names our stderr) entries go over
journald's native protocol with python3-systemd's `JournalHandler`, with the
JSON line as MESSAGE and the fields operators filter on as journal fields
(`PAR_DEPLOYMENT_ID=`, `PAR_AGENT_APP_ID=`, `CODE=`): `journalctl -u par -p
warning` and `journalctl PAR_AGENT_APP_ID=x` both work.  Elsewhere each line
goes to stderr with its `<N>` priority prefix (sd-daemon(3)), which journald
also understands.  A logger is passed to the parts that log; nothing global is
configured on import.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TextIO

# The event fields that also become journal fields of their own.
JOURNAL_FIELDS = {"deploymentId": "PAR_DEPLOYMENT_ID", "agentAppId": "PAR_AGENT_APP_ID",
                  "code": "CODE"}


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (err 3, warning 4, info 6, debug 7)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: ts, level, event, and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class PrefixedJsonFormatter(JsonFormatter):
    """A JSON line after its `<N>` priority prefix, for a stream journald may read."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>{super().format(record)}"


def under_journald(stream: TextIO) -> bool:
    """True when `stream` is the journal stream systemd gave this process."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _journal_handler(identifier: str) -> logging.Handler | None:
    try:
        from systemd.journal import JournalHandler  # python3-systemd
    except ImportError:
        return None
    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER=identifier)
    return handler


def setup(level: int = logging.DEBUG, stream: TextIO | None = None,
          identifier: str = "pard") -> logging.Logger:
    """Configure the `par` logger (called once by `pard`'s main): the journal's native
    protocol under journald, `<N>`-prefixed JSON lines on `stream` otherwise."""
    out = stream or sys.stderr
    handler = _journal_handler(identifier) if under_journald(out) else None
    if handler is None:
        handler = logging.StreamHandler(out)
        handler.setFormatter(PrefixedJsonFormatter())
    else:
        handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("par")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    return logger


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log the event `name` with structured `fields`."""
    extra: dict[str, object] = {"fields": fields}
    for key, journal_key in JOURNAL_FIELDS.items():
        if fields.get(key) is not None:
            extra[journal_key] = str(fields[key])
    logger.log(level, name, extra=extra)


class Timer:
    """Measures elapsed seconds: `with Timer() as t: ...; t.seconds`."""

    def __enter__(self) -> Timer:
        self.start = time.monotonic()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = round(time.monotonic() - self.start, 3)
