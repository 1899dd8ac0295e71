#!/usr/bin/python3
"""Cold deploys on a clean Debian 12 root with the installed .deb (run inside it).

`bench/deb-cold` (= `scripts/bench --deb`) boots the root, installs the package,
serves the wheels on an HTTPS index on 127.0.0.1 and copies this file in; it
imports only the installed `par` (no repository inside).  In one run it times,
each run with cold caches (pard's uv, pip and bytecode caches emptied while pard
is stopped; the baseline's pip cache a new empty folder) and requirements new
to the host (the typical set plus a comment line unique to the run):

  uv    PAR as installed (installer.kind: auto, uv fetched by pard itself):
        POST /deploy → deployment healthy → the agent's /health ok
  pip   the same with installer.kind: pip (the host's pip, no pip in the venv)
  base  the old runtime's steps: `python3 -m venv`, `pip install --cache-dir -r`
        from the same index, the agent host started as a child process in that
        venv, /health polled at once, then after 0.1 s × 1.5^n (bench/baseline.py)

Runs are interleaved (uv, base, uv, base, ..., then pip, pip, ...).  Also the
size of an empty venv (an agent without requirements) under the pip fallback,
and of `python3 -m venv`'s.

    /usr/bin/python3 deb_inroot.py --index URL [--runs 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

from par import config
from par.agent_unit import AgentLaunch, environment, write_host_spec
from par.client import Client
from par.host_files import install_host
from par.manifest import load_manifest
from par.pack import pack_folder

SOCKET = Path("/run/par/par.sock")
STATE = Path("/var/lib/pixell-runtime")
CACHE = Path("/var/cache/pixell-runtime")
PAR_YAML = Path("/etc/par/par.yaml")
WORK = Path("/root/par-bench")  # not /tmp: nspawn mounts a tmpfs there, agents get their own
PYTHON = "/usr/bin/python3"
IMPORTS = ("fastapi", "uvicorn", "grpc", "google.protobuf", "pydantic", "httpx", "yaml",
           "requests")


def log(msg: str) -> None:
    print(f"[deb-bench] {msg}", file=sys.stderr, flush=True)


def run(*argv: str, env: dict[str, str] | None = None) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)
    if res.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{(res.stdout + res.stderr)[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as res:
            return res.status == 200 and bool(json.loads(res.read() or b"{}").get("ok"))
    except (OSError, ValueError):
        return False


def write_agent(folder: Path, requirements: str, typical: bool = True) -> Path:
    """The typical agent (bench/common.py's write_agent): imports the typical set when
    it loads and serves REST through FastAPI/uvicorn; not `typical`: standard library
    only, no requirements."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "src").mkdir(parents=True)
    (folder / "agent.yaml").write_text("name: typical-agent\nversion: 1.0.0\n"
                                       "entrypoint: main:handler\n"
                                       + ("rest:\n  entry: api:mount\n" if typical else ""))
    if requirements:
        (folder / "requirements.txt").write_text(requirements)
    (folder / "src" / "main.py").write_text(
        "".join(f"import {m}  # noqa: F401\n" for m in (IMPORTS if typical else ()))
        + "\n\ndef handler(context):\n    return {'ok': True, 'echo': context}\n")
    if not typical:
        return folder
    (folder / "src" / "api.py").write_text(textwrap.dedent('''
        def mount(app):
            @app.get("/hello")
            def hello():
                return {"hello": "world"}
    '''))
    return folder


# ------------------------------------------------------------------ pard
def client() -> Client:
    return Client(SOCKET, timeout=900)


def wait_installer(name: str, timeout: float = 120) -> dict:
    """Until GET /health says builds use `name` (uv: once pard has fetched it)."""
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        try:
            last = client().daemon_health().get("installer", {})
            if last.get("name") == name:
                return last
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"pard's installer is not {name} after {timeout:g} s: {last}")


def set_kind(kind: str) -> None:
    text = PAR_YAML.read_text()
    lines = [("  kind: " + kind) if line.startswith("  kind: ") else line
             for line in text.splitlines()]
    PAR_YAML.write_text("\n".join(lines) + "\n")


