"""pard's log lines: priorities journald understands, journal fields of their own."""

from __future__ import annotations

import io
import json
import logging

from par import log


def test_syslog_priorities() -> None:
    assert [log.syslog_priority(level) for level in
            (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG)] \
        == [2, 3, 4, 6, 7]


def test_stream_lines_carry_their_priority_prefix_and_fields() -> None:
    stream = io.StringIO()
    logger = log.setup(stream=stream)  # not journald's stream: prefixed lines
    try:
        log.event(logger, "Deployment failed", logging.WARNING, deploymentId="d-1",
                  agentAppId="a", code="agent_start_failed")
        log.event(logger, "API request", logging.DEBUG, method="GET")
    finally:
        logger.handlers[:] = []
    first, second = stream.getvalue().splitlines()
    assert first.startswith("<4>{") and second.startswith("<7>{")
    record = json.loads(first[3:])
    assert (record["event"], record["level"], record["deploymentId"], record["code"]) == (
        "Deployment failed", "warning", "d-1", "agent_start_failed")


def test_journal_fields_ride_on_the_record() -> None:
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger("par.test.log.fields")
    logger.handlers[:] = [Keep()]
    logger.propagate = False
    log.event(logger, "Agent crashed", deploymentId="d-2", agentAppId="b", code=None)
    record = seen[0].__dict__
    assert (record["PAR_DEPLOYMENT_ID"], record["PAR_AGENT_APP_ID"]) == ("d-2", "b")
    assert "CODE" not in record  # no empty fields


def test_under_journald_only_for_the_named_stream(monkeypatch) -> None:
    stream = io.StringIO()
    assert not log.under_journald(stream)  # no file descriptor at all
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    with open("/dev/null", "w") as devnull:
        assert not log.under_journald(devnull)
