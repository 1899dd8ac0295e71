"""An in-memory systemd for unit tests of the orchestration core (par.pipeline,
par.deployer, par.actions, par.reconcile).

`FakeSystemd` subclasses `par.units.Systemd` and overrides every public method, so
mypy checks that its signatures match the real ones and par code can call nothing
the real class lacks; the bus helpers are overridden to fail loudly, so nothing
ever reaches D-Bus.  Methods under "test hooks" are for tests only: par code types
its handle as `Systemd`, where they do not exist.

The state machine of a transient `par-agent@<id>.service`, as systemd 252 runs it
with the properties par.agent_unit sets (Type=notify, Restart=on-failure,
RestartPreventExitStatus=2 3 4, CollectMode=inactive):

- never started, or reset/collected: `load_state="not-found"`, `inactive/dead`.
- `start`: refused with `unit_exists` while active/activating/reloading/deactivating;
  a loaded leftover is reset first (as `Systemd.start` does), then the unit is
  `activating/start` with a start job.  Time does not pass by itself: the attempt
  ends when `wait_active` (or the `settle` hook) runs it, as scripted per agent:
  - "ok": READY=1, `active/running` with a main PID;
  - ("exit", N) / ("signal", N): the main process dies: `failed` (result
    "exit-code"/"signal", ExecMainStatus N) when N is in RestartPreventExitStatus,
    else auto-restart (NRestarts + 1, the next scripted attempt runs) until the start
    limit refuses another: `failed`, result "start-limit-hit";
  - "timeout": no READY within TimeoutStartSec: `activating/auto-restart`, result
    "timeout" (systemd would retry after RestartSec; the fake waits for `settle`).
    A `wait_active` shorter than TimeoutStartSec returns while it is still activating.
- `stop`: `inactive/dead`, result "success", and the unit is collected (not-found)
  right after; a unit stopped in auto-restart, or killed at TimeoutStopSec (the
  "hang" stop script), ends `failed` with its result kept instead.
- `failed` stays loaded (listed, readable) until `reset_failed` unloads it.

Socket units (`par-agent@<id>.socket`, par.agent_sockets): `start_socket` loads the
socket and its service (inactive, not started); `start_unit` starts a loaded service
as `start` does.  While its socket is loaded a service is pinned: stopped, reset or
dead, it stays loaded (inactive), as on systemd 252, and `start_socket` refuses a
service name that is loaded.  `stop_socket` unloads the socket (and a pinned service
that is not running).  Nothing is ever started by a connection: the fake has none.
"""

from __future__ import annotations

import signal as signals
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NoReturn, TypeAlias

from par.errors import ParError
from par.units import (
    SOCKET_SUFFIX,
    UNIT_PREFIX,
    UNIT_SUFFIX,
    Resources,
    Systemd,
    UnitSpec,
    UnitStatus,
    agent_id_of,
    listen_host_port,
    unit_name,
)

# How one attempt to run the main process ends: "ok", "timeout", ("exit", N), ("signal", N).
Outcome: TypeAlias = "str | tuple[str, int]"
# Signals whose death systemd counts as clean (Restart=on-failure does not restart).
CLEAN_SIGNALS = (signals.SIGHUP, signals.SIGINT, signals.SIGTERM, signals.SIGPIPE)
# What the fake logs about a unit (`-o cat` text, as par.journal reads it).
_EXIT_NAMES = {1: "FAILURE", 2: "INVALIDARGUMENT", 3: "NOTIMPLEMENTED", 4: "NOPERMISSION",
               5: "NOTINSTALLED"}


@dataclass
class FakeUnit:
    """One loaded unit: the spec it was started with and systemd's view of it."""

    spec: UnitSpec
    active_state: str = "activating"
    sub_state: str = "start"
    result: str = "success"
    exec_main_status: int = 0
    main_pid: int = 0
    n_restarts: int = 0
    attempts: int = 0  # process starts since the last `start` (for the start limit)
    since_usec: int = 0
    status_text: str = ""


@dataclass(frozen=True)
class Call:
    """One call par code made (`op` is the Systemd method's name)."""

    op: str
    unit: str
    deployment_id: str | None = None  # the DEPLOYMENT_ID of the unit at the time
    detail: object = None


