"""Structured logs: one JSON object per line on stderr (journald keeps them).

`pard` logs named events (`Creating virtual environment`, `Reusing existing venv`,
...) with their fields; a logger is passed to the parts that log, nothing global
is configured on import.
"""

from __future__ import annotations

import json
import logging
import sys
import time


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


def setup(level: int = logging.INFO, stream=None) -> logging.Logger:
    """Configure the `par` logger to write JSON lines (called once by `pard`'s main)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("par")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    return logger


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log the event `name` with structured `fields`."""
    logger.log(level, name, extra={"fields": fields})


class Timer:
    """Measures elapsed seconds: `with Timer() as t: ...; t.seconds`."""

    def __enter__(self) -> Timer:
        self.start = time.monotonic()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = round(time.monotonic() - self.start, 3)
