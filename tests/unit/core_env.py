"""The orchestration core wired as pard wires it (par.daemon), on a FakeSystemd.

Everything but systemd is real: the SQLite store in tmp_path, fetch of `file://`
packages, extraction, VenvManager with uv (offline; packages without
requirements build a venv in about 0.1 s), the Deployer's worker threads.
journalctl is replaced by the fake's journal.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from par import layout
from par.actions import Actions
from par.agent_locks import AgentLocks
from par.agent_sockets import ParkedPorts
from par.config import Config
from par.config import Installer as InstallerConfig
from par.deploy_request import DeployRequest, parse_deploy_request
from par.deployer import Deployer
from par.host_files import HOST_SOURCE
from par.pipeline import Core
from par.reconcile import ReconcileReport, reconcile
from par.store import Deployment, Store
from par.venvs import VenvManager
from tests.unit.apkg_factory import GOOD_MAIN, make_cfg, package
from tests.unit.fake_systemd import FakeSystemd
from tests.wheels import uv_binary

# Where a deploy ends (the deployer leaves it there until the next action).
FINAL = ("healthy", "failed", "removed", "stopped")
WAIT_S = 10.0


def manifest(version: str = "1.0.0", extra: str = "") -> str:
    """An agent.yaml for the demo agent at `version` (`extra`: more YAML lines)."""
    return f"name: demo-agent\nversion: {version}\nentrypoint: main:handler\n{extra}"


def poll(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """Call `check` until it returns something truthy (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


@dataclass
class CoreEnv:
    """One pard's core on a FakeSystemd, with helpers to deploy and wait."""

    tmp: Path
    cfg: Config
    core: Core
    fake: FakeSystemd
    locks: AgentLocks
    deployer: Deployer
    actions: Actions

    @property
    def store(self) -> Store:
        return self.core.store

    # ---------------------------------------------------------------- packages, requests

    def package(self, name: str = "pkg", version: str = "1.0.0",
                requirements: str | None = "", extra_manifest: str = "",
                manifest_text: str | None = None, main: str | None = GOOD_MAIN,
                files: dict[str, str | bytes] | None = None) -> Path:
        """A package file `tmp/<name>.apkg` (`requirements` None: no requirements.txt)."""
        content: dict[str, str | bytes] = dict(files or {})
        if requirements is not None:
            content["requirements.txt"] = requirements
        text = manifest_text if manifest_text is not None else manifest(version, extra_manifest)
        return package(self.tmp / f"{name}.apkg", content, manifest=text, main=main)

    def request(self, did: str, pkg: Path, agent: str = "agent-a", version: str = "1.0.0",
                **fields: Any) -> DeployRequest:
        """A deploy request as the unix socket would accept it."""
        body = {"deploymentId": did, "agentAppId": agent, "orgId": "org-1",
                "version": version, "packageUrl": f"file://{pkg}", **fields}
        return parse_deploy_request(body, local=True, idempotency_key=None)

    def submit(self, did: str, pkg: Path, agent: str = "agent-a", version: str = "1.0.0",
               **fields: Any) -> None:
        """Submit a deploy (returns at once; see `wait`)."""
        status, _ = self.deployer.submit(self.request(did, pkg, agent, version, **fields))
        assert status == 202

    def wait(self, did: str, until: tuple[str, ...] = FINAL,
             timeout: float = WAIT_S) -> Deployment:
        """The deployment once its status is one of `until` and the deployer is idle
        (so the bookkeeping after a status change, e.g. the previous one `stopped`,
        is done)."""
        def done() -> Deployment | None:
            d = self.store.get(did)
            idle = self.deployer.running() == 0 and not self.store.in_flight()
            return d if d.status in until and idle else None
        return poll(f"{did} to reach {until} (now {self.store.get(did).status})", done, timeout)

    def deployed(self, did: str = "d1", version: str = "1.0.0",
                 clear_calls: bool = True) -> Deployment:
        """A healthy deployment of agent-a from a package of `version`; with `clear_calls`,
        the fake's call log starts empty after it."""
        d = self.deploy(did, self.package(f"p-{version}", version), version=version)
        assert d.status == "healthy", d
        if clear_calls:
            self.fake.clear_calls()
        return d

    def deploy(self, did: str, pkg: Path, agent: str = "agent-a", version: str = "1.0.0",
               **fields: Any) -> Deployment:
        """Submit a deploy and wait for its end."""
        self.submit(did, pkg, agent, version, **fields)
        return self.wait(did)

    # ---------------------------------------------------------------- pard restarts

    def restart_pard(self) -> ReconcileReport:
        """A new pard on the same store and systemd: fresh locks, no parked ports (the
        old process's bridges closed with it), reconcile."""
        self.fake.clear_calls()
        self.core.parked.close()
        self.core = dataclasses.replace(self.core, parked=ParkedPorts())
        self.locks = AgentLocks()
        self.deployer.shutdown()
        self.deployer = Deployer(self.core, self.locks, 4)
        self.actions = Actions(self.core, self.locks, self.deployer)
        return reconcile(self.core, self.locks)

    # ---------------------------------------------------------------- disk

    def files(self, agent: str = "agent-a") -> list[str]:
        """The agent's packages, extractions and venvs on disk, by name."""
        found: list[str] = []
        for folder in (layout.packages(self.cfg), layout.extracted(self.cfg),
                       layout.venvs(self.cfg)):
            if folder.is_dir():
                found += sorted(f"{folder.name}/{p.name}" for p in folder.iterdir()
                                if p.name.startswith(agent))
        return found

    def leftovers(self) -> list[str]:
        """Everything in packages/, extracted/ and venvs/ (layers included), but the
        build locks and the packages' source records: what deploys left on disk."""
        found: list[str] = []
        for folder in (layout.packages(self.cfg), layout.extracted(self.cfg),
                       layout.venvs(self.cfg), layout.layers(self.cfg)):
            if folder.is_dir():
                found += sorted(f"{folder.name}/{p.name}" for p in folder.iterdir()
                                if p.name not in (".sources", layout.LOCK_DIR,
                                                  layout.LAYER_DIR))
        return found

    def events(self, did: str) -> list[str]:
        """The names of a deployment's events, oldest first."""
        return [e["event"] for e in self.store.events(did)]


def make_env(tmp_path: Path) -> CoreEnv:
    """The core as par.daemon builds it, with a FakeSystemd (close with `close_env`)."""
    base = make_cfg(tmp_path)
    cfg = dataclasses.replace(base, installer=InstallerConfig(
        kind="uv", uv_path=uv_binary(), offline=True))
    logger = logging.getLogger("par.test.core")
    store = Store.open(layout.store(cfg))
    fake = FakeSystemd()
    core = Core(cfg=cfg, store=store, systemd=fake, venvs=VenvManager(cfg, logger),
                logger=logger, host_dir=HOST_SOURCE)
    locks = AgentLocks()
    deployer = Deployer(core, locks, 4)
    return CoreEnv(tmp_path, cfg, core, fake, locks, deployer, Actions(core, locks, deployer))


def close_env(env: CoreEnv) -> None:
    """Let held waits through, stop the workers, close the store."""
    env.fake.release()
    env.deployer.shutdown()
    poll("the deploy workers to stop", lambda: env.deployer.running() == 0)
    env.store.close()