def cold_pard(installer: str) -> None:
    """pard stopped, its installer and bytecode caches emptied, started again."""
    run("systemctl", "stop", "par")
    for sub in ("uv", "pip", "pyc"):
        d = CACHE / sub
        if d.is_dir():
            for child in d.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    run("systemctl", "start", "par")
    wait_installer(installer)


def par_deploy(agent: Path, app: str) -> tuple[float, dict]:
    apkg = pack_folder(agent, WORK / f"{app}.apkg")
    did = f"{app}-{uuid.uuid4().hex[:8]}"
    c = client()
    start = time.monotonic()
    c.deploy({"deploymentId": did, "agentAppId": app, "orgId": "bench", "version": "1.0.0",
              "packageUrl": f"file://{apkg}"})
    record = c.deployment(did)
    while record["status"] != "healthy":
        if record["status"] == "failed" or time.monotonic() - start > 900:
            raise SystemExit(f"{did} is {record['status']}: {record.get('error')}")
        record = c.deployment(did, wait=30, since=record["updatedAt"])
    if not health_ok(record["ports"]["rest"]):
        raise SystemExit(f"{did} is healthy but its /health does not answer ok")
    seconds = time.monotonic() - start
    return seconds, record


def layer_built(layer: str) -> dict:
    """pard's "Layer built" event of `layer` (create, install and total seconds)."""
    out = subprocess.run(["journalctl", "-u", "par", "-o", "cat", "--no-pager", "-n", "400"],
                         capture_output=True, text=True, timeout=60).stdout
    for line in reversed(out.splitlines()):
        if '"Layer built"' in line and layer in line:
            return dict(json.loads(line))
    return {}


def venv_meta(record: dict) -> dict:
    return dict(json.loads((STATE / "venvs" / record["venv"] / "par-venv.json").read_text()))


def undeploy(record: dict) -> None:
    client().delete(record["deploymentId"], purge=True)


