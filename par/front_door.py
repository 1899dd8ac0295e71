"""pard's side of the front door: the routes it publishes and the units it runs.

- `RoutesPublisher`: a thread that follows the store (every commit notifies it)
  and rewrites `front/routes.json` (atomically, only when it changed).  One
  place: the deployer, the actions, reconcile and the monitor all change the
  store, none of them knows about the front door.
- `ensure_units`: `par-front.socket` (systemd holds the listening socket from
  `front.listen`) and `par-front.service` (`python -m par.front`, sandboxed,
  non-root), created as transient units at pard's start like agents (gone after
  a reboot, created again).  Units already running with the same settings are
  left alone, so restarting pard refuses nothing; a new PAR version restarts only
  the service (the socket stays: nothing refused); changed settings re-create both.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
from pathlib import Path

import par
from par import __version__, layout
from par.config import Config
from par.errors import ParError
from par.front.routes import build_table, render
from par.fsutil import write_if_changed
from par.log import event
from par.store import Store
from par.units import Systemd, UnitSpec

FRONT_SOCKET = "par-front.socket"
FRONT_SERVICE = "par-front.service"
FRONT_USER = "par-front"
# Longest a publisher waits without a commit before reading the store again anyway (a
# routes file removed by hand comes back).  Every change commits, so this is only that
# safety net: each read walks every agent's records, which at 5 s was most of pard's
# idle CPU with 100 agents (docs/benchmarks.md, density).
REPUBLISH_S = 60.0
# The service's stop budget: the process drains its requests for 20 s (par.front.main).
STOP_TIMEOUT_S = 30.0


class RoutesPublisher:
    """Keeps the routes file equal to what the store says."""

    def __init__(self, store: Store, path: Path, logger: logging.Logger) -> None:
        self.store = store
        self.path = path
        self.logger = logger
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self) -> bool:
        """Write the table now if it changed; True when it wrote."""
        store = self.store
        table = build_table(store.currents(), store.in_flight() + store.latest_per_agent())
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        return write_if_changed(self.path, render(table), 0o644)

    def start(self) -> None:
        """Publish once, then follow the store in a thread."""
        self.publish()
        self._thread = threading.Thread(target=self._run, name="routes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following: the thread ends at its next wake-up (closing the store wakes it).
        The file stays: the front door keeps routing while pard is down."""
        self._stop.set()

    def _run(self) -> None:
        seen = -1
        while not self._stop.is_set():
            try:
                seen = self.store.wait_for_commit(seen, REPUBLISH_S)
                if self._stop.is_set():
                    return
                self.publish()
            except ParError as exc:
                if exc.code == "store_closed":
                    return
                event(self.logger, "Routes not published", logging.WARNING, code=exc.code,
                      message=exc.message)
                self._stop.wait(1.0)
            except OSError as exc:
                event(self.logger, "Routes not published", logging.WARNING,
                      message=str(exc), path=str(self.path))
                self._stop.wait(1.0)


def front_url(cfg: Config, agent_id: str) -> str | None:
    """The URL of an agent through the front door, or None when there is none."""
    listen = cfg.front.listen
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
    return f"http://{host}:{port}/agents/{agent_id}/"


