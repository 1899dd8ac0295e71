"""`pard`: the PAR daemon (runs as par.service, Type=notify).

Start-up order, each step fatal on failure with a journal line saying why:
config → folders → store → stale temporary files removed → reconcile with
systemd → API listening → READY=1.  Then the main loop pings the watchdog
and refreshes STATUS= until SIGTERM.  Signal handlers only enqueue; the loop
acts.  Stopping `pard` never stops an agent: agents are their own units.

Exit statuses: 0 clean stop, 1 runtime failure (systemd restarts pard),
2 configuration or store refused (par.service has RestartPreventExitStatus=2:
restarting cannot fix it).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import stat
import sys
import time
from pathlib import Path

import sdnotify

from par import (
    __version__,
    config,
    disk_reserve,
    extract,
    fetch,
    layout,
    log,
    loopback,
    retention,
)
from par.actions import Actions
from par.agent_locks import AgentLocks
from par.api import ApiServer
from par.deployer import Deployer
from par.errors import ParError
from par.front_door import RoutesPublisher, ensure_units
from par.host_files import install_host
from par.monitor import UnitMonitor
from par.pipeline import Core
from par.reconcile import reconcile
from par.service import ParService
from par.store import Store
from par.units import Systemd
from par.venvs import VenvManager, cache_on_same_filesystem, cleanup_stale

EXIT_OK, EXIT_FAILURE, EXIT_REFUSED = 0, 1, 2
STATUS_EVERY_S = 10.0


def prepare_dirs(cfg: config.Config) -> None:
    """Create PAR's folders with their modes.

    Agents run as dynamic users and see only their own package and venv, through
    bind mounts: the files inside are world-readable, the folders above them need
    not be.  extracted/ is root-only, since packages hold `.env` files other local
    users must not read; packages and the store are root-only too.
    """
    for path, mode in ((cfg.paths.state_dir, 0o755), (layout.extracted(cfg), 0o700),
                       (layout.venvs(cfg), 0o755), (layout.packages(cfg), 0o700),
                       (layout.store(cfg).parent, 0o700), (cfg.paths.cache_dir, 0o755),
                       (layout.tools(cfg), 0o755)):
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)


def read_token(path: Path) -> str:
    """The TCP bearer token; refuse to serve TCP without a non-empty, root-only one.

    A token other local users can read (group/world bits) or change (not owned by
    root) would let them act as the control plane, so such a file is refused.
    """
    try:
        with path.open("rb") as fh:
            info = os.fstat(fh.fileno())  # the file read, not a path swapped meanwhile
            raw = fh.read()
    except OSError as exc:
        raise ParError("token_missing",
                       f"listen.tcp is set but the token file {path} cannot be read "
                       f"({exc.strerror})",
                       "listen.token_file") from exc
    check_token_file_mode(path, info.st_mode, info.st_uid)
    token = raw.decode("utf-8", "replace").strip()
    if not token:
        raise ParError("token_missing", f"token file {path} is empty", "listen.token_file")
    return token


def check_token_file_mode(path: Path, mode: int, uid: int) -> None:
    """Refuse a token file that is group- or world-accessible or not owned by root."""
    if uid != 0:
        raise ParError("token_unsafe",
                       f"token file {path} is owned by uid {uid}, not root; "
                       f"fix: chown root:root {path} && chmod 600 {path}",
                       "listen.token_file")
    if mode & 0o077:
        raise ParError("token_unsafe",
                       f"token file {path} has mode {stat.S_IMODE(mode):04o}: group or others "
                       f"may read or write it; fix: chmod 600 {path}",
                       "listen.token_file")


class Daemon:
    """One pard process: owns the store, the deployer and the API servers."""

    def __init__(self, cfg: config.Config, logger: logging.Logger) -> None:
        self.cfg = cfg
        self.logger = logger
        self.events: queue.Queue[str] = queue.Queue()
        # sdnotify, the library made for it; the agent host has a stdlib copy of its own
        # only because the host must run in agents' venvs without PAR's dependencies
        self.notifier = sdnotify.SystemdNotifier()
        self.store: Store | None = None
        self.api: ApiServer | None = None
        self.deployer: Deployer | None = None
        self.monitor: UnitMonitor | None = None
        self.routes: RoutesPublisher | None = None

    def _warn_without_disk_reserve(self) -> None:
        """An agent filling its state folder would stop pard's own writes too: say so
        at start (par.disk_reserve); a failure to look is logged, never fatal."""
        try:
            reserve = disk_reserve.examine(self.cfg.paths.state_dir)
        except OSError as exc:
            log.event(self.logger, "Could not check the disk reserve", logging.WARNING,
                      error=str(exc))
            return
        if not reserve.ok:
            log.event(self.logger, "Agents' state can fill pard's disk", logging.WARNING,
                      detail=reserve.detail, hint=reserve.fix)

    def start(self) -> None:
        """Everything up to READY=1 (raises ParError when something is refused)."""
        cfg = self.cfg
        prepare_dirs(cfg)
        self.store = store = Store.open(layout.store(cfg),
                                        max_events=cfg.retention.events_per_deployment)
        # a killed pard may have left partial downloads, extractions and venv builds
        removed = fetch.cleanup_stale(cfg) + extract.cleanup_stale(cfg) + cleanup_stale(cfg)
        if removed:
            log.event(self.logger, "Removed stale temporary folders", paths=removed)
        if not cache_on_same_filesystem(cfg):
            log.event(self.logger, "Cache and venvs on different filesystems", logging.WARNING,
                      cache_dir=str(cfg.paths.cache_dir), venvs=str(layout.venvs(cfg)),
                      hint="uv cannot hardlink: every venv gets full copies; move paths.cache_dir")
        if cfg.agents.isolate_loopback:
            self.log_loopback_resolvers()
        self._warn_without_disk_reserve()
        core = Core(cfg=cfg, store=store, systemd=Systemd(), venvs=VenvManager(cfg, self.logger),
                    logger=self.logger, host_dir=install_host(cfg))
        if core.venvs.start_uv_bootstrap():  # kind auto, no uv: fetched in the background
            log.event(self.logger, "No uv on this host: builds use pip until it is fetched",
                      version=cfg.installer.uv_version)
        locks = AgentLocks()
        self.deployer = Deployer(core, locks, cfg.workers)
        report = reconcile(core, locks)
        retention.at_start(cfg, store, locks.of, self.logger, time.time())
        self.monitor = UnitMonitor(store, core.systemd, locks.of, self.logger)
        self.monitor.start()
        self.routes = RoutesPublisher(store, layout.front_routes(cfg), self.logger)
        self.routes.start()
        self.start_front(core.systemd)
        service = ParService(core, self.deployer, Actions(core, locks, self.deployer))
        self.api = ApiServer(service, cfg, self.logger)
        self.api.serve_unix(cfg.listen.socket)
        if cfg.listen.tcp:
            host, _, port = cfg.listen.tcp.rpartition(":")
            self.api.serve_tcp(host or "127.0.0.1", int(port), read_token(cfg.listen.token_file))
        log.event(self.logger, "pard ready", version=__version__, socket=str(cfg.listen.socket),
                  tcp=cfg.listen.tcp, adopted=len(report.adopted), restarted=len(report.restarted))
        self.notifier.notify(f"READY=1\nSTATUS={self.status_line()}")

    def log_loopback_resolvers(self) -> None:
        """Say which loopback resolvers isolated agents keep, and warn about those they lose
        (a resolver on 127.0.0.1 cannot be allowed without opening everything there)."""
        allowed, refused = loopback.read_resolvers()
        if refused:
            log.event(self.logger, "Agents cannot reach these resolvers", logging.WARNING,
                      resolvers=refused, file=str(loopback.RESOLV_CONF),
                      hint="with agents.isolate_loopback, a resolver on 127.0.0.1 or ::1 is "
                           "denied to agents; serve DNS on another address (127.0.0.53) or "
                           "list it in agents.loopback_allow (docs/security.md, attack 8)")
        elif allowed:
            log.event(self.logger, "Agents keep their loopback resolvers", resolvers=allowed)

    def start_front(self, systemd: Systemd) -> None:
        """The front door's units; pard serves (and agents answer on their ports) without
        them, so a failure is logged, not fatal."""
        try:
            ensure_units(self.cfg, systemd, self.logger)
        except ParError as exc:
            log.event(self.logger, "Front door not running", logging.ERROR, code=exc.code,
                      message=exc.message, listen=self.cfg.front.listen)

    def status_line(self) -> str:
        assert self.store is not None
        counts = self.store.counts_by_status()
        healthy = counts.get("healthy", 0)
        others = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s != "healthy" and n)
        return f"{healthy} agent(s) healthy" + (f"; {others}" if others else "")

    def run(self) -> None:
        """The main loop: watchdog pings and STATUS= until a stop signal arrives."""
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        tick = min(STATUS_EVERY_S, watchdog_usec / 2_000_000) if watchdog_usec else STATUS_EVERY_S
        last_status = 0.0
        while True:
            try:
                what = self.events.get(timeout=tick)
            except queue.Empty:
                what = None
            if what == "stop":
                return
            if watchdog_usec:
                self.notifier.notify("WATCHDOG=1")
            if time.monotonic() - last_status >= STATUS_EVERY_S:
                self.notifier.notify(f"STATUS={self.status_line()}")
                last_status = time.monotonic()

    def stop(self) -> None:
        """Stop serving; agents keep running (they are their own units)."""
        self.notifier.notify("STOPPING=1")
        if self.api:
            self.api.shutdown()
        if self.monitor:
            self.monitor.stop()
        if self.routes:
            self.routes.stop()
        if self.deployer:
            self.deployer.shutdown()
        if self.store:
            self.store.close()
        log.event(self.logger, "pard stopped")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pard` command."""
    parser = argparse.ArgumentParser(prog="pard", description="PAR daemon (run by par.service)")
    parser.add_argument("--config", type=Path, default=config.DEFAULT_CONFIG_PATH,
                        help="configuration file (default: %(default)s)")
    parser.add_argument("--version", action="version", version=f"pard {__version__}")
    args = parser.parse_args(argv)
    logger = log.setup()
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        log.event(logger, "Invalid configuration", logging.ERROR, file=str(args.config),
                  key=exc.field, message=exc.message)
        return EXIT_REFUSED
    daemon = Daemon(cfg, logger)
    # Handlers only enqueue: nothing logs or locks in signal context.
    signal.signal(signal.SIGTERM, lambda *_: daemon.events.put("stop"))
    signal.signal(signal.SIGINT, lambda *_: daemon.events.put("stop"))
    try:
        daemon.start()
    except ParError as exc:
        log.event(logger, "pard refused to start", logging.ERROR, code=exc.code,
                  message=exc.message, field=exc.field)
        daemon.stop()
        return EXIT_REFUSED if exc.code in ("store_corrupt", "store_too_new", "token_missing",
                                            "token_unsafe",
                                            "config_invalid") else EXIT_FAILURE
    except Exception:
        logger.exception("pard failed to start")
        daemon.stop()
        return EXIT_FAILURE
    try:
        daemon.run()
    finally:
        daemon.stop()
    if daemon.deployer is not None and daemon.deployer.running():
        # Deploys still running are abandoned, as after a crash (reconcile fails or finishes
        # them at the next start).  The interpreter would wait for their threads at exit,
        # holding a restart for up to the install or boot timeout.
        logging.shutdown()
        os._exit(EXIT_OK)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