@dataclass
class _Gate:
    """A hold on an agent's `wait_active` calls (see `FakeSystemd.hold`)."""

    open: threading.Event = field(default_factory=threading.Event)
    waiting: int = 0


class FakeSystemd(Systemd):
    """systemd for one test: units in a dict, a call log, and hooks to script them."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._units: dict[str, FakeUnit] = {}
        self._sockets: dict[str, tuple[dict[str, object], str]] = {}  # -> (props, service)
        self.ports_in_use: set[int] = set()  # TEST HOOK: ports a socket unit cannot bind
        self._scripts: dict[str, deque[tuple[Outcome, tuple[str, ...]]]] = defaultdict(deque)
        self._stop_scripts: dict[str, deque[str]] = defaultdict(deque)
        self._journal: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self._gates: dict[str, _Gate] = {}
        self._busy: dict[str, int] = defaultdict(int)  # agent -> starts not yet waited for
        self._next_pid = 4000
        self.calls: list[Call] = []
        self.max_concurrent: dict[str, int] = defaultdict(int)  # per agent, start..wait end
        self.max_parallel = 0  # agents between start and the end of its wait, at once

    # ---------------------------------------------------------------- no D-Bus, ever

    @contextmanager
    def _bus(self) -> Iterator[NoReturn]:
        raise AssertionError("FakeSystemd must not open a D-Bus connection")
        yield  # pragma: no cover

    @contextmanager
    def _manager(self) -> Iterator[NoReturn]:
        raise AssertionError("FakeSystemd must not open a D-Bus connection")
        yield  # pragma: no cover

    # ---------------------------------------------------------------- Systemd's methods

    def start(self, spec: UnitSpec, current: UnitStatus | None = None) -> None:
        with self._lock:
            self._log("start", spec.name, deployment_id=spec.environment.get("DEPLOYMENT_ID"))
            current = current or self._status(spec.name)
            if current.active_state in ("active", "activating", "reloading", "deactivating"):
                raise ParError("unit_exists", f"{spec.name} is already {current.active_state}",
                               None, 409)
            if current.exists:
                self._reset_failed(spec.name)
            if spec.name in self._units:  # StartTransientUnit on a loaded name
                raise ParError("systemd_error",
                               f"systemd call failed: Unit {spec.name} already exists.", None, 500)
            self._units[spec.name] = FakeUnit(spec=spec, since_usec=_now_usec())
            self._say(spec.name, f"Starting {spec.description}...")
            agent = _agent(spec.name)
            self._busy[agent] += 1
            self.max_concurrent[agent] = max(self.max_concurrent[agent], self._busy[agent])
            self.max_parallel = max(self.max_parallel,
                                    sum(1 for n in self._busy.values() if n))

    def wait_active(self, name: str, timeout: float) -> UnitStatus:
        agent = _agent(name)
        self._pass_gate(agent)
        with self._lock:
            self._log("wait_active", name, detail=timeout)
            try:
                unit = self._units.get(name)
                if unit is not None and unit.active_state == "activating" and \
                        unit.sub_state == "start":
                    if self._peek_outcome(agent) == "timeout" and \
                            timeout < unit.spec.timeout_start_s:
                        return self._status(name)  # pard gives up before systemd does
                    self._run_attempts(name, unit)
                return self._status(name)
            finally:
                if self._busy[agent]:
                    self._busy[agent] -= 1

    def wait_inactive(self, name: str, timeout: float) -> UnitStatus:
        with self._lock:
            self._log("wait_inactive", name, detail=timeout)
            return self._status(name)

    def stop(self, name: str, wait_s: float | None = None,
             current: UnitStatus | None = None) -> UnitStatus:
        with self._lock:
            self._log("stop", name, detail=wait_s)
            st = current or self._status(name)
            if st.active_state in ("inactive", "failed") or not st.exists:
                return st
            unit = self._units.get(name)
            if unit is None:  # the caller's status was stale: the unit is gone already
                return self._status(name)
            agent = _agent(name)
            hang = self._stop_scripts[agent].popleft() if self._stop_scripts[agent] else None
            if unit.sub_state == "auto-restart" and unit.result != "success":
                self._enter(name, unit, "failed", "failed", unit.result, unit.exec_main_status)
            elif hang == "hang" and (wait_s is None or wait_s >= unit.spec.timeout_stop_s):
                self._say(name, f"{name}: State 'stop-sigterm' timed out. Killing.")
                self._enter(name, unit, "failed", "failed", "timeout", signals.SIGKILL)
            else:
                self._say(name, f"Stopping {unit.spec.description}...")
                self._enter(name, unit, "inactive", "dead", "success", 0)
            st = self._status(name)
            if unit.active_state == "inactive":
                self._collect(name)  # CollectMode=inactive: collected once inactive
            return st

    def start_socket(self, name: str, socket_props: dict[str, object],
                     service: UnitSpec) -> None:
        with self._lock:
            self._log("start_socket", name,
                      deployment_id=service.environment.get("DEPLOYMENT_ID"))
            if name in self._sockets or service.name in self._units:
                loaded = name if name in self._sockets else service.name
                raise ParError("systemd_error", f"systemd call failed: Unit {loaded} was "
                               "already loaded or has a fragment file.", None, 500)
            listen = socket_props.get("Listen", [])
            assert isinstance(listen, list)
            if any(int(a.rpartition(":")[2]) in self.ports_in_use for _k, a in listen):
                return  # the socket's start failed: both units are collected at once
            self._sockets[name] = (dict(socket_props), service.name)
            self._units[service.name] = FakeUnit(spec=service, active_state="inactive",
                                                 sub_state="dead", since_usec=_now_usec())

    def start_unit(self, name: str, restart: bool = False) -> None:
        with self._lock:
            self._log("start", name)
            unit = self._units.get(name)
            if unit is None:
                raise ParError("systemd_error", f"systemd call failed: Unit {name} not found.",
                               None, 500)
            if unit.active_state in ("active", "activating", "reloading"):
                return  # StartUnit on a started unit: nothing to do
            # NRestarts starts again; the start limit does not (reset_failed resets it)
            unit.n_restarts = 0
            self._enter(name, unit, "activating", "start", "success", 0)
            self._say(name, f"Starting {unit.spec.description}...")
            agent = _agent(name)
            self._busy[agent] += 1
            self.max_concurrent[agent] = max(self.max_concurrent[agent], self._busy[agent])
            self.max_parallel = max(self.max_parallel,
                                    sum(1 for n in self._busy.values() if n))

    def stop_unit(self, name: str) -> None:
        raise AssertionError("par code stops agent sockets with stop_socket")

    def unit_state(self, name: str) -> tuple[str, str, str]:
        with self._lock:
            self._log("unit_state", name)
            if name in self._sockets:
                return "loaded", "active", str(self._sockets[name][0].get("Description", ""))
            unit = self._units.get(name)
            if unit is None:
                return "not-found", "inactive", ""
            return "loaded", unit.active_state, unit.spec.description

    def listen_addresses(self, name: str) -> set[tuple[str, int]]:
        with self._lock:
            props = self._sockets.get(name, ({}, ""))[0]
            listen = props.get("Listen", [])
            assert isinstance(listen, list)
            return {parsed for _kind, address in listen
                    if (parsed := listen_host_port(address))}

    def stop_socket(self, name: str, timeout: float = 10) -> None:
        with self._lock:
            if name not in self._sockets:
                return
            self._log("stop_socket", name)
            _props, service = self._sockets.pop(name)
            unit = self._units.get(service)
            if unit is not None and unit.active_state == "inactive":
                del self._units[service]  # no longer pinned: collected

    def wait_unloaded(self, name: str, timeout: float) -> bool:
        with self._lock:
            return name not in self._units

    def restart(self, name: str) -> None:
        raise AssertionError("par code does not restart units (it stops and starts them)")

    def reset_failed(self, name: str) -> None:
        with self._lock:
            self._log("reset_failed", name)
            self._reset_failed(name)

    def kill(self, name: str, signal: int, who: str = "main") -> None:
        with self._lock:
            self._log("kill", name, detail=(signal, who))
            unit = self._units.get(name)
            if unit is None or unit.active_state != "active":
                raise ParError("systemd_error", f"systemd call failed: {name} is not active",
                               None, 500)
            self._main_died(name, unit, ("signal", signal))

    def status(self, name: str) -> UnitStatus:
        with self._lock:
            self._log("status", name)
            return self._status(name)

    def statuses(self, names: list[str]) -> dict[str, tuple[UnitStatus, Resources | None]]:
        with self._lock:
            self._log("statuses", ",".join(names))
            out: dict[str, tuple[UnitStatus, Resources | None]] = {}
            for name in names:
                st = self._status(name)
                res = None
                if st.active_state in ("active", "activating", "reloading") and st.main_pid:
                    res = Resources((st.main_pid,), 30 * 1024 * 1024, 0.5)
                out[name] = (st, res)
            return out

    def list_agent_units(self, suffix: str = UNIT_SUFFIX) -> list[str]:
        with self._lock:
            self._log("list_agent_units", "*")
            names = self._sockets if suffix == SOCKET_SUFFIX else self._units
            return sorted(n for n in names if n.startswith(UNIT_PREFIX) and n.endswith(suffix))

    def property(self, name: str, interface: str, prop: str) -> object:
        """As pystemd reads them: strings as bytes; an unloaded name reads empty."""
        with self._lock:
            self._log("property", name, detail=(interface, prop))
            unit = self._units.get(name)
            if (interface, prop) == ("Service", "Environment"):
                if unit is None:
                    return []
                return [f"{k}={v}".encode() for k, v in sorted(unit.spec.environment.items())]
            if (interface, prop) == ("Service", "MainPID"):
                return unit.main_pid if unit else 0
            if (interface, prop) == ("Unit", "Description"):
                return unit.spec.description.encode() if unit else b""
            raise AttributeError(f"FakeSystemd has no {interface}.{prop}")

    def resources(self, name: str) -> Resources:
        with self._lock:
            st = self._status(name)
            return Resources((st.main_pid,) if st.main_pid else (), 30 * 1024 * 1024, 0.5)

    # ---------------------------------------------------------------- test hooks

    def script(self, agent: str, *outcomes: Outcome, says: tuple[str, ...] = ()) -> None:
        """TEST HOOK. Queue how the agent's next main-process starts end (each start and
        each auto-restart takes one; unscripted ones are "ok"); `says` is logged by the
        first of them (what the agent printed, as the journal shows it)."""
        with self._lock:
            for i, outcome in enumerate(outcomes):
                self._scripts[agent].append((outcome, says if i == 0 else ()))

    def script_stop(self, agent: str, how: str = "hang") -> None:
        """TEST HOOK. The agent's next stop: "hang" ignores SIGTERM and is killed at
        TimeoutStopSec (the unit ends failed, result "timeout")."""
        with self._lock:
            self._stop_scripts[agent].append(how)

    def run_unit(self, spec: UnitSpec) -> UnitStatus:
        """TEST HOOK. A unit started and READY, as if by an earlier pard: no call logged."""
        with self._lock:
            unit = FakeUnit(spec=spec, since_usec=_now_usec())
            self._units[spec.name] = unit
            self._enter(spec.name, unit, "active", "running", "success", 0, pid=True)
            return self._status(spec.name)

    def settle(self, agent: str) -> UnitStatus:
        """TEST HOOK. Let time pass for a unit left activating: its attempt ends as scripted."""
        name = unit_name(agent)
        with self._lock:
            unit = self._units.get(name)
            if unit is not None and unit.active_state == "activating":
                self._run_attempts(name, unit)
            return self._status(name)

    def crash(self, agent: str, how: Outcome = ("exit", 1)) -> UnitStatus:
        """TEST HOOK. The active unit's main process dies `how`: systemd restarts it
        (the next scripted attempt runs) or, for a permanent exit status or a clean
        signal, leaves it failed / inactive."""
        name = unit_name(agent)
        with self._lock:
            unit = self._units[name]
            assert unit.active_state == "active", f"{name} is {unit.active_state}"
            self._main_died(name, unit, how)
            return self._status(name)

    def vanish(self, agent: str | None = None) -> None:
        """TEST HOOK. A reboot: the agent's transient unit (every unit: None) is gone."""
        with self._lock:
            for name in list(self._units):
                if agent is None or _agent(name) == agent:
                    del self._units[name]
            for name in list(self._sockets):
                if agent is None or _agent(name) == agent:
                    del self._sockets[name]

    @contextmanager
    def hold(self, *agents: str) -> Iterator[None]:
        """TEST HOOK. While held, the agents' `wait_active` calls block (a slow boot);
        leaving the block (or `release`) lets them through."""
        with self._lock:
            for agent in agents:
                self._gates[agent] = _Gate()
        try:
            yield
        finally:
            self.release(*agents)

    def release(self, *agents: str) -> None:
        """TEST HOOK. Let the held agents' waits through (no agents: every one)."""
        with self._lock:
            for agent in agents or list(self._gates):
                gate = self._gates.pop(agent, None)
                if gate is not None:
                    gate.open.set()

    def waiting(self) -> dict[str, int]:
        """TEST HOOK. Agents with calls blocked in a held `wait_active`, and how many."""
        with self._lock:
            return {agent: g.waiting for agent, g in self._gates.items() if g.waiting}

    def sockets(self) -> dict[str, dict[str, object]]:
        """TEST HOOK. The loaded socket units and their properties."""
        with self._lock:
            return {name: dict(props) for name, (props, _svc) in self._sockets.items()}

    def unit(self, agent: str) -> FakeUnit | None:
        """TEST HOOK. The agent's loaded unit (its spec: what par started), or None."""
        with self._lock:
            return self._units.get(unit_name(agent))

    def ops(self, *kinds: str, agent: str | None = None) -> list[tuple[str, str | None]]:
        """TEST HOOK. (op, DEPLOYMENT_ID of the unit) of the logged calls, in order; only
        `kinds` (default: the calls that change state), only `agent`'s when given."""
        wanted = kinds or ("start", "stop", "reset_failed", "kill")
        with self._lock:
            return [(c.op, c.deployment_id) for c in self.calls
                    if c.op in wanted and (agent is None or _agent(c.unit) == agent)]

    def clear_calls(self) -> None:
        """TEST HOOK. Forget the call log (e.g. at a simulated pard restart)."""
        with self._lock:
            self.calls.clear()

    def journal_lines(self, unit: str, since: float | None = None, count: int = 60) -> list[str]:
        """TEST HOOK. What `journalctl -u unit -o cat` would print (par.journal.lines)."""
        with self._lock:
            kept = [text for ts, text in self._journal[unit] if since is None or ts >= int(since)]
            return kept[-count:]

    # ---------------------------------------------------------------- the state machine

    def _log(self, op: str, name: str, deployment_id: str | None = None,
             detail: object = None) -> None:
        if deployment_id is None:
            unit = self._units.get(name)
            if unit is not None:
                deployment_id = unit.spec.environment.get("DEPLOYMENT_ID")
        self.calls.append(Call(op, name, deployment_id, detail))

    def _say(self, name: str, text: str) -> None:
        self._journal[name].append((time.time(), text))

    def _status(self, name: str) -> UnitStatus:
        unit = self._units.get(name)
        if unit is None:
            return UnitStatus(name, "not-found", "inactive", "dead", 0, 0, "", 0, 0, "")
        return UnitStatus(name=name, load_state="loaded", active_state=unit.active_state,
                          sub_state=unit.sub_state, main_pid=unit.main_pid,
                          n_restarts=unit.n_restarts, result=unit.result,
                          exec_main_status=unit.exec_main_status, since_usec=unit.since_usec,
                          status_text=unit.status_text)

    def _reset_failed(self, name: str) -> None:
        unit = self._units.get(name)
        if unit is None:
            return
        if unit.active_state in ("failed", "inactive"):
            unit.attempts = 0  # the start limit too (a pinned unit stays loaded)
            if unit.active_state == "failed":
                self._enter(name, unit, "inactive", "dead", unit.result, unit.exec_main_status)
            self._collect(name)  # reset, unreferenced: collected
        else:
            unit.attempts = 0  # ResetFailedUnit on a live unit resets its start limit only

    def _enter(self, name: str, unit: FakeUnit, active: str, sub: str, result: str,
               status: int, pid: bool = False) -> None:
        unit.active_state, unit.sub_state = active, sub
        unit.result, unit.exec_main_status = result, status
        if pid:
            self._next_pid += 1
            unit.main_pid = self._next_pid
            unit.status_text = "ready" if active == "active" else ""
        elif active != "active":
            unit.main_pid = 0
            unit.status_text = ""
        unit.since_usec = _now_usec()
        if active == "failed":
            self._say(name, f"{name}: Failed with result '{result}'.")

    def _collect(self, name: str) -> None:
        """An inactive unit is forgotten, unless a loaded socket pins it."""
        if not any(service == name for _props, service in self._sockets.values()):
            del self._units[name]

    def _peek_outcome(self, agent: str) -> Outcome:
        queue = self._scripts[agent]
        return queue[0][0] if queue else "ok"

    def _take_outcome(self, agent: str) -> tuple[Outcome, tuple[str, ...]]:
        queue = self._scripts[agent]
        return queue.popleft() if queue else ("ok", ())

    def _run_attempts(self, name: str, unit: FakeUnit) -> None:
        """Run main-process attempts until one is READY, the unit fails, or a start
        times out (then it waits in auto-restart, see the module doc)."""
        agent = _agent(name)
        while True:
            if unit.attempts >= unit.spec.start_limit_burst:
                self._say(name, f"{name}: Start request repeated too quickly.")
                self._enter(name, unit, "failed", "failed", "start-limit-hit",
                            unit.exec_main_status)
                return
            if unit.attempts:
                unit.n_restarts += 1
                self._say(name, f"{name}: Scheduled restart job, restart counter is at "
                                f"{unit.n_restarts}.")
            unit.attempts += 1
            outcome, says = self._take_outcome(agent)
            self._enter(name, unit, "activating", "start", "success", 0, pid=True)
            for line in says:
                self._say(name, line)
            if outcome == "ok":
                self._enter(name, unit, "active", "running", "success", 0, pid=True)
                self._say(name, f"Started {unit.spec.description}.")
                return
            if outcome == "timeout":
                self._say(name, f"{name}: start operation timed out. Terminating.")
                self._enter(name, unit, "activating", "auto-restart", "timeout", 0)
                return
            if not self._main_died(name, unit, outcome, during_start=True):
                return

    def _main_died(self, name: str, unit: FakeUnit, how: Outcome,
                   during_start: bool = False) -> bool:
        """The main process ended `how`; True when systemd restarts it (while starting:
        the caller runs the next attempt)."""
        assert isinstance(how, tuple), f"not a death: {how!r}"
        kind, n = how
        if kind == "exit":
            self._say(name, f"{name}: Main process exited, code=exited, "
                            f"status={n}/{_EXIT_NAMES.get(n, str(n))}")
            result, clean = "exit-code", n == 0
        else:
            self._say(name, f"{name}: Main process exited, code=killed, "
                            f"status={n}/{signals.Signals(n).name}")
            result, clean = "signal", n in CLEAN_SIGNALS
        if clean:
            self._enter(name, unit, "inactive", "dead", "success", n)
            self._collect(name)
            return False
        prevented = kind == "exit" and n in unit.spec.restart_prevent_exit_status
        if unit.spec.restart == "no" or prevented:
            self._enter(name, unit, "failed", "failed", result, n)
            return False
        self._enter(name, unit, "activating", "auto-restart", result, n)
        if not during_start:
            unit.attempts = 1  # the run that was active counts once towards the limit
            self._run_attempts(name, unit)
        return True

    def _pass_gate(self, agent: str) -> None:
        with self._lock:
            gate = self._gates.get(agent)
            if gate is None:
                return
            gate.waiting += 1
        try:
            if not gate.open.wait(timeout=30):
                raise AssertionError(f"{agent}: wait_active held for 30 s (release missing?)")
        finally:
            with self._lock:
                gate.waiting -= 1


def _agent(name: str) -> str:
    agent = agent_id_of(name) or agent_id_of(name, SOCKET_SUFFIX)
    assert agent is not None, f"not an agent unit: {name}"
    return agent


def _now_usec() -> int:
    return int(time.time() * 1_000_000)