def _upstream_host(bind: str) -> str:
    """Where to reach agents that listen on `bind`."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind, bind)


def service_spec(cfg: Config) -> UnitSpec:
    """`par-front.service`: `python -m par.front`, sandboxed like an agent, seeing of PAR's
    state only the routes file's folder."""
    f = cfg.front
    routes = layout.front_routes(cfg)
    argv = [sys.executable, "-m", "par.front", "--routes", str(routes),
            "--upstream-host", _upstream_host(cfg.ports.bind_address),
            "--hold-s", f"{f.hold_s:g}", "--max-body-bytes", str(f.max_body_bytes),
            "--max-connections", str(f.max_connections),
            "--header-timeout-s", f"{f.header_timeout_s:g}",
            "--body-timeout-s", f"{f.body_timeout_s:g}",
            "--idle-timeout-s", f"{f.idle_timeout_s:g}"]
    if cfg.agents.isolate_loopback:
        # in argv, hence in the units' fingerprint: turning it on or off re-creates them
        argv += ["--isolate-loopback", "--source-address", f.source_address]
    # the folder `par` is imported from: dist-packages on a host, where the unit sees it;
    # a source tree (tests) may sit where the sandbox hides it (/tmp, /root): bound in
    # below the hidden state_dir, which the user can reach
    code = str(Path(par.__file__).resolve().parent.parent)
    binds = [str(routes.parent)]
    if not code.startswith("/usr/"):
        inside = str(cfg.paths.state_dir / ".front-code")
        binds.append(f"{code}:{inside}")
        code = inside
    return UnitSpec(
        name=FRONT_SERVICE, description="", argv=argv,
        environment={"PYTHONPATH": code, "PYTHONDONTWRITEBYTECODE": "1"},
        notify=True, timeout_start_s=30, timeout_stop_s=STOP_TIMEOUT_S,
        restart="always", restart_sec=0.2, start_limit_burst=20, start_limit_interval_s=10,
        syslog_identifier="par-front", dynamic_user=FRONT_USER,
        hide_paths=(str(cfg.paths.state_dir), str(cfg.paths.cache_dir)),
        read_only_binds=tuple(binds),
        inaccessible_paths=("-/etc/par",),
        # one fd per client connection and one per connection to an agent
        extra={"LimitNOFILE": 2 * f.max_connections + 1024},
    )


def _fingerprint(cfg: Config, spec: UnitSpec) -> str:
    """What the units were made from: other settings need new units."""
    env = [f"{k}={v}" for k, v in sorted(spec.environment.items())]
    text = "\0".join([str(cfg.front.listen), *spec.argv, *env, *spec.read_only_binds])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensure_units(cfg: Config, systemd: Systemd, logger: logging.Logger) -> str:
    """Make `par-front.socket` and `.service` run with `cfg`'s settings and this PAR's code;
    what was done: "none", "created", "restarted" (new code), "recreated", "started",
    "removed" (front.listen is null)."""
    sock_state, current = _socket_state(systemd)
    svc = systemd.status(FRONT_SERVICE)
    if cfg.front.listen is None:
        if sock_state != "not-found" or svc.exists:
            remove_units(systemd)
            return "removed"
        return "none"
    spec = service_spec(cfg)
    tag = f"[{_fingerprint(cfg, spec)}]"
    description = f"PAR front door {__version__} {tag}"
    if sock_state == "active" and tag in current:
        if f" {__version__} " not in current:
            systemd.start_unit(FRONT_SERVICE, restart=True)  # socket kept: nothing refused
            return "restarted"
        if svc.active_state != "active":
            systemd.start_unit(FRONT_SERVICE)
            return "started"
        return "none"
    done = "created" if sock_state == "not-found" else "recreated"
    if sock_state != "not-found" or svc.exists:
        remove_units(systemd)
    svc_spec = UnitSpec(**{**spec.__dict__, "description": description})
    systemd.start_socket(FRONT_SOCKET, {
        "Description": description,
        "Listen": [("Stream", cfg.front.listen)],
        "Backlog": 4096,
        "CollectMode": "inactive-or-failed",
    }, svc_spec)
    # Started now rather than on the first connection: a broken front door shows at once.
    systemd.start_unit(FRONT_SERVICE)
    st = systemd.wait_active(FRONT_SERVICE, timeout=spec.timeout_start_s)
    if st.active_state != "active":
        raise ParError("front_failed", f"{FRONT_SERVICE} did not start ({st.result}); see "
                       f"journalctl -u {FRONT_SERVICE}")
    event(logger, "Front door " + done, listen=cfg.front.listen, unit=FRONT_SERVICE)
    return done


def _socket_state(systemd: Systemd) -> tuple[str, str]:
    """The socket unit's ActiveState ("not-found" when systemd does not know it) and
    Description (the version and settings it was made with)."""
    load, active, description = systemd.unit_state(FRONT_SOCKET)
    return ("not-found", "") if load == "not-found" else (active, description)


def remove_units(systemd: Systemd) -> None:
    """Stop and forget both units."""
    systemd.stop(FRONT_SERVICE, wait_s=STOP_TIMEOUT_S + 5)
    systemd.reset_failed(FRONT_SERVICE)
    try:
        systemd.stop_socket(FRONT_SOCKET)
    except ParError as exc:
        raise ParError("front_failed", exc.message) from exc
