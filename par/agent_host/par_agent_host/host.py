"""The host's life: load the agent, start its surfaces, READY=1 once they answer, serve, stop.

The main thread waits for stop signals (`signals.SignalWaiter`) between
probes, so a SIGTERM is handled as soon as it arrives and nothing runs in
signal context.
"""

from __future__ import annotations

import importlib
import io
import os
import socket
import sys
import threading
import time

from . import dotenv, listen_fds, loader, log, spec, stdlib_rest
from .api import HostApi
from .exitcodes import EXIT_IMPORT_ERROR, EXIT_OK, EXIT_SURFACE_FAILED, HostError, describe
from .loader import EntryRef
from .notify import NOTIFY_KEYS, Notifier, watchdog_interval
from .signals import SignalWaiter
from .surfaces import Health, Surface

# Seconds between health probes while serving, when systemd asks for no watchdog.
MONITOR_INTERVAL_S = 5.0
# First and longest wait between readiness probes during start: READY=1 is sent at
# most this late after the surfaces answer (a local probe costs about a millisecond).
FIRST_PROBE_DELAY_S = 0.002
MAX_PROBE_DELAY_S = 0.02
# After the surfaces stopped, how long interpreter shutdown may take before the
# host exits anyway (an agent thread that never ends must not outlive the stop).
EXIT_GRACE_S = 2.0


def build_surfaces(api: HostApi,
                   listeners: dict[int, socket.socket] | None = None) -> list[Surface]:
    """Import the declared surfaces' entries and build (not start) them, REST first.

    `listeners`: the listening sockets systemd passed, by port (`listen_fds.take`); a
    surface whose port has none binds it itself.  A2A is always bound by the agent's
    own code (grpc cannot adopt a socket)."""
    agent, env = api.spec, api.env
    held = listeners or {}
    surfaces: list[Surface] = []
    if agent.rest_entry:
        ref = EntryRef.parse("rest entry", agent.rest_entry, "mount")
        try:
            rest = importlib.import_module(f"{__package__}.rest")
        except ImportError as exc:
            raise HostError(
                EXIT_IMPORT_ERROR,
                f"rest entry {ref} needs fastapi and uvicorn in the agent's venv: {exc}",
            ) from exc
        app = rest.build_app(api, loader.load_callable(ref, agent.package_root), ref)
        surfaces.append(
            rest.UvicornSurface(app, env.bind_address, env.ports.rest, env.stop_timeout,
                                held.get(env.ports.rest))
        )
    else:
        surfaces.append(stdlib_rest.surface(api, held.get(env.ports.rest)))
    # The A2A and UI surfaces import asyncio and http.server: only agents that declare them pay.
    if agent.a2a_service:
        from .a2a import A2aSurface

        ref = EntryRef.parse("a2a service", agent.a2a_service, "create_grpc_server")
        surfaces.append(
            A2aSurface(
                loader.load_callable(ref, agent.package_root), ref, env.bind_address,
                env.ports.a2a, env.ready_timeout,
            )
        )
    if agent.ui_path:
        from . import ui

        folder = ui.ui_folder(agent.package_root, agent.ui_path)
        surfaces.append(ui.surface(folder, env.bind_address, env.ports.ui,
                                   held.get(env.ports.ui)))
    return surfaces


