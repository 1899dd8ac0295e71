"""parctl as a person runs it: a subprocess against pard (par.service) under real systemd."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from par import layout
from tests.conftest import REPO

from . import agents
from .conftest import wait_for
from .pard import EXAMPLES, Pard, agent_get, apkg_with

# parctl keeps the folders it packs in $XDG_CACHE_HOME: a folder of this run's
PARCTL_CACHE = Path(tempfile.gettempdir()) / f"parctl-cache-{os.getpid()}"


@pytest.fixture(scope="module", autouse=True)
def parctl_cache_removed() -> Iterator[None]:
    yield
    shutil.rmtree(PARCTL_CACHE, ignore_errors=True)


def parctl(*args: str, timeout: float = 300,
           socket: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(PARCTL_CACHE)}
    if socket is not None:
        env["PARCTL_SOCKET"] = str(socket)
    return subprocess.run([sys.executable, "-m", "par.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, \
        f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res.stdout


def test_deploy_a_folder_shows_phases_and_hints(pard: Pard) -> None:
    out = ok(parctl("deploy", str(EXAMPLES / "hello-agent"), "--id", "cli-hello"))
    assert "healthy" in out
    assert "par-agent@cli-hello.service" in out
    assert "systemctl status par-agent@cli-hello" in out
    assert "/health" in out
    for phase in ("downloading", "venv", "starting"):
        assert phase in out, out


def test_deploy_an_apkg_and_json(pard: Pard) -> None:
    apkg = pard.pack("hello-agent")
    res = parctl("deploy", str(apkg), "--id", "cli-apkg", "--version", "2.0.0", "--json")
    data = json.loads(ok(res))
    dep = data.get("deployment", data)
    assert dep["status"] == "healthy" and dep["agentAppId"] == "cli-apkg"
    assert dep["version"] == "2.0.0"


def test_deploy_failure_shows_the_installer_message(pard: Pard, tmp_path: Path) -> None:
    folder = tmp_path / "badreq"
    for name, text in agents.with_requirements("badreq", "no-such-package-par-cli==1.0\n").items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    res = parctl("deploy", str(folder))
    assert res.returncode == 1
    assert "no-such-package-par-cli" in res.stderr + res.stdout


def test_list_status_health_logs(pard: Pard) -> None:
    ok(parctl("deploy", str(EXAMPLES / "hello-agent"), "--id", "cli-obs"))
    out = ok(parctl("list"))
    assert "cli-obs" in out and "healthy" in out
    listed = json.loads(ok(parctl("list", "--json")))
    ids = [a["agentAppId"] for a in listed["agents"]] if isinstance(listed, dict) else \
        [a["agentAppId"] for a in listed]
    assert "cli-obs" in ids
    assert "cli-obs" in ok(parctl("status", "cli-obs"))
    assert json.loads(ok(parctl("status", "cli-obs", "--json")))
    health = json.loads(ok(parctl("health", "cli-obs", "--json")))
    assert health["healthy"] is True
    wait_for(lambda: "hello-agent: loaded" in parctl("logs", "cli-obs", "-n", "50").stdout)


def test_stop_start_restart(pard: Pard) -> None:
    d = pard.deploy("cli-life", apkg_with(pard.root / "apkg", agents.probe("cli-life")))
    port = d["ports"]["rest"]
    ok(parctl("stop", "cli-life"))
    assert agent_get(port, "/health", timeout=1)[0] != 200 if _listening(port) else True
    stopped = parctl("status", "cli-life", "--json")
    assert stopped.returncode == 3  # not running, as systemctl status says
    assert json.loads(stopped.stdout)["deployment"]["status"] == "stopped"
    ok(parctl("start", "cli-life"))
    assert agent_get(port, "/health")[0] == 200
    ok(parctl("restart", "cli-life"))
    assert agent_get(port, "/health")[0] == 200


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_rm_and_purge(pard: Pard) -> None:
    d = pard.deploy("cli-rm", apkg_with(pard.root / "apkg", agents.probe("cli-rm")))
    key = layout.package_key("cli-rm", d["version"], d["packageDigest"])
    package, extracted = pard.state / "packages" / f"{key}.apkg", pard.state / "extracted" / key
    assert extracted.exists() and package.exists()
    ok(parctl("rm", "cli-rm", "--purge"))
    assert not extracted.exists() and not package.exists()
    assert not _unit_exists("cli-rm")
    d2 = pard.deploy("cli-rm2", apkg_with(pard.root / "apkg", agents.probe("cli-rm2")))
    ok(parctl("rm", "cli-rm2"))
    key2 = layout.package_key("cli-rm2", d2["version"], d2["packageDigest"])
    assert (pard.state / "extracted" / key2).exists()  # plain rm keeps files
    assert not _unit_exists("cli-rm2")


def _unit_exists(agent: str) -> bool:
    from par.units import Systemd

    return Systemd().status(f"par-agent@{agent}.service").active_state == "active"


def test_venv_list_and_prune(pard: Pard) -> None:
    data = json.loads(ok(parctl("venv", "list", "--json")))
    venvs = data["venvs"] if isinstance(data, dict) else data
    assert venvs and all("name" in v for v in venvs)
    assert "NAME" in ok(parctl("venv", "list")).upper()
    pruned = json.loads(ok(parctl("venv", "prune", "--json")))
    in_use = {a["deployment"]["venv"] for a in pard.client().agents()["agents"]}
    assert not set(pruned["evicted"]) & in_use
    left = {v["name"] for v in pard.client().venvs()["venvs"]}
    assert in_use <= left


def test_doctor_healthy_and_version(pard: Pard) -> None:
    out = ok(parctl("doctor"))
    assert "fail" not in out.split()
    assert "ok" in out
    assert json.loads(ok(parctl("doctor", "--json")))["ok"] is True
    assert ok(parctl("version"))


def test_unreachable_pard_exits_69_with_the_hint(pard: Pard, tmp_path: Path) -> None:
    res = parctl("list", socket=tmp_path / "nope.sock")
    assert res.returncode == 69
    assert "systemctl start par" in res.stderr
    assert "Traceback" not in res.stderr
    pard.stop()
    try:
        res = parctl("doctor")
        assert res.returncode == 1 and "fail" in res.stdout
        res = parctl("status", "anything")
        assert res.returncode == 69 and "systemctl start par" in res.stderr
    finally:
        pard.start()


def test_not_found_exits_4_as_systemctl_does(pard: Pard) -> None:
    res = parctl("status", "no-such-agent-cli")
    assert res.returncode == 4


@pytest.mark.parametrize("cmd", [[], ["deploy"], ["list"], ["status"], ["logs"], ["rm"], ["venv"],
                                 ["venv", "prewarm"], ["doctor"], ["pack"], ["installer"]])
def test_help_of_every_command(cmd: list[str]) -> None:
    out = ok(parctl(*cmd, "--help"))
    assert "Usage:" in out and len(out.splitlines()) >= 4
