"""The same-run baseline: the existing runtime's deploy steps, done by a small script.

    python -m venv <venv>                                    (with pip, as the runtime does)
    <venv>/bin/pip install --cache-dir <warm cache> -r requirements.txt
    start the agent as a child process
    poll its GET /health: at once, then after 0.1 s, 0.15 s, 0.225 s, ... (x 1.5)

Packages come from the same local wheelhouse as PAR's (`--no-index
--find-links`), so both sides install the same files offline.  The child is
PAR's own agent host run from the legacy venv (no systemd, no sandbox), from
a compiled copy like pard's, so both sides run exactly the same agent code:
only the orchestration differs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import PYTHON, free_port, health_ok
from bench.venv_build import legacy_build
from par import config
from par.agent_unit import AgentLaunch, environment, write_host_spec
from par.fsutil import remove_tree
from par.host_files import install_host
from par.manifest import load_manifest

FIRST_POLL_DELAY_S = 0.1
POLL_BACKOFF = 1.5


@dataclass
class Child:
    """A running agent started by the baseline."""

    proc: subprocess.Popen
    port: int
    log: Path


@dataclass
class LegacyRuntime:
    """Builds venvs and starts agents the way the existing runtime does."""

    work: Path
    wheelhouse: Path
    cache: Path = field(init=False)
    cfg: config.Config = field(init=False)
    host_dir: Path = field(init=False)  # the compiled agent host, as pard installs it

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.cache = self.work / "pip-cache"
        self.cfg = config.with_state_dir(config.from_dict(None), self.work / "state")
        self.host_dir = install_host(self.cfg)

    def build_venv(self, venv: Path, requirements: str) -> float:
        """`python -m venv` + `pip install --cache-dir -r`; seconds."""
        req = self.work / "requirements.txt"
        req.write_text(requirements)
        if not requirements.strip():
            # no requirements: the runtime still makes the venv (with pip)
            start = time.monotonic()
            subprocess.run([str(PYTHON), "-m", "venv", str(venv)], check=True, timeout=600,
                           capture_output=True)
            return time.monotonic() - start
        return legacy_build(venv, req, self.wheelhouse, self.cache)

    def warm(self, requirements: str) -> None:
        """Fill pip's cache once (not timed): the baseline is measured warm, like PAR."""
        venv = self.work / "warm-venv"
        self.build_venv(venv, requirements)
        remove_tree(venv)

    def start(self, venv: Path, agent_folder: Path, agent_id: str) -> Child:
        """Start the agent in `venv` as a child process on a free port."""
        cfg = self.cfg
        manifest = load_manifest(agent_folder)
        ports = {"rest": free_port(), "a2a": free_port(), "ui": free_port()}
        launch = AgentLaunch(
            agent_id=agent_id, deployment_id=f"{agent_id}-baseline", org_id="bench",
            name=manifest.name, version=manifest.version or "1.0.0", package_root=agent_folder,
            venv_path=venv, ports=ports, entrypoint=manifest.entrypoint,
            rest_entry=manifest.rest_entry, a2a_service=manifest.a2a_service,
            ui_path=manifest.ui_path, env=dict(manifest.environment), host_dir=self.host_dir,
        )
        write_host_spec(launch)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **environment(cfg, launch),
               "HOME": str(self.work)}
        log = self.work / f"{agent_id}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen([str(venv / "bin" / "python"), "-m", "par_agent_host"],
                                    cwd=agent_folder, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        return Child(proc, ports["rest"], log)

    def wait_health(self, child: Child, timeout: float = 120) -> None:
        """Poll /health with the runtime's backoff until it answers ok."""
        delay = FIRST_POLL_DELAY_S
        deadline = time.monotonic() + timeout
        while not health_ok(child.port):
            if child.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(child)
                raise RuntimeError(f"baseline agent did not become healthy:\n"
                                   f"{child.log.read_text()[-2000:]}")
            time.sleep(delay)
            delay *= POLL_BACKOFF

    @staticmethod
    def stop(child: Child, timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL to the child's process group."""
        if child.proc.poll() is None:
            os.killpg(child.proc.pid, signal.SIGTERM)
            try:
                child.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait(10)
