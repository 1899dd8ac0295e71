"""Benchmark 5, daemon restart: `systemctl restart par` with the density benchmark's agents running.

Per run: the MainPID of every agent unit before and after; the time
`systemctl restart par` takes (it returns at the new pard's READY=1, sent after
reconcile and once the API listens); the time until the new pard answers on
its socket, seen by a thread polling `GET /health` every 5 ms from before the
restart (an answer counts once its `uptimeSeconds` says it comes from a pard
started after the restart request); and systemd's own start → READY
timestamps of par.service.
"""

from __future__ import annotations

import threading
import time

from bench.common import (
    BenchPard,
    Row,
    Section,
    Sizes,
    Stats,
    agent_main_pids,
    systemctl,
    unit_props,
)
from par.client import Client
from par.errors import ParError

POLL_S = 0.005


class ApiWatch(threading.Thread):
    """Records when a pard started after `wall0` first answers GET /health."""

    def __init__(self, pard: BenchPard, wall0: float, t0: float, timeout: float = 300) -> None:
        super().__init__(daemon=True)
        self.client = Client(pard.socket, timeout=2)
        self.wall0, self.t0, self.timeout = wall0, t0, timeout
        self.seconds: float | None = None

    def run(self) -> None:
        while time.monotonic() - self.t0 < self.timeout:
            try:
                health = self.client.daemon_health()
                # uptime is rounded to 0.1 s; the old pard's is far older than the request
                if health["uptimeSeconds"] <= time.time() - self.wall0 + 0.1:
                    self.seconds = time.monotonic() - self.t0
                    return
            except (ParError, KeyError, TypeError):
                pass
            time.sleep(POLL_S)


def run(pard: BenchPard, sizes: Sizes, agents: list[str]) -> Section:
    started = time.monotonic()
    units = {f"par-agent@{a}.service" for a in agents}
    restart_s, api_s, ready_s, restarted = [], [], [], []
    for _ in range(sizes.runs):
        before = {u: p for u, p in agent_main_pids().items() if u in units}
        if len(before) != len(units) or not all(before.values()):
            raise RuntimeError(f"only {len(before)} of {len(units)} agents run before the restart")
        old_pard = pard.main_pid()
        wall0, t0 = time.time(), time.monotonic()
        watch = ApiWatch(pard, wall0, t0)
        watch.start()
        systemctl("restart", "par.service", timeout=300)
        restart_s.append(time.monotonic() - t0)
        watch.join()
        if watch.seconds is None or pard.main_pid() == old_pard:
            raise RuntimeError(f"the new pard never answered:\n{pard.journal(lines=40)}")
        api_s.append(watch.seconds)
        p = unit_props("par.service", "InactiveExitTimestampMonotonic",
                       "ActiveEnterTimestampMonotonic")
        ready_s.append((int(p["ActiveEnterTimestampMonotonic"])
                        - int(p["InactiveExitTimestampMonotonic"])) / 1e6)
        after = agent_main_pids()
        restarted.append(sum(1 for u, pid in before.items() if after.get(u) != pid))

    n = len(units)
    rows = [
        Row("`systemctl restart par` returns (old pard stopped, new one READY)",
            Stats.of(restart_s), "s"),
        Row("↳ new pard answers `GET /health` on its socket (from the restart request)",
            Stats.of(api_s), "s"),
        Row("↳ par.service start → READY (systemd's timestamps: config, store, reconcile, API)",
            Stats.of(ready_s), "s"),
        Row(f"agents restarted (MainPID changed), of {n}", Stats.of(restarted), "",
            target="0", met=max(restarted) == 0, judged="max"),
    ]
    return Section(
        key="daemon_restart", title="5. Daemon restart",
        what=(f"`systemctl restart par` with the {n} agents of the density benchmark running; "
              f"{sizes.runs} restarts. No same-run baseline: the existing runtime keeps its "
              "state in memory, so its restart loses every deployment and kills every agent."),
        rows=rows,
        seconds=time.monotonic() - started,
    )
