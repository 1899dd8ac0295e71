"""What an operator does to a deployed agent: stop, start, restart, remove (and purge).

Each action runs under the agent's lock with the pipeline's own `start`,
`stop` and `relaunch` steps, so an agent is started and stopped the same way
whether a deploy, an action or reconcile does it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from par import agent_state, ownership, pipeline
from par.agent_locks import AgentLocks
from par.agent_unit import env_file_path, write_env_file
from par.deploy_request import parse_deploy_request
from par.deployer import Deployer
from par.errors import NotFound, ParError
from par.pipeline import Core
from par.store import Deployment, Store
from par.units import unit_name

ACTIONS = ("stop", "start", "restart")


def resolve(store: Store, ident: str) -> Deployment:
    """A deploymentId, or an agentAppId meaning its current (else latest) deployment.

    An ident that is a deploymentId of one agent and the agentAppId of another is
    refused (409 `ambiguous_id`, naming both): guessing acted on the wrong agent."""
    d = store.find(ident)
    if d is not None:
        if d.agent_app_id != ident and store.deployments(agent_app_id=ident):
            raise ParError("ambiguous_id",
                           f"{ident!r} is deployment {d.deployment_id} of agent "
                           f"{d.agent_app_id} and also the agent {ident}; use the other "
                           f"agent's deploymentId instead", "id", 409)
        return d
    d = store.current(ident)
    if d is not None:
        return d
    latest = store.deployments(agent_app_id=ident)
    if latest:
        return latest[0]
    raise NotFound(f"no deployment or agent named {ident!r}", "id")


def _current(d: Deployment) -> Deployment:
    """`d`, when it is its agent's current deployment; else 409 `not_current`."""
    if not d.current:
        raise ParError("not_current", f"deployment {d.deployment_id} is not the current "
                       f"one of {d.agent_app_id}", "id", 409)
    return d


@dataclass(frozen=True)
class Actions:
    """The agent actions of the API, over the pipeline's steps."""

    core: Core
    locks: AgentLocks
    deployer: Deployer

    def act(self, ident: str, name: str) -> Deployment:
        """stop / start / restart the agent of a (current) deployment."""
        if name not in ACTIONS:
            raise ParError("bad_action", f"unknown action {name!r}", "action", 400)
        store = self.core.store
        d = _current(resolve(store, ident))
        with self.locks.of(d.agent_app_id):
            # as it is now: a removal or a deploy that held the lock may have changed it,
            # and acting on the record read before would start a unit nothing owns
            d = _current(store.get(d.deployment_id))
            if name == "stop":
                self._stop(d)
            else:
                self._start(d, restart=name == "restart")
            store.add_event(d.deployment_id, d.agent_app_id, f"Agent {name}", by="api")
        return store.get(d.deployment_id)

    def _stop(self, d: Deployment) -> None:
        store = self.core.store
        store.update(d.deployment_id, desired_state="stopped", status="stopping")
        # the ports go too: a held socket would start the agent on the next connection
        pipeline.stop_deployment(self.core, d, release=True)
        store.update(d.deployment_id, status="stopped")

    def _start(self, d: Deployment, restart: bool) -> None:
        core, store = self.core, self.core.store
        running = core.systemd.status(unit_name(d.agent_app_id)).active_state == "active"
        launch = None
        if restart or not running:
            try:
                # Before anything is stopped: a restart that cannot start the agent
                # again (its extracted package is gone) leaves the running one alone.
                launch = pipeline.relaunch(core, d)
            except ParError as exc:
                if not running:
                    store.fail(d.deployment_id, exc.code, exc.message, exc.field)
                raise
        store.update(d.deployment_id, desired_state="running", status="starting")
        try:
            if restart:
                pipeline.stop_deployment(core, d)
            if launch is not None:
                pipeline.start(core, launch)
        except ParError as exc:
            store.fail(d.deployment_id, exc.code, exc.message, exc.field)
            pipeline.release_if_idle(core, d.agent_app_id)
            raise
        store.update(d.deployment_id, status="healthy", error_code=None,
                     error_message=None, error_field=None)

    def set_env(self, ident: str, values: dict[str, str], unset: list[str],
                restart: bool) -> tuple[int, dict]:
        """Change the current deployment's own variables (the deploy request's `env`).

        With `restart`, a new deployment of the same package (its kept bytes) and
        venv, with the changed variables, replaces the current one the usual way:
        started, proven healthy, rolled back on failure; (202, accepted) as a deploy
        answers.  Without, the current deployment's record and env file change and
        the next start of its unit (a restart, a crash) uses them: (200, record).
        Names are checked as a deploy request's; values are never returned."""
        core, store = self.core, self.core.store
        d = _current(resolve(store, ident))
        env = {**d.env, **values}
        for key in unset:
            env.pop(key, None)
        body = {**d.full_request(), "env": env,
                "deploymentId": f"{d.agent_app_id}-env-{secrets.token_hex(4)}"}
        if d.package_digest is not None:
            body["packageSha256"] = d.package_digest  # the kept package, never fetched again
        # the deploy request's rules for names and values (and a stored local URL)
        req = parse_deploy_request(body, local=True, idempotency_key=None)
        if restart:
            return self.deployer.submit(req)
        with self.locks.of(d.agent_app_id):
            _current(store.get(d.deployment_id))  # still current now that the lock is ours
            d = store.set_env(d.deployment_id, req.env)
            write_env_file(core.cfg, pipeline.relaunch(core, d))
        return 200, {"deployment": d.to_api(), "restart": "pending"}

    def remove(self, ident: str, purge: bool) -> dict:
        """Stop the agent and forget the deployment; with `purge`, delete its files too.

        A deploy still queued is taken out of its queue and never runs; one that is
        running is removed once it has finished (the agent's lock waits for it)."""
        core, store = self.core, self.core.store
        d = resolve(store, ident)
        agent = d.agent_app_id
        self.deployer.cancel(d.deployment_id, agent)
        purged: list[str] = []
        with self.locks.of(agent):
            d = store.get(d.deployment_id)
            already = d.status == "removed"
            if d.current:
                pipeline.stop_deployment(core, d, release=True)
                env_file_path(core.cfg, agent).unlink(missing_ok=True)
                store.clear_current(agent)
            # a socket left by a failed start of a deployment no longer current goes too
            pipeline.release_if_idle(core, agent)
            if not already:
                store.update(d.deployment_id, desired_state="removed", status="removed")
                store.add_event(d.deployment_id, agent, "Deployment removed", purge=purge)
            if purge:  # also after an earlier plain remove: its files are still there
                purged = ownership.purge(core.cfg, store, core.venvs, core.logger, d)
                if not any(x.agent_app_id == agent and x.org_id == d.org_id
                           for x in ownership.keepers(store, d.deployment_id)):
                    # the org's last deployment of the agent: its state goes too (the unit
                    # is stopped); another org's deploy never sees it (par.agent_state)
                    purged += agent_state.clear(agent, d.org_id)
        return {"deleted": d.deployment_id, "agentAppId": agent, "purged": purged,
                "alreadyRemoved": already}
