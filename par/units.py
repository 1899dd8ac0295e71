"""Every call PAR makes to systemd, through pystemd (Debian's 0.11).

Agents run as transient units `par-agent@<agentAppId>.service`.  This module
turns a `UnitSpec` into D-Bus properties, starts, stops and inspects
units, lists them, and sums the resources of a unit's processes.  Nothing
else in PAR imports pystemd.

pystemd 0.11 maps property names to D-Bus signatures through a global table
that lacks several properties PAR sets (`Restart`, `LogExtraFields`, start
limits, newer sandboxing knobs).  Rather than mutating that table, this module
keeps its own additions and builds the StartTransientUnit message itself.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from pystemd.dbuslib import DBus, apply_signature, path_encode
from pystemd.systemd1 import Manager, Unit
from pystemd.systemd1.unit_signatures import KNOWN_UNIT_SIGNATURES

from par import ids
from par.errors import ParError
from par.unit_resources import Resources, pids_in, resources_of
from par.unit_signatures import EXTRA_SIGNATURES

UNIT_PREFIX = "par-agent@"
UNIT_SUFFIX = ".service"
# The agent's listening sockets, held by systemd (par.agent_sockets).
SOCKET_SUFFIX = ".socket"

SIGNATURES: dict[bytes, object] = {**KNOWN_UNIT_SIGNATURES, **EXTRA_SIGNATURES}

def unit_name(agent_id: str) -> str:
    """`par-agent@<agent_id>.service`, after validating the id (no injection)."""
    return f"{UNIT_PREFIX}{ids.agent_id(agent_id)}{UNIT_SUFFIX}"


def agent_id_of(unit: str, suffix: str = UNIT_SUFFIX) -> str | None:
    """The agent id in a `par-agent@<id>.service` name (`.socket` with that `suffix`), or
    None for other units."""
    if unit.startswith(UNIT_PREFIX) and unit.endswith(suffix):
        return unit[len(UNIT_PREFIX) : -len(suffix)]
    return None


def socket_name(agent_id: str) -> str:
    """`par-agent@<agent_id>.socket`: the socket unit holding the agent's ports."""
    return f"{UNIT_PREFIX}{ids.agent_id(agent_id)}{SOCKET_SUFFIX}"


@dataclass(frozen=True)
class UnitSpec:
    """Everything a transient agent unit is started with (pure data; see `properties`)."""

    name: str
    description: str
    argv: list[str]
    environment: dict[str, str] = field(default_factory=dict)
    # Read by PID 1 at each start; unlike Environment=, not shown to other users.
    environment_files: tuple[str, ...] = ()
    working_directory: str | None = None
    notify: bool = True
    timeout_start_s: float = 120
    timeout_stop_s: float = 30
    restart: str = "on-failure"
    restart_sec: float = 1.0
    start_limit_burst: int = 5
    start_limit_interval_s: float = 60
    restart_prevent_exit_status: tuple[int, ...] = ()
    log_fields: dict[str, str] = field(default_factory=dict)
    syslog_identifier: str | None = None
    memory_max_bytes: int | None = None
    cpu_quota: float | None = None  # 1.0 = one CPU
    tasks_max: int | None = None
    watchdog_s: float | None = None
    # Sandboxing: None = run as root without it (only for PAR's own tests of units).
    dynamic_user: str | None = None
    state_directory: str | None = None
    hide_paths: tuple[str, ...] = ()  # TemporaryFileSystem (read-only, empty) over these
    tmpfs: tuple[tuple[str, str], ...] = ()  # more TemporaryFileSystem= (path, options)
    read_only_binds: tuple[str, ...] = ()  # then bind these back, read-only ("SRC[:DEST]")
    inaccessible_paths: tuple[str, ...] = ()
    extra: dict[str, object] = field(default_factory=dict)


