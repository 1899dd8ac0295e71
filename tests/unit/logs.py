"""A logger of a test's own whose JSON lines (par.log's format) land in a string."""

from __future__ import annotations

import io
import logging

from par import log


def captured_logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    """A logger `par.test.<name>.<n>` at DEBUG writing JSON lines to the returned stream."""
    stream = io.StringIO()
    logger = logging.getLogger(f"par.test.{name}.{id(stream)}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(log.JsonFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream
