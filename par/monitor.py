"""Watch the agents' units and record what systemd did to them on its own.

systemd restarts a crashing agent (`Restart=on-failure`) and gives up after its
start limit; pard learns of neither from its own calls.  The monitor listens
for systemd's PropertiesChanged signals of `par-agent@*` units on a bus
connection of its own (polled on its fd, so the GIL is free meanwhile), and
for each changed unit of a current, running deployment:

- a restart count that went up is a crash: an "Agent crashed" event with the
  exit status and the last journal lines;
- a unit that ended `failed` (systemd gave up) fails the deployment, with the
  reason, so `parctl list`, `status` and the API say so;
- a deployment failed that way whose unit is active again (an operator's
  `systemctl restart`) is healthy again.

Units an action or deploy is changing are left alone: the monitor only looks
at an agent while it holds the agent's lock, and an action holds that lock
for as long as it changes the unit.  A sweep over every current deployment
runs at start and every SWEEP_S, should a signal be missed.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pystemd.dbuslib import DBus

from par import journal
from par.agent_unit import EXIT_MEANING
from par.errors import ParError
from par.log import event
from par.store import IN_FLIGHT, Deployment, Store
from par.units import Systemd, UnitStatus, agent_id_of, unit_name

SWEEP_S = 30.0
_UNIT_PATH_PREFIX = b"/org/freedesktop/systemd1/unit/par_2dagent_40"
_DEST = b"org.freedesktop.systemd1"


@dataclass
class _Seen:
    """What the monitor last saw of a unit."""

    crashes: int  # runs of this unit known to have ended in a crash
    at: float  # epoch seconds: journal lines after this are about what came since


def crashed_runs(st: UnitStatus) -> int:
    """How many runs of this unit have crashed: systemd counts the restarts it made,
    and a unit waiting to restart (or given up on) has just lost one more run."""
    dying = st.sub_state == "auto-restart" or st.active_state == "failed"
    return st.n_restarts + (1 if dying else 0)


class UnitMonitor:
    """A thread recording crashes and start-limit failures of agents (see module doc)."""

    def __init__(self, store: Store, systemd: Systemd,
                 agent_lock: Callable[[str], threading.Lock], logger: logging.Logger) -> None:
        self.store = store
        self.systemd = systemd
        self.agent_lock = agent_lock
        self.logger = logger
        self._seen: dict[str, _Seen] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = _pipe()

    def start(self) -> None:
        """Start watching (after reconcile: the units are what the store says)."""
        self._thread = threading.Thread(target=self._run, name="unit-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; returns once the thread has ended (or after 5 s)."""
        self._stop.set()
        _poke(self._wake_w)
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._watch()
            except Exception:
                if self._stop.is_set():
                    return
                self.logger.exception("unit monitor failed; watching again in 5 s")
                self._stop.wait(5)

    def _watch(self) -> None:
        changed: set[str] = set()

        def on_signal(msg: object, error: object = None, userdata: object = None) -> None:
            msg.process_reply(True)  # type: ignore[attr-defined]
            path = msg.headers.get("Path") or b""  # type: ignore[attr-defined]
            if path.startswith(_UNIT_PATH_PREFIX):
                changed.add(_unit_of_path(path))

        with DBus() as bus:
            bus.call_method(_DEST, b"/org/freedesktop/systemd1",
                            b"org.freedesktop.systemd1.Manager", b"Subscribe", [])
            bus.match_signal(_DEST, None, b"org.freedesktop.DBus.Properties",
                             b"PropertiesChanged", on_signal)
            poller = select.poll()
            poller.register(bus.get_fd(), select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            self.sweep(first=not self._seen)
            next_sweep = time.monotonic() + SWEEP_S
            while not self._stop.is_set():
                while not bus.process().is_empty():
                    pass
                if changed:
                    names, changed = sorted(changed), set()
                    for name in names:
                        self.check(name)
                    continue  # checking read the bus: more may have come meanwhile
                timeout = max(0.0, next_sweep - time.monotonic())
                poller.poll(int(timeout * 1000) + 1)
                if time.monotonic() >= next_sweep:
                    self.sweep()
                    next_sweep = time.monotonic() + SWEEP_S

    def sweep(self, first: bool = False) -> None:
        """Check every current deployment's unit (`first`: the look at pard's start,
        whose restart counts are history: only what comes after is recorded)."""
        for d in self.store.currents():
            self.check(unit_name(d.agent_app_id), first=first)

    # ------------------------------------------------------------------ one unit
    def check(self, name: str, first: bool = False) -> None:
        """Look at one agent unit now and record what changed since the last look."""
        agent = agent_id_of(name)
        if agent is None:
            return
        lock = self.agent_lock(agent)
        if not lock.acquire(blocking=False):
            # an action or deploy is changing the unit; it records what it did, and
            # its own unit starts with a restart count of 0
            self._seen.pop(name, None)
            return
        try:
            d = self.store.current(agent)
            if d is None or d.desired_state != "running" or d.status in IN_FLIGHT:
                self._seen.pop(name, None)
                return
            try:
                st = self.systemd.status(name)
            except ParError:
                return
            self._record(d, st, first)
        finally:
            lock.release()

    def _record(self, d: Deployment, st: UnitStatus, first: bool) -> None:
        now = time.time()
        seen = self._seen.get(st.name)
        if seen is None or st.n_restarts < seen.crashes - 1:
            # Not seen since pard started it (a unit pard starts counts from 0), or seen
            # first at pard's start (its past is not news), or a new unit meanwhile.
            seen = _Seen(crashed_runs(st) if first else 0, now)
        did, agent = d.deployment_id, d.agent_app_id
        crashes = crashed_runs(st)
        reason = ""
        if crashes > seen.crashes:
            # systemd logs every end of the main process: the journal knows each exit
            # status even when the unit was restarted before this look
            text = journal.lines(st.name, since=seen.at - 1)
            exits = journal.main_exits(text)[-(crashes - seen.crashes):]
            tail = journal.meaningful_tail(text)
            ends: list[journal.MainExit | None] = [*exits] or [None]
            for ended in ends:
                reason = describe_exit(ended, st)
                self.store.add_event(did, agent, "Agent crashed",
                                     message=f"{reason}: {tail}" if tail else reason,
                                     restarts=st.n_restarts,
                                     result=_result(ended, st),
                                     exitStatus=ended.status if ended else None)
            event(self.logger, "Agent crashed", logging.WARNING, deploymentId=did,
                  agentAppId=agent, restarts=st.n_restarts, reason=reason, journal=tail)
            reason = f"{reason}: {tail}" if tail else reason
            seen = _Seen(crashes, now)
        if st.active_state == "failed" and d.status == "healthy":
            reason = reason or journal.tail(st.name, since=seen.at - 1) or st.result
            message = (f"systemd gave up after {st.n_restarts} restart(s) "
                       f"(agents.start_limit_burst): {reason}")
            self.store.fail(did, "agent_crashed", message)
            event(self.logger, "Agent failed", logging.ERROR, deploymentId=did,
                  agentAppId=agent, restarts=st.n_restarts, reason=reason)
        elif st.active_state == "active" and d.status == "failed" \
                and d.error_code == "agent_crashed":
            self.store.update(did, status="healthy", error_code=None, error_message=None,
                              error_field=None)
            self.store.add_event(did, agent, "Agent running again", pid=st.main_pid)
        self._seen[st.name] = seen


def describe_exit(ended: journal.MainExit | None, st: UnitStatus) -> str:
    """How a run of the agent ended, in words (`ended` None: the journal did not say)."""
    if ended is None:
        return f"the agent stopped unexpectedly ({st.result})"
    if ended.code in ("killed", "dumped"):
        return f"the agent was killed by signal {ended.status}"
    meaning = EXIT_MEANING.get(ended.status)
    if meaning:
        return f"{meaning} (exit status {ended.status})"
    return f"the agent exited with status {ended.status}"


def _result(ended: journal.MainExit | None, st: UnitStatus) -> str:
    """systemd's Result= word for the run that ended."""
    if ended is None:
        return st.result
    return {"exited": "exit-code", "killed": "signal", "dumped": "core-dump"}.get(ended.code,
                                                                                 st.result)


def _unit_of_path(path: bytes) -> str:
    """`par-agent@x.service` from systemd's escaped object path of it."""
    tail = path.rsplit(b"/", 1)[-1]
    out = bytearray()
    i = 0
    while i < len(tail):
        if tail[i:i + 1] == b"_" and i + 2 < len(tail):
            out.append(int(tail[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(tail[i])
            i += 1
    return out.decode(errors="replace")


def _pipe() -> tuple[int, int]:
    return os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)


def _poke(fd: int) -> None:
    try:
        os.write(fd, b"x")
    except OSError:
        pass