def properties(spec: UnitSpec) -> dict[bytes, object]:
    """The D-Bus property dict for StartTransientUnit (pure; tested without systemd)."""
    p: dict[str, object] = {
        "Description": spec.description,
        "ExecStart": [(spec.argv[0], spec.argv, False)],
        "Type": "notify" if spec.notify else "simple",
        "TimeoutStartUSec": int(spec.timeout_start_s * 1_000_000),
        "TimeoutStopUSec": int(spec.timeout_stop_s * 1_000_000),
        # SIGTERM to the main process only, so the agent can shut its children
        # down itself; whatever is left gets SIGKILL at the timeout.
        "KillMode": "mixed",
        "Restart": spec.restart,
        "RestartUSec": int(spec.restart_sec * 1_000_000),
        "StartLimitBurst": spec.start_limit_burst,
        "StartLimitIntervalUSec": int(spec.start_limit_interval_s * 1_000_000),
        "Environment": [f"{k}={v}" for k, v in sorted(spec.environment.items())],
        "StandardOutput": "journal",
        "StandardError": "journal",
        # A failed agent stays visible (status, journal) until PAR resets it.
        "CollectMode": "inactive",
    }
    if spec.notify:
        p["NotifyAccess"] = "main"
    if spec.environment_files:
        p["EnvironmentFiles"] = [(path, False) for path in spec.environment_files]
    if spec.working_directory:
        p["WorkingDirectory"] = spec.working_directory
    if spec.syslog_identifier:
        p["SyslogIdentifier"] = spec.syslog_identifier
    if spec.log_fields:
        p["LogExtraFields"] = [f"{k}={v}".encode() for k, v in sorted(spec.log_fields.items())]
    if spec.restart_prevent_exit_status:
        p["RestartPreventExitStatus"] = (list(spec.restart_prevent_exit_status), [])
    if spec.memory_max_bytes:
        p["MemoryMax"] = spec.memory_max_bytes
        p["MemorySwapMax"] = 0  # else the limit only moves the agent's memory to swap
    if spec.cpu_quota:
        p["CPUQuotaPerSecUSec"] = int(spec.cpu_quota * 1_000_000)
    if spec.tasks_max:
        p["TasksMax"] = spec.tasks_max
    if spec.watchdog_s:
        p["WatchdogUSec"] = int(spec.watchdog_s * 1_000_000)
    if spec.dynamic_user:
        p.update(_sandboxing(spec))
    p.update(spec.extra)
    return {k.encode(): v for k, v in p.items()}


def _sandboxing(spec: UnitSpec) -> dict[str, object]:
    """systemd hardening that keeps a normal Python agent (network, files in its state dir)
    working."""
    p: dict[str, object] = {
        "DynamicUser": True,
        # Without User= every instance would share one dynamic user "par-agent".
        "User": spec.dynamic_user,
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": True,
        "PrivateDevices": True,
        "PrivateUsers": True,
        "NoNewPrivileges": True,
        "ProtectKernelTunables": True,
        "ProtectKernelModules": True,
        "ProtectKernelLogs": True,
        "ProtectControlGroups": True,
        "ProtectClock": True,
        "ProtectHostname": True,
        "ProtectProc": "invisible",
        "ProcSubset": "pid",
        "RestrictSUIDSGID": True,
        "RestrictRealtime": True,
        "RestrictNamespaces": 0,  # no namespace types allowed
        "LockPersonality": True,
        "RemoveIPC": True,
        # SysV IPC and POSIX message queues of its own (no other agent's segments)
        "PrivateIPC": True,
        "CapabilityBoundingSet": 0,
        "AmbientCapabilities": 0,
        "RestrictAddressFamilies": (True, ["AF_UNIX", "AF_INET", "AF_INET6"]),
        "SystemCallArchitectures": ["native"],
        "SystemCallFilter": (True, ["@system-service"]),
        "SystemCallErrorNumber": 1,  # EPERM instead of killing the agent
        "DevicePolicy": "closed",
        "UMask": 0o077,
    }
    if spec.state_directory:
        p["StateDirectory"] = [spec.state_directory]
    if spec.hide_paths or spec.tmpfs:
        p["TemporaryFileSystem"] = [(path, "ro") for path in spec.hide_paths] + list(spec.tmpfs)
    if spec.read_only_binds:
        # "SRC:DEST" binds SRC at DEST, as BindReadOnlyPaths= itself writes it
        p["BindReadOnlyPaths"] = [(*_bind(path), False, 0) for path in spec.read_only_binds]
    if spec.inaccessible_paths:
        p["InaccessiblePaths"] = list(spec.inaccessible_paths)
    return p


def _signature_array(props: dict[bytes, object]) -> list:
    """pystemd's signature_array, with PAR's table instead of the global one."""
    args: list = [(ord(b"a"), b"(sv)")]
    for name, value in props.items():
        try:
            signature = SIGNATURES[name]
        except KeyError:
            raise ParError(
                "unit_property_unknown",
                f"unit property {name.decode()} has no known D-Bus signature"
            ) from None
        if callable(signature):
            name, signature, value = signature(name, value)
        args += [(ord(b"r"), b"sv"), (ord(b"s"), name), (ord(b"v"), signature)]
        args += apply_signature(signature, [_to_bytes(value)])
        args += [(-1, None), (-1, None)]
    args += [(-1, None)]
    return args