# ------------------------------------------------------------------ the old runtime
class Legacy:
    """bench/baseline.py's LegacyRuntime, with the installed par: `python3 -m venv`,
    `pip install --cache-dir -r` (cold: a new empty cache), the agent host as a child."""

    def __init__(self, index: str) -> None:
        self.cfg = config.with_state_dir(config.from_dict(None), WORK / "legacy-state")
        self.host_dir = install_host(self.cfg)
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(WORK), "PIP_INDEX_URL": index,
                    "LANG": "C.UTF-8"}

    def deploy(self, agent: Path, tag: str) -> tuple[float, float, float]:
        """Seconds: (all, venv + pip install, of which `python3 -m venv`)."""
        venv, cache = WORK / f"legacy-{tag}", WORK / "legacy-pip-cache"
        shutil.rmtree(cache, ignore_errors=True)
        start = time.monotonic()
        run(PYTHON, "-m", "venv", str(venv), env=self.env)
        mkvenv_s = time.monotonic() - start
        run(str(venv / "bin" / "pip"), "install", "--cache-dir", str(cache),
            "--disable-pip-version-check", "-r", str(agent / "requirements.txt"), env=self.env)
        venv_s = time.monotonic() - start
        manifest = load_manifest(agent)
        ports = {"rest": free_port(), "a2a": free_port(), "ui": free_port()}
        launch = AgentLaunch(
            agent_id=tag, deployment_id=f"{tag}-baseline", org_id="bench", name=manifest.name,
            version=manifest.version or "1.0.0", package_root=agent, venv_path=venv,
            ports=ports, entrypoint=manifest.entrypoint, rest_entry=manifest.rest_entry,
            a2a_service=manifest.a2a_service, ui_path=manifest.ui_path,
            env=dict(manifest.environment), host_dir=self.host_dir)
        write_host_spec(launch)
        env = {**self.env, **environment(self.cfg, launch)}
        logf = WORK / f"{tag}.log"
        with logf.open("ab") as out:
            proc = subprocess.Popen([str(venv / "bin" / "python"), "-m", "par_agent_host"],
                                    cwd=agent, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        delay = 0.1
        while not health_ok(ports["rest"]):
            if proc.poll() is not None or time.monotonic() - start > 600:
                raise SystemExit(f"baseline agent {tag} not healthy:\n{logf.read_text()[-2000:]}")
            time.sleep(delay)
            delay *= 1.5
        total = time.monotonic() - start
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(venv)
        return total, venv_s, mkvenv_s


def du_kib(*paths: Path) -> int:
    """KiB on disk of `paths` together (du -sc: hardlinked files counted once)."""
    out = subprocess.run(["du", "-skc", *(str(p) for p in paths if p.exists())],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.splitlines()[-1].split()[0])


# ------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True, help="the package index (PEP 503 simple)")
    ap.add_argument("--requirements", type=Path, default=WORK / "typical-requirements.txt")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    requirements = args.requirements.read_text()
    legacy = Legacy(args.index)
    res: dict = {"runs": args.runs, "uv": [], "uv_loading": [], "uv_layer": [], "base": [],
                 "base_venv": [], "base_mkvenv": [], "pip": [], "pip_loading": [], "pip_layer": []}

    t0 = time.monotonic()
    inst = wait_installer("uv", timeout=180)
    res["uv_fetched_s"] = round(time.monotonic() - t0, 2)
    res["uv_version"] = inst.get("version")
    log(f"pard reports uv {inst.get('version')} ({res['uv_fetched_s']} s after the install)")

    def fresh(tag: str) -> Path:
        return write_agent(WORK / f"agent-{tag}",
                           f"{requirements.rstrip()}\n# bench {tag} {uuid.uuid4().hex}\n")

    for i in range(args.runs):
        cold_pard("uv")
        seconds, record = par_deploy(fresh(f"uv{i}"), f"deb-uv-{i}")
        meta = venv_meta(record)
        if meta["installer"] != "uv" or record.get("venvReused"):
            raise SystemExit(f"uv run {i}: venv by {meta['installer']}, reused "
                             f"{record.get('venvReused')}")
        res["uv"].append(seconds)
        res["uv_loading"].append(record["phases"]["loading"]["seconds"])
        res["uv_layer"].append(layer_built(meta["layer"]))
        undeploy(record)
        log(f"uv run {i}: {seconds:.2f} s (venv {res['uv_loading'][-1]:.2f} s)")
        total, venv_s, mkvenv_s = legacy.deploy(fresh(f"base{i}"), f"base{i}")
        res["base"].append(total)
        res["base_venv"].append(venv_s)
        res["base_mkvenv"].append(mkvenv_s)
        log(f"baseline run {i}: {total:.2f} s (venv + pip install {venv_s:.2f} s)")

    set_kind("pip")
    for i in range(args.runs):
        cold_pard("pip")
        seconds, record = par_deploy(fresh(f"pip{i}"), f"deb-pip-{i}")
        meta = venv_meta(record)
        if meta["installer"] != "pip":
            raise SystemExit(f"pip run {i}: venv by {meta['installer']}")
        res["pip"].append(seconds)
        res["pip_loading"].append(record["phases"]["loading"]["seconds"])
        res["pip_layer"].append(layer_built(meta["layer"]))
        undeploy(record)
        log(f"pip run {i}: {seconds:.2f} s (venv {res['pip_loading'][-1]:.2f} s)")

    # an empty venv: an agent without requirements, under the pip fallback
    _, record = par_deploy(write_agent(WORK / "agent-empty", "", typical=False),
                           "deb-pip-empty")
    venv = STATE / "venvs" / record["venv"]
    layer = STATE / "venvs" / ".layers" / venv_meta(record)["layer"]
    res["pip_empty_venv_kib"] = du_kib(venv, layer)
    res["pip_empty_venv_has_pip"] = any(venv.glob("lib/python3*/site-packages/pip")) or (
        venv / "bin" / "pip").exists()
    undeploy(record)
    legacy_empty = WORK / "legacy-empty"
    run(PYTHON, "-m", "venv", str(legacy_empty))
    res["legacy_empty_venv_kib"] = du_kib(legacy_empty)
    shutil.rmtree(legacy_empty)
    set_kind("auto")

    med = {k: statistics.median(res[k]) for k in
           ("uv", "uv_loading", "base", "base_venv", "base_mkvenv", "pip", "pip_loading")}
    res["median"] = med
    res["ratio_uv"] = med["base"] / med["uv"]
    res["ratio_pip"] = med["base"] / med["pip"]
    res["ratio_uv_venv"] = med["base_venv"] / med["uv_loading"]
    res["ratio_pip_venv"] = med["base_venv"] / med["pip_loading"]
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
