"""Runs the source tree's pard as par.service under real systemd, for integration tests.

The unit is the repo's `systemd/par.service` with ExecStart pointing at the
source tree, written to /run/systemd/system (volatile).  Its state lives in a
fresh folder under /var/lib/par-it (not /tmp: agents get a private /tmp), with
uv and the offline wheelhouse from scripts/install-deps, so no test needs the
network.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from par.client import Client
from par.units import SOCKET_SUFFIX, Systemd
from tests.conftest import REPO, require_file
from tests.httpfiles import serve_files  # noqa: F401  (used by the integration tests)

UNIT_PATH = Path("/run/systemd/system/par.service")
IT_ROOT = Path("/var/lib/par-it")
UV = REPO / ".cache/tools/bin/uv"
WHEELHOUSE = REPO / ".cache/wheelhouse"
EXAMPLES = REPO / "examples"
TEST_TOKEN = "test-token-0123456789"


def staged_inputs() -> tuple[Path, Path]:
    """uv and the wheelhouse, where the build user (par-build) can read them.

    Builds run as par-build with ProtectHome=: a checkout under /root or /home
    (a user's clone) is out of its reach, so the tests hand pard copies below
    IT_ROOT, made once per process (runs side by side never share them) and
    removed when the process exits."""
    require_file(UV, "run scripts/install-deps")
    require_file(WHEELHOUSE, "run scripts/install-deps")
    stage = IT_ROOT / f".inputs-{os.getpid()}"
    stamp = ",".join(sorted(p.name for p in WHEELHOUSE.iterdir())) + f";{UV.stat().st_size}"
    marker = stage / ".stamp"
    if not marker.is_file() or marker.read_text() != stamp:
        shutil.rmtree(stage, ignore_errors=True)
        (stage / "bin").mkdir(parents=True)
        atexit.register(_remove_stage, stage)
        for folder in (IT_ROOT, stage, stage / "bin"):
            folder.chmod(0o755)
        shutil.copy2(UV, stage / "bin" / "uv")
        shutil.copytree(WHEELHOUSE, stage / "wheelhouse")
        for path in (stage / "wheelhouse").rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (stage / "wheelhouse").chmod(0o755)
        marker.write_text(stamp)
    return stage / "bin" / "uv", stage / "wheelhouse"


def write_token(root: Path) -> Path:
    """The test token in a root-only file below `root` (pard refuses one others can read)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "token"
    path.write_text(TEST_TOKEN + "\n")
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def running_pard(tag: str, config_extra: dict | None = None, *, tcp: bool = True,
                 token_file: Path | None = None) -> Iterator[Pard]:
    """A started pard (par.service from the source tree) with `config_extra` merged into
    its par.yaml and, when `tcp`, a TCP listener on a free port (sandboxes share the
    host's network) with the test token (from `token_file`, which must then hold it,
    else a root-only file of its own); torn down (agents included) at the end."""
    extra = {k: dict(v) if isinstance(v, dict) else v for k, v in (config_extra or {}).items()}
    p = Pard(new_root(tag), config_extra=extra)
    if tcp:
        extra.setdefault("listen", {}).update(
            {"tcp": f"127.0.0.1:{free_port()}",
             "token_file": str(token_file or write_token(p.root))})
    try:
        p.start()
        yield p
    finally:
        p.teardown()


def _remove_stage(stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
    try:
        IT_ROOT.rmdir()  # only when no other run's pard or copies are left in it
    except OSError:
        pass


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check)


@dataclass
class Pard:
    """One pard instance with its own state folder, config and socket."""

    root: Path
    installer: str = "uv"
    config_extra: dict = field(default_factory=dict)
    front_port: int = field(default_factory=lambda: free_port())

    @property
    def front_url(self) -> str:
        """The front door's base URL (front.listen)."""
        listen = self.config_extra.get("front", {}).get("listen") or f"127.0.0.1:{self.front_port}"
        return f"http://{listen}"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def local_packages(self) -> Path:
        """A find-links folder for tiny test packages (tests.wheels)."""
        return self.root / "pkgs"

    @property
    def config_path(self) -> Path:
        return self.root / "par.yaml"

    @property
    def tcp_url(self) -> str:
        return "http://" + self.config_extra["listen"]["tcp"]

    @property
    def socket(self) -> Path:
        return Path("/run/par/par.sock")

    def write_config(self) -> None:
        uv, wheelhouse = staged_inputs()
        cfg = {
            "paths": {"state_dir": str(self.state), "cache_dir": str(self.root / "cache")},
            "installer": {"kind": self.installer, "uv_path": str(uv), "offline": True,
                          "find_links": [str(wheelhouse), str(self.local_packages)],
                          "timeout_s": 120},
            "ports": {"rest": [18100, 18999], "a2a": [51100, 51999], "ui": [13100, 13999]},
            "agents": {"boot_timeout_s": 60, "stop_timeout_s": 10, "restart_sec": 0.5},
            # sandboxes share the host's network: a free port, not 8080
            "front": {"listen": f"127.0.0.1:{self.front_port}"},
        }
        for section, values in self.config_extra.items():
            if isinstance(values, dict):
                cfg.setdefault(section, {}).update(values)
            else:
                cfg[section] = values
        self.root.mkdir(parents=True, exist_ok=True)
        self.local_packages.mkdir(exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(cfg))

    def install_unit(self) -> None:
        text = (REPO / "systemd/par.service").read_text()
        text = text.replace(
            "ExecStart=/usr/bin/pard --config /etc/par/par.yaml",
            f"ExecStart=/usr/bin/python3 -m par.daemon --config {self.config_path}\n"
            f"Environment=PYTHONPATH={REPO}\nWorkingDirectory={REPO}",
        )
        assert "par.daemon" in text, "systemd/par.service ExecStart changed; update the harness"
        UNIT_PATH.write_text(text)
        sh("systemctl", "daemon-reload")

    def start(self) -> None:
        self.write_config()
        # the user builds run as, as the package's postinst creates it (idempotent)
        sh("systemd-sysusers", str(REPO / "debian/pixell-agent-runtime.sysusers"))
        self.install_unit()
        sh("systemctl", "reset-failed", "par.service", check=False)
        res = sh("systemctl", "start", "par.service", check=False, timeout=120)
        if res.returncode != 0:
            raise AssertionError(f"par.service did not start:\n{self.journal()}")

    def stop(self) -> None:
        sh("systemctl", "stop", "par.service", check=False, timeout=60)

    def restart(self) -> None:
        res = sh("systemctl", "restart", "par.service", check=False, timeout=120)
        if res.returncode != 0:
            raise AssertionError(f"par.service did not restart:\n{self.journal()}")

    def main_pid(self) -> int:
        return int(sh("systemctl", "show", "-P", "MainPID", "par.service").stdout.strip())

    def journal(self, unit: str = "par.service", lines: int = 200) -> str:
        return sh("journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "cat",
                  check=False).stdout

    def client(self, timeout: float = 60) -> Client:
        return Client(self.socket, timeout=timeout)

    def teardown(self) -> None:
        self.stop()
        systemd = Systemd()
        for unit in ("par-front.service", "par-front.socket"):
            sh("systemctl", "stop", unit, check=False)
            sh("systemctl", "reset-failed", unit, check=False)
        for unit in systemd.list_agent_units(SOCKET_SUFFIX):  # first: nothing restarts
            sh("systemctl", "stop", unit, check=False)
            sh("systemctl", "reset-failed", unit, check=False)
        for unit in systemd.list_agent_units():
            sh("systemctl", "kill", "-s", "KILL", unit, check=False)
            sh("systemctl", "stop", unit, check=False)
            sh("systemctl", "reset-failed", unit, check=False)
        sh("systemctl", "reset-failed", "par.service", check=False)
        UNIT_PATH.unlink(missing_ok=True)
        sh("systemctl", "daemon-reload", check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        try:
            IT_ROOT.rmdir()  # only when no other test's pard is left in it
        except OSError:
            pass
        # agents' StateDirectory= folders (DynamicUser keeps them under /var/lib/private)
        for base in (Path("/var/lib/private/par-agent"), Path("/var/lib/par-agent"),
                     Path("/var/lib/private/par-agents"), Path("/var/lib/par-agents")):
            shutil.rmtree(base, ignore_errors=True)
        self.remove_unit_dirs()

    @staticmethod
    def remove_unit_dirs() -> None:
        """par.service's StateDirectory=/CacheDirectory= create these; remove them if empty."""
        for empty in (Path("/var/lib/pixell-runtime"), Path("/var/cache/pixell-runtime")):
            try:
                empty.rmdir()
            except OSError:
                pass

    # ------------------------------------------------------------ deploy helpers
    def pack(self, example: str | Path, version: str | None = None) -> Path:
        """Pack an example folder into an .apkg under the test root."""
        from par.pack import pack_folder

        src = example if isinstance(example, Path) else EXAMPLES / example
        out = self.root / "apkg" / f"{src.name}-{uuid.uuid4().hex[:6]}.apkg"
        out.parent.mkdir(parents=True, exist_ok=True)
        return pack_folder(src, out)

    def deploy(self, agent_id: str, apkg: Path, version: str = "1.0.0", wait: bool = True,
               **extra) -> dict:
        body = {"deploymentId": f"{agent_id}-{uuid.uuid4().hex[:8]}", "agentAppId": agent_id,
                "orgId": "org-test", "version": version, "packageUrl": f"file://{apkg}", **extra}
        res = self.client().deploy(body)
        if not wait:
            return res
        return self.wait(body["deploymentId"])

    def wait(self, deployment_id: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            d = self.client().deployment(deployment_id)
            if d["status"] in ("healthy", "failed"):
                return d
            if time.monotonic() > deadline:
                raise AssertionError(f"deployment {deployment_id} stuck in {d['status']}:\n"
                                     + json.dumps(d, indent=1) + self.journal())
            time.sleep(0.1)


def new_root(tag: str) -> Path:
    return IT_ROOT / f"{tag}-{uuid.uuid4().hex[:8]}"


def temp_leftovers(state: Path) -> list[str]:
    """Temporary folders and files (`.tmp-...`, `.part` ...) left in PAR's state: those
    of packages, extractions, venvs and the venvs' shared layers."""
    left = []
    for folder in ("packages", "extracted", "venvs", "venvs/.layers"):
        base = state / folder
        if base.is_dir():
            left += [f"{folder}/{p.name}" for p in base.iterdir()
                     if p.name.startswith(".") and p.name not in (".locks", ".layers", ".sources")]
    return left


def agent_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path → (status, body)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def apkg_with(tmp: Path, files: dict[str, str | bytes]) -> Path:
    """A package made of `files` (name → content), for bad-agent tests."""
    path = tmp / f"custom-{uuid.uuid4().hex[:6]}.apkg"
    tmp.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    os.chmod(path, 0o644)
    return path