def _to_bytes(value: object) -> object:
    """Strings become bytes, recursively (pystemd's marshaller wants bytes)."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list):
        return [_to_bytes(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_bytes(v) for v in value)
    return value


@dataclass(frozen=True)
class UnitStatus:
    """A unit's state as systemd reports it."""

    name: str
    load_state: str
    active_state: str
    sub_state: str
    main_pid: int
    n_restarts: int
    result: str
    exec_main_status: int
    since_usec: int  # state change timestamp, microseconds since the epoch (0 = never)
    status_text: str
    invocation: str = ""  # InvocationID: a new one for each run of the main process

    @property
    def exists(self) -> bool:
        return self.load_state not in ("not-found", "")

    def to_dict(self) -> dict:
        """JSON-friendly form for the API."""
        return {
            "unit": self.name,
            "loadState": self.load_state,
            "activeState": self.active_state,
            "subState": self.sub_state,
            "mainPid": self.main_pid,
            "nRestarts": self.n_restarts,
            "result": self.result,
            "execMainStatus": self.exec_main_status,
            "since": self.since_usec / 1_000_000 if self.since_usec else None,
            "statusText": self.status_text,
        }


class Systemd:
    """A handle on the system manager; each call opens its own bus connection.

    sd-bus connections are not thread-safe and `pard` serves requests from
    several threads, so connections are short-lived (about a millisecond).
    """

    @contextmanager
    def _manager(self) -> Iterator[Manager]:
        with self._bus() as bus, Manager(bus=bus) as manager:
            yield manager

    @contextmanager
    def _bus(self) -> Iterator[DBus]:
        try:
            with DBus() as bus:
                yield bus
        except ParError:
            raise
        except Exception as exc:  # pystemd raises DBusError subclasses and OSError
            raise ParError("systemd_error", f"systemd call failed: {_dbus_message(exc)}",
                           None, 500) from exc

    def start(self, spec: UnitSpec, current: UnitStatus | None = None) -> None:
        """Start a transient unit for `spec`; a failed leftover of the same name is reset first.

        `current`: the unit's status if the caller just read it (a stop returns it).
        Returns once systemd has queued the start job; use `wait_active` for readiness.
        """
        current = current or self.status(spec.name)
        if current.active_state in ("active", "activating", "reloading", "deactivating"):
            raise ParError("unit_exists", f"{spec.name} is already {current.active_state}",
                           None, 409)
        if current.exists:
            # a failed or inactive unit keeps its name until it is reset
            self.reset_failed(spec.name)
        args = apply_signature(b"ss", [spec.name.encode(), b"fail"])
        args += _signature_array(properties(spec))
        args += [(ord(b"a"), b"(sa(sv))"), (-1, None)]  # no auxiliary units
        with self._bus() as bus:
            bus.call_method(_DEST, _MANAGER_PATH, _MANAGER, b"StartTransientUnit", args)

    def start_socket(self, name: str, socket_props: dict[str, object],
                     service: UnitSpec) -> None:
        """Start a transient socket unit `name` with `service` as its auxiliary unit, as
        `systemd-run --socket-property=` does: systemd holds the listening socket and
        passes it to the service (socket activation)."""
        args = apply_signature(b"ss", [name.encode(), b"fail"])
        args += _signature_array({k.encode(): v for k, v in socket_props.items()})
        args += [(ord(b"a"), b"(sa(sv))"), (ord(b"r"), b"sa(sv)"),
                 (ord(b"s"), service.name.encode())]
        args += _signature_array(properties(service))
        args += [(-1, None), (-1, None)]
        with self._bus() as bus:
            bus.call_method(_DEST, _MANAGER_PATH, _MANAGER, b"StartTransientUnit", args)

    def unit_state(self, name: str) -> tuple[str, str, str]:
        """(LoadState, ActiveState, Description) of a unit of any type (a socket, say);
        ("not-found", "inactive", "") for one systemd does not know."""
        with self._bus() as bus:
            try:
                load = _s(_get(bus, name, b"Unit", b"LoadState", b"s"))
            except Exception:
                return "not-found", "inactive", ""
            if load == "not-found":
                return load, "inactive", ""
            return (load, _s(_get(bus, name, b"Unit", b"ActiveState", b"s")),
                    _s(_get(bus, name, b"Unit", b"Description", b"s")))

    def listen_addresses(self, name: str) -> set[tuple[str, int]]:
        """The TCP (host, port) pairs a socket unit listens on (its `Listen=`); empty when
        not loaded."""
        with self._bus() as bus:
            try:
                listen = _get(bus, name, b"Socket", b"Listen", b"a(ss)")
            except Exception:
                return set()
        return {parsed for kind, address in listen
                if _s(kind) == "Stream" and (parsed := listen_host_port(_s(address)))}

    def stop_socket(self, name: str, timeout: float = 10) -> None:
        """Stop a socket unit (systemd closes its listening sockets; a service still running
        keeps its own copies), wait until it is down, and forget a failed state."""
        if self.unit_state(name)[0] == "not-found":
            return
        self.stop_unit(name)
        deadline = time.monotonic() + timeout
        while self.unit_state(name)[1] not in ("inactive", "failed"):
            if time.monotonic() > deadline:
                raise ParError("systemd_error", f"{name} did not stop", None, 500)
            time.sleep(0.01)
        self.reset_failed(name)

    def wait_unloaded(self, name: str, timeout: float) -> bool:
        """Wait until systemd has forgotten the unit (garbage-collected it): a transient
        unit's name can be started again only then.  True when it is gone."""
        deadline = time.monotonic() + timeout
        while self.unit_state(name)[0] != "not-found":
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def start_unit(self, name: str, restart: bool = False) -> None:
        """Start (or restart) a loaded unit; returns once systemd queued the job."""
        with self._bus() as bus:
            _manager_call(bus, b"RestartUnit" if restart else b"StartUnit", b"ss",
                          [name.encode(), b"replace"])

    def stop_unit(self, name: str) -> None:
        """Queue a stop of a unit of any type (a socket, say); `stop` waits for services."""
        with self._bus() as bus:
            _manager_call(bus, b"StopUnit", b"ss", [name.encode(), b"replace"])

    def wait_active(self, name: str, timeout: float) -> UnitStatus:
        """Wait until the unit is `active` (READY for Type=notify), `failed` or gone, or
        `timeout`; then return its status, or that of its last failed start attempt.

        A returned start job is not an active unit, hence the wait.  Two things make the
        states subtle:
        - A failed attempt of a `Restart=on-failure` unit shows as deactivating, then
          activating/auto-restart, and systemd tries again (a port still held a moment,
          say); the next attempt resets `Result` to "success".  So the last failed attempt
          is kept, since it says why; a start *timeout* ends the wait at once (another
          attempt would only spend the whole boot budget again).
        - PID 1 answers D-Bus calls before it runs a queued start job: a unit just
          started reads as "inactive" for a moment.  "inactive" is final only once the
          unit has no job left (the job is read before the state, so a job that ends
          between the two reads cannot be missed).
        """
        failed_attempt: UnitStatus | None = None
        first: UnitStatus | None = None
        with self._watch(name) as changes:
            for bus in changes(timeout):
                pending = _job_pending(bus, name)
                st = _read_status(bus, name)
                first = first or (st if st.invocation else None)
                if first is not None and st.invocation not in ("", first.invocation) and \
                        st.n_restarts == first.n_restarts:
                    # Run again, yet not by Restart=: the run that was waited for failed
                    # and a connection to the unit's socket started it again
                    # (par.agent_sockets).  What ended it is in the journal.
                    return replace(st, active_state="failed", sub_state="failed",
                                   result="exit-code" if st.result == "success" else st.result)
                if st.sub_state == "auto-restart" or (
                        st.active_state == "deactivating" and st.result not in ("", "success")):
                    failed_attempt = st
                    if st.result == "timeout":
                        return st
                if st.active_state in ("active", "failed"):
                    return st
                if st.active_state == "inactive" and not pending:
                    return failed_attempt or st
        return failed_attempt or st

    def wait_inactive(self, name: str, timeout: float) -> UnitStatus:
        """Wait until the unit is inactive, failed or unloaded, or `timeout`.

        Also ends when the unit runs again (a new InvocationID): the run waited for has
        ended, and a connection to the unit's socket started the next one at once
        (par.agent_sockets), so "inactive" may never be seen."""
        first = ""
        with self._watch(name) as changes:
            for bus in changes(timeout):
                st = _read_status(bus, name)
                first = first or st.invocation
                if st.active_state in ("inactive", "failed") or \
                        st.invocation not in ("", first):
                    return st
        return st

    @contextmanager
    def _watch(self, name: str) -> Iterator[Callable[[float], Iterator[DBus]]]:
        """A bus subscribed to the unit's property changes, and an iterator over it.

        `changes(timeout)` yields the bus at once, then each time systemd signals a
        change of the unit (or after MAX_WAIT_S without one, should a signal be
        missed), until `timeout` has passed.  Each yield is the moment to read the
        unit's state again: waits end as soon as the state does, with no polling.
        """
        with self._bus() as bus:
            bus.call_method(_DEST, _MANAGER_PATH, _MANAGER, b"Subscribe", [])
            bus.match_signal(_DEST, path_encode(_UNIT_PATH, name.encode()),
                             b"org.freedesktop.DBus.Properties", b"PropertiesChanged",
                             _ignore_signal)

            # pystemd 0.11's bus.wait() holds the GIL while it sleeps, which stalled
            # every other thread of pard (the API) while an agent started.  poll()
            # on the bus's fd releases it; process() then reads what arrived.
            poller = select.poll()
            poller.register(bus.get_fd(), select.POLLIN)

            def changes(timeout: float) -> Iterator[DBus]:
                deadline = time.monotonic() + timeout
                while True:
                    yield bus
                    # Reads of the state may have queued signals already: those mean
                    # "read again" at once, without waiting for the fd.
                    if _drain(bus):
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    poller.poll(int(min(remaining, MAX_WAIT_S) * 1000) + 1)
                    _drain(bus)

            yield changes

    def stop(self, name: str, wait_s: float | None = None,
             current: UnitStatus | None = None) -> UnitStatus:
        """Stop a unit (SIGTERM, then SIGKILL after its TimeoutStopSec); wait up to `wait_s`.

        `current`: the unit's status if the caller just read it."""
        st = current or self.status(name)
        if st.active_state in ("inactive", "failed") or not st.exists:
            return st
        with self._bus() as bus:
            _manager_call(bus, b"StopUnit", b"ss", [name.encode(), b"replace"])
        if wait_s is None:
            return self.status(name)
        return self.wait_inactive(name, wait_s)

    def reset_failed(self, name: str) -> None:
        """Forget a failed unit's state so its name can be started again."""
        try:
            with self._bus() as bus:
                # Asked only of a loaded unit: pystemd 0.11 leaks a few KiB on every
                # method call that fails (property reads that fail do not).
                if _s(_get(bus, name, b"Unit", b"LoadState", b"s")) in ("loaded", "error"):
                    _manager_call(bus, b"ResetFailedUnit", b"s", [name.encode()])
        except ParError:
            pass  # not loaded or not failed: nothing to reset

    def kill(self, name: str, signal: int, who: str = "main") -> None:
        """Send `signal` to the unit's main process (`who="main"`) or all of them ("all")."""
        with self._bus() as bus:
            _manager_call(bus, b"KillUnit", b"ssi", [name.encode(), who.encode(), signal])

    def status(self, name: str) -> UnitStatus:
        """The unit's current state; a unit systemd does not know has load_state `not-found`."""
        try:
            with DBus() as bus:
                return _read_status(bus, name)
        except ParError:
            raise
        except Exception as exc:
            raise ParError("systemd_error", f"cannot read {name}: {_dbus_message(exc)}",
                           None, 500) from exc

    def statuses(self, names: list[str]) -> dict[str, tuple[UnitStatus, Resources | None]]:
        """State and (for running units) resources of many units over one bus connection."""
        out: dict[str, tuple[UnitStatus, Resources | None]] = {}
        try:
            with DBus() as bus:
                for name in names:
                    st = _read_status(bus, name)
                    res = None
                    if st.active_state in ("active", "activating", "reloading"):
                        res = resources_of(_cgroup_pids(bus, name, st.main_pid))
                    out[name] = (st, res)
        except ParError:
            raise
        except Exception as exc:
            raise ParError("systemd_error", f"cannot read agent units: {_dbus_message(exc)}", None,
                           500) from exc
        return out

    def list_agent_units(self, suffix: str = UNIT_SUFFIX) -> list[str]:
        """Names of every loaded `par-agent@*.service` unit (`*.socket` with that `suffix`)."""
        with self._manager() as manager:
            pattern = f"{UNIT_PREFIX}*{suffix}".encode()
            units = manager.Manager.ListUnitsByPatterns([], [pattern])
        return sorted(_s(u[0]) for u in units)

    def property(self, name: str, interface: str, prop: str) -> object:
        """Read one property of a unit (e.g. ("Service", "ControlGroup"))."""
        with DBus() as bus:
            unit = Unit(name.encode(), bus=bus, _autoload=True)
            return getattr(getattr(unit, interface), prop)