class Host:
    """A loaded agent with its built surfaces; `run` is the rest of the process's life.

    watchdog: seconds between WATCHDOG=1 pings, None when systemd asks for none.
    """

    def __init__(self, api: HostApi, surfaces: list[Surface], notify: Notifier,
                 signals: SignalWaiter, watchdog: float | None = None) -> None:
        self.api = api
        self.surfaces = surfaces
        self.notify = notify
        self.signals = signals
        self.watchdog = watchdog
        self._last_ping = 0.0

    @property
    def ports(self) -> str:
        """ "rest=8101 a2a=50101 ui=3101": the STATUS= and startup line's words."""
        return " ".join(f"{s.name}={s.port}" for s in self.surfaces)

    def _ping(self) -> None:
        self.notify("WATCHDOG=1")
        self._last_ping = time.monotonic()

    def run(self) -> int:
        """Start, wait for READY, serve until a signal; the exit status."""
        started: list[Surface] = []
        self._last_ping = time.monotonic()
        self.notify(f"STATUS=starting {self.ports}")
        try:
            for surface in self.surfaces:
                surface.start()
                started.append(surface)
            if self._wait_ready():
                agent, env = self.api.spec, self.api.env
                # logged before READY=1: whoever sees the unit active finds the line too
                log.info(
                    f"agent {agent.name} {agent.version} listening {self.ports} "
                    f"on {env.bind_address}"
                )
                self.notify("READY=1", f"STATUS=serving {self.ports}")
                if self.watchdog:
                    self._ping()
                self._serve()
            return EXIT_OK
        except HostError as exc:
            return _fail(exc, self.notify)
        finally:
            self._stop(started)

    def _probe_all(self) -> dict[str, bool]:
        results = {}
        for surface in self.surfaces:
            if not surface.alive():
                raise HostError(
                    EXIT_SURFACE_FAILED,
                    f"{surface.name} surface on port {surface.port} stopped unexpectedly",
                )
            results[surface.name] = surface.probe()
        return results

    def _silent(self, results: dict[str, bool]) -> str:
        """The surfaces that did not answer, as name=port."""
        return " ".join(f"{s.name}={s.port}" for s in self.surfaces if not results[s.name])

    def _signalled(self, timeout: float) -> bool:
        signum = self.signals.wait(timeout)
        if signum is None:
            return False
        log.info(f"received {signum.name}, stopping")
        return True

    def _wait_ready(self) -> bool:
        """True once every surface answers; False on a stop signal; HostError on timeout."""
        deadline = time.monotonic() + self.api.env.ready_timeout
        delay = FIRST_PROBE_DELAY_S
        while True:
            results = self._probe_all()
            if self.api.health.update(results):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                silent = self._silent(results)
                raise HostError(
                    EXIT_SURFACE_FAILED,
                    f"surfaces not answering after {self.api.env.ready_timeout:g} s: {silent}",
                )
            if self._signalled(min(delay, remaining)):
                return False
            delay = min(delay * 1.5, MAX_PROBE_DELAY_S)
            # Alive while starting: a slow surface is bounded by the ready timeout, not the
            # watchdog (which systemd may already be counting).
            if self.watchdog and time.monotonic() - self._last_ping >= self.watchdog:
                self._ping()

    def _serve(self) -> None:
        """Re-probe every interval; ping the watchdog only while every surface answers."""
        healthy = True
        while not self._signalled(self.watchdog or MONITOR_INTERVAL_S):
            results = self._probe_all()
            ok = self.api.health.update(results)
            if ok and self.watchdog:
                self._ping()
            if ok and not healthy:
                log.info("all surfaces answer again")
                self.notify(f"STATUS=serving {self.ports}")
            elif not ok and healthy:
                silent = self._silent(results)
                log.error(f"surfaces not answering: {silent}")
                self.notify(f"STATUS=degraded, not answering: {silent}")
            healthy = ok

    def _stop(self, started: list[Surface]) -> None:
        """Stop every started surface at once, each draining within the stop timeout."""
        self.notify("STOPPING=1", "STATUS=stopping")
        timeout = self.api.env.stop_timeout
        threads = [
            threading.Thread(target=s.stop, args=(timeout,), name=f"par-stop-{s.name}", daemon=True)
            for s in started
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout + 2
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _exit_guard(code: int) -> None:
    """Exit with `code` even if a non-daemon agent thread would keep the interpreter alive."""
    sys.stdout.flush()
    sys.stderr.flush()
    timer = threading.Timer(EXIT_GRACE_S, os._exit, args=(code,))
    timer.daemon = True
    timer.start()


def _fail(exc: HostError, notify: Notifier) -> int:
    """Report a failure before any surface ran: the agent's traceback (when its code
    raised), the one line, and that line as the unit's STATUS=; the exit status."""
    if exc.__cause__ is not None:
        log.exception(exc.__cause__)
    log.error(exc.message)
    notify(f"STATUS={describe(exc.exit_code)}: {exc.message}")
    return exc.exit_code


def main() -> int:
    """Load the spec and the agent, then run the host; the process's exit status."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)  # each line reaches the journal at once
    notify = Notifier()
    watchdog = watchdog_interval()
    for key in NOTIFY_KEYS:
        os.environ.pop(key, None)
    listeners = listen_fds.take()  # before the agent's code runs, like NOTIFY_SOCKET
    try:
        agent, env = spec.load()
        try:
            dotenv.load(agent.package_root / ".env")
        except dotenv.DotenvError as exc:
            log.error(f"ignoring {agent.package_root / '.env'}: {exc}")
        loader.add_package_paths(agent.package_root)
        log.info(
            f"starting agent {agent.name} {agent.version} "
            f"(agentAppId={env.agent_app_id or '-'} deploymentId={env.deployment_id or '-'})"
        )
        handler = loader.load_callable(EntryRef.parse("entrypoint", agent.entrypoint, "handler"),
                                       agent.package_root)
        api = HostApi(agent, env, Health(agent.surfaces), handler)
        surfaces = build_surfaces(api, listeners)
    except HostError as exc:
        return _fail(exc, notify)
    # Installed after the agent's modules ran, so an import-time handler cannot replace ours.
    host = Host(api, surfaces, notify, SignalWaiter(), watchdog)
    code = host.run()
    _exit_guard(code)
    return code
