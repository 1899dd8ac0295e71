"""Following a deploy: asking pard for each change and printing the phases as they end."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from par import deployment
from par.cli.app import App
from par.client import ApiError, Client

# Deploy phases in the order pard runs them, and how parctl names them.
PHASES = ("downloading", "loading", "starting")
PHASE_LABELS = {"pending": "waiting for a worker", **deployment.PHASE_LABELS}
# Statuses after which a deployment no longer changes by itself.
FINAL_STATUSES = ("healthy", "failed", "stopped", "removed")
# How long one request of `wait_for` lets pard hold the answer back (it answers on any change).
WAIT_S = 30.0
# On a terminal the running phase's clock ticks: pard is asked at least this often.
TICK_S = 0.2


@dataclass
class PhasePrinter:
    """Shows deploy phases as they happen.

    On a terminal the phase in progress is one line updated in place; every
    finished phase ends as a plain line ("downloading ... 0.1s", "building
    venv: reused", "building venv: uv 3.2s").  Not on a terminal, only the
    plain lines are written (logs and CI stay readable).
    """

    tty: bool
    write: Callable[[str], object]
    done: set[str] = field(default_factory=set)
    live: bool = False  # an updating line is on screen

    def show(self, record: dict, installer: str | None, now: float) -> None:
        """Print the phases of `record` that ended since the last call, then the one running."""
        phases = record.get("phases") or {}
        for name in PHASES:
            phase = phases.get(name)
            if name in self.done or not isinstance(phase, dict) or phase.get("end") is None:
                continue
            self.line(self._finished(name, phase, record, installer))
            self.done.add(name)
        status = record.get("status")
        if self.tty and status in PHASE_LABELS and status not in self.done:
            start = (phases.get(status) or {}).get("start")
            elapsed = f" {max(0.0, now - start):.1f}s" if isinstance(start, int | float) else ""
            self.write(f"\r\x1b[K{PHASE_LABELS[status]} ...{elapsed}")
            self.live = True

    def line(self, text: str) -> None:
        """A finished line (replacing the updating one on a terminal)."""
        if self.live:
            self.write("\r\x1b[K")
            self.live = False
        self.write(text + "\n")

    @staticmethod
    def _finished(name: str, phase: dict, record: dict, installer: str | None) -> str:
        seconds = phase.get("seconds")
        took = f"{seconds:.1f}s" if isinstance(seconds, int | float) else "done"
        if name == "loading":
            if record.get("venvReused"):
                return "building venv: reused"
            return f"building venv: {installer + ' ' if installer else ''}{took}"
        return f"{PHASE_LABELS[name]} ... {took}"


def installer_from_events(client: Client, deployment_id: str) -> str | None:
    """The installer that built the deployment's venv, as pard's events name it."""
    try:
        events = client.events(deployment_id, limit=100).get("events") or []
    except ApiError:
        return None  # the name is a nicety; the deploy goes on without it
    for event in events:
        fields = event.get("fields") if isinstance(event, dict) else None
        if isinstance(fields, dict):
            for key in ("installer", "backend"):
                if isinstance(fields.get(key), str):
                    return fields[key]
    return None


def wait_for(app: App, client: Client, deployment_id: str, printer: PhasePrinter | None,
             until_taken: bool = False) -> dict:
    """Follow the deployment until it is final (or, with `until_taken`, past downloading).

    Each request returns as soon as the record changes (GET ...?wait=S), so every
    phase shows, and the end is seen, the moment it happens."""
    installer: str | None = None
    asked_installer = False
    record: dict | None = None
    hold = TICK_S if printer is not None and printer.tty else WAIT_S
    while True:
        previous = record
        if previous is None:
            record = client.deployment(deployment_id)
        else:
            seen = previous.get("updatedAt")
            asked = time.monotonic()
            record = client.deployment(deployment_id, wait=hold,
                                       since=seen if isinstance(seen, int | float) else None)
            if record.get("updatedAt") == seen and time.monotonic() - asked < hold / 2:
                time.sleep(app.poll_interval)  # unchanged (a server that did not wait): pace it
        status = record.get("status")
        if printer is not None:
            loading = (record.get("phases") or {}).get("loading") or {}
            built = loading.get("end") is not None and not record.get("venvReused")
            if built and not asked_installer:
                asked_installer = True
                installer = installer_from_events(client, deployment_id)
            printer.show(record, installer, time.time())
        if status in FINAL_STATUSES or (until_taken and status not in ("pending", "downloading")):
            return record