# The longest a wait sleeps without a signal from systemd before reading the unit again.
MAX_WAIT_S = 0.5


def _drain(bus: DBus) -> bool:
    """Process every message the bus has read or can read now; True if there was any."""
    got = False
    while not bus.process().is_empty():
        got = True  # the signals only say "read again"
    return got


def _ignore_signal(*_args: object, **_kwargs: object) -> None:
    """match_signal needs a callback; the wait loop re-reads the unit instead."""


_DEST = b"org.freedesktop.systemd1"
_UNIT_PATH = b"/org/freedesktop/systemd1/unit"
_MANAGER = b"org.freedesktop.systemd1.Manager"
_MANAGER_PATH = b"/org/freedesktop/systemd1"


def _manager_call(bus: DBus, method: bytes, signature: bytes, args: list) -> object:
    """Call a Manager method directly: pystemd's Manager object introspects the
    interface first, which costs several times the call itself."""
    return bus.call_method(_DEST, _MANAGER_PATH, _MANAGER, method,
                           apply_signature(signature, args))


def _get(bus: DBus, name: str, interface: bytes, prop: bytes, signature: bytes) -> Any:
    """One property of a unit, of the Python type pystemd gives `signature` (hence Any).

    Plain Get calls on an open connection: pystemd's Unit objects introspect the unit
    first, which costs more than the reads themselves."""
    path = path_encode(_UNIT_PATH, name.encode())
    return bus.get_property(_DEST, path, b"org.freedesktop.systemd1." + interface, prop, signature)


def _job_pending(bus: DBus, name: str) -> bool:
    """Whether systemd has a job queued or running for the unit (start, stop, restart)."""
    try:
        job_id, _path = _get(bus, name, b"Unit", b"Job", b"(uo)")
    except Exception:
        return False  # not loaded: no job either
    return int(job_id) != 0


def _read_status(bus: DBus, name: str) -> UnitStatus:
    try:
        load_state = _s(_get(bus, name, b"Unit", b"LoadState", b"s"))
    except Exception as exc:
        # Unknown or garbage-collected transient units may have no object to read.
        if "NoSuchUnit" in repr(exc) or "not loaded" in str(exc) or "UnknownObject" in repr(exc):
            return UnitStatus(name, "not-found", "inactive", "dead", 0, 0, "", 0, 0, "")
        raise
    unit = {prop: _get(bus, name, b"Unit", prop.encode(), sig)
            for prop, sig in (("ActiveState", b"s"), ("SubState", b"s"),
                              ("StateChangeTimestamp", b"t"), ("InvocationID", b"ay"))}
    svc = {prop: _get(bus, name, b"Service", prop.encode(), sig)
           for prop, sig in (("MainPID", b"u"), ("NRestarts", b"u"), ("Result", b"s"),
                             ("ExecMainStatus", b"i"), ("StatusText", b"s"))}
    return UnitStatus(
        name=name,
        load_state=load_state,
        active_state=_s(unit["ActiveState"]),
        sub_state=_s(unit["SubState"]),
        main_pid=int(svc["MainPID"]),
        n_restarts=int(svc["NRestarts"]),
        result=_s(svc["Result"]),
        exec_main_status=int(svc["ExecMainStatus"]),
        since_usec=int(unit["StateChangeTimestamp"]),
        status_text=_s(svc["StatusText"]),
        invocation=bytes(unit["InvocationID"] or b"").hex(),
    )


def _cgroup_pids(bus: DBus, name: str, main_pid: int) -> list[int]:
    """PIDs in the unit's cgroup (falls back to the main process and its children)."""
    return pids_in(_s(_get(bus, name, b"Service", b"ControlGroup", b"s")), main_pid)


def listen_host_port(address: str) -> tuple[str, int] | None:
    """("127.0.0.1", 8101) of a `Listen=` address "127.0.0.1:8101" or "[::1]:8101"; None
    for anything else (a path, a bare port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _bind(entry: str) -> tuple[str, str]:
    source, _, dest = entry.partition(":")
    return source, dest or source


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _dbus_message(exc: Exception) -> str:
    text = str(exc)
    for arg in getattr(exc, "args", ()):
        if isinstance(arg, bytes):
            text = arg.decode(errors="replace")
    return text or exc.__class__.__name__
