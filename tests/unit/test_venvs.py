"""par.venvs: real builds with uv and pip from tiny local wheels; reuse, rebuild,
failure, timeout, kill -9, concurrency, eviction."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from par import config, layout
from par import procs as procs_module
from par.config import Installer as InstallerConfig
from par.config import Venvs as VenvsConfig
from par.errors import ParError
from par.installers import Installer, select_installer
from par.venvs import (
    METADATA_FILE,
    VenvManager,
    VenvMeta,
    cache_on_same_filesystem,
    cleanup_stale,
    disk_usage,
    read_meta,
    venv_lock,
    venv_name,
    write_meta,
)
from tests.wheels import REPO, build_hanging_sdist, build_wheel, serve_index, uv_binary
from tests.wheels import wheelhouse as wheelhouse_dir

INSTALLERS = ["uv", "pip"]


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    wh = tmp_path_factory.mktemp("wh")
    for version in ("1.0", "2.0"):
        build_wheel(wh, "alpha", version, entry_points={"alpha-cli": "alpha:main"}, modules={
            "alpha/__init__.py": f"VERSION = {version!r}\n"
                                 "def main():\n    print('alpha-cli', VERSION)\n",
        })
    build_wheel(wh, "beta", "1.0", requires=["alpha"])
    # 256 KiB of incompressible data, so hardlink sharing shows in sizes
    build_wheel(wh, "bulky", "1.0", data={"bulky/blob.bin": os.urandom(256 * 1024)})
    build_hanging_sdist(wh)
    return wh


def make_cfg(tmp_path: Path, wheelhouse: Path, kind: str = "uv", *,
             timeout_s: int = 120, **venvs: int) -> config.Config:
    base = config.with_state_dir(config.from_dict(None), tmp_path / "state")
    # sandbox: false: no systemd here (the sandboxed build is an integration test)
    installer = InstallerConfig(kind=kind, uv_path=uv_binary() if kind == "uv" else None,
                                find_links=[str(wheelhouse)], offline=True, timeout_s=timeout_s,
                                sandbox=False)
    return dataclasses.replace(base, installer=installer, venvs=VenvsConfig(**venvs))


class Recorder(logging.Handler):
    """Collects (event, fields) pairs from a private logger."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, dict]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((record.getMessage(), dict(getattr(record, "fields", {}))))

    def named(self, name: str) -> list[dict]:
        return [f for n, f in self.events if n == name]


@pytest.fixture
def recorder():
    logger = logging.getLogger(f"par-test-{uuid.uuid4().hex}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    rec = Recorder()
    logger.addHandler(rec)
    rec.logger = logger
    return rec


class CountingInstaller(Installer):
    """The real installer, counting how often it runs."""

    def __init__(self, inner: Installer) -> None:
        super().__init__(inner.cfg)
        self.inner = inner
        self.name = inner.name
        self.creates = 0
        self.installs = 0
        self._lock = threading.Lock()

    def create_venv(self, **kw):
        with self._lock:
            self.creates += 1
        return self.inner.create_venv(**kw)

    def install(self, **kw):
        with self._lock:
            self.installs += 1
        return self.inner.install(**kw)

    def _query_version(self) -> str:
        return self.inner.version()


def manager(cfg: config.Config, recorder: Recorder, **kw) -> tuple[VenvManager, CountingInstaller]:
    inst = CountingInstaller(select_installer(cfg))
    return VenvManager(cfg, recorder.logger, installer=inst, **kw), inst


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ensure(m: VenvManager, text: str, agent: str | None = "agent-a", in_use=frozenset()):
    return m.ensure(agent, "demo@1.0", text, sha(text), set(in_use))


def run_py(venv: Path, code: str) -> str:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def leftovers(cfg: config.Config) -> list[str]:
    """Everything in the venvs folder except the lock and layer folders, then any
    temporary folder among the layers."""
    root = layout.venvs(cfg)
    if not root.exists():
        return []
    own = sorted(p.name for p in root.iterdir()
                 if p.name not in (layout.LOCK_DIR, layout.LAYER_DIR))
    return own + sorted(p.name for p in (root / layout.LAYER_DIR).glob(".tmp-*"))


def layers(cfg: config.Config) -> list[str]:
    """The layers (shared installed packages) in the venvs folder."""
    return sorted(p.name for p in (layout.venvs(cfg) / layout.LAYER_DIR).glob("[!.]*"))


# -- naming ----------------------------------------------------------------------------------


def test_naming():
    s = sha("x")
    assert venv_name("agent-a", "demo@1.0", s) == f"agent-a_{s[:7]}"
    assert venv_name(None, "demo@1.0", s) == f"demo@1.0_{s[:7]}"
    for bad in [("../x", "demo@1.0", s), (None, "../demo", s), ("a", "demo@1.0", "XYZ")]:
        with pytest.raises(ParError):
            venv_name(*bad)


# -- build and reuse -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", INSTALLERS)
def test_build_then_reuse(tmp_path, wheelhouse, recorder, kind):
    cfg = make_cfg(tmp_path, wheelhouse, kind)
    m, inst = manager(cfg, recorder)
    text = "beta==1.0\nalpha==2.0\n"
    first = ensure(m, text)
    assert not first.reused and first.installer == kind
    assert first.path == layout.venvs(cfg) / first.name and first.name == f"agent-a_{sha(text)[:7]}"
    assert run_py(first.path, "import alpha, beta; print(alpha.VERSION)") == "2.0"
    # console scripts were written in the temporary folder; they must run from the final one
    cli = subprocess.run([str(first.path / "bin" / "alpha-cli")], capture_output=True,
                         text=True, timeout=30)
    assert cli.stdout.strip() == "alpha-cli 2.0", cli.stderr
    assert ".tmp-" not in (first.path / "bin" / "alpha-cli").read_text()
    meta = read_meta(first.path)
    assert meta is not None
    assert (meta.requirements_sha256, meta.installer, meta.package_id, meta.agent_app_id) == (
        sha(text), kind, "demo@1.0", "agent-a")
    assert meta.python == "/usr/bin/python3" and meta.python_version.count(".") == 2
    assert leftovers(cfg) == [first.name] and layers(cfg) == [meta.layer]
    assert oct(first.path.stat().st_mode & 0o777) == "0o755"

    second = ensure(m, text)
    assert second.reused and second.path == first.path and second.installer == kind
    assert (inst.creates, inst.installs) == (1, 1)  # the installer did not run again
    assert read_meta(first.path).last_used >= meta.last_used
    snap = m.counters.snapshot()
    assert (snap["hits"], snap["misses"], snap["builds"], snap["failures"]) == (1, 1, 1, 0)
    assert snap["build_seconds"] > 0
    names = [n for n, _ in recorder.events]
    for expected in ("Creating virtual environment", "Installing dependencies",
                     "Reusing existing venv"):
        assert expected in names
    assert recorder.named("Reusing existing venv")[0]["venv"] == first.name


def test_no_requirements_builds_without_installing(tmp_path, wheelhouse, recorder):
    m, inst = manager(make_cfg(tmp_path, wheelhouse), recorder)
    r = ensure(m, "# nothing\n")
    assert not r.reused and (inst.creates, inst.installs) == (1, 0)
    assert ensure(m, "# nothing\n").reused


def test_changed_requirements_build_a_new_venv(tmp_path, wheelhouse, recorder):
    m, inst = manager(make_cfg(tmp_path, wheelhouse), recorder)
    old = ensure(m, "alpha==1.0\n")
    new = ensure(m, "alpha==2.0\n")
    assert not new.reused and new.name != old.name and inst.installs == 2
    assert run_py(new.path, "import alpha; print(alpha.VERSION)") == "2.0"
    assert run_py(old.path, "import alpha; print(alpha.VERSION)") == "1.0"


def _delete_python(venv: Path) -> None:
    (venv / "bin" / "python").unlink()


def _garbage_metadata(venv: Path) -> None:
    (venv / METADATA_FILE).write_text("{not json")


def _other_hash(venv: Path) -> None:
    write_meta(venv, dataclasses.replace(read_meta(venv), requirements_sha256="0" * 64))


def _wrong_prefix(venv: Path) -> None:
    (venv / "pyvenv.cfg").unlink()  # python then runs as the system one: sys.prefix is /usr


def _old_interpreter(venv: Path) -> None:
    write_meta(venv, dataclasses.replace(read_meta(venv), python_version="3.11.0"))


def _broken_python(venv: Path) -> None:
    python = venv / "bin" / "python"
    python.unlink()
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)


@pytest.mark.parametrize("where", ["venv", "layer"])
@pytest.mark.parametrize("corrupt", [_delete_python, _garbage_metadata, _other_hash,
                                     _wrong_prefix, _old_interpreter, _broken_python])
def test_corrupted_venv_is_rebuilt(tmp_path, wheelhouse, recorder, corrupt, where):
    """Damage to an agent's own venv rebuilds that venv over the same layer; damage to
    the layer (its installed packages) reinstalls the layer too."""
    m, inst = manager(make_cfg(tmp_path, wheelhouse), recorder)
    first = ensure(m, "alpha==1.0\n")
    assert m.validate(first.path, sha("alpha==1.0\n")) is None
    corrupt(first.path if where == "venv" else first.layer)
    assert m.validate(first.path, sha("alpha==1.0\n")) is not None
    again = ensure(m, "alpha==1.0\n")
    assert not again.reused and inst.installs == (1 if where == "venv" else 2)
    invalid = recorder.named("Invalid venv found, rebuilding")
    assert len(invalid) == 1 and invalid[0]["venv"] == first.name and invalid[0]["reason"]
    assert (where == "layer") == ("its layer" in invalid[0]["reason"])
    assert m.validate(again.path, sha("alpha==1.0\n")) is None
    assert run_py(again.path, "import alpha; print(alpha.VERSION)") == "1.0"
    assert leftovers(m.cfg) == [first.name] and layers(m.cfg) == [first.layer.name]


def test_same_requirements_share_one_layer(tmp_path, wheelhouse, recorder):
    """A second agent with the same requirements gets its own venv without an install;
    the installed packages exist once; the layer goes with the last venv linking it."""
    cfg = make_cfg(tmp_path, wheelhouse)
    m, inst = manager(cfg, recorder, evict_grace_s=0)
    a = ensure(m, "alpha==1.0\n", agent="agent-a")
    b = ensure(m, "alpha==1.0\n", agent="agent-b")
    other = ensure(m, "alpha==2.0\n", agent="agent-a")
    assert inst.installs == 2 and a.layer == b.layer != other.layer
    assert a.path != b.path and a.path.name != b.path.name
    assert recorder.named("Reusing installed packages")[0]["layer"] == a.layer.name
    for venv in (a, b):
        assert run_py(venv.path, "import sys, alpha; print(sys.prefix, alpha.VERSION)") == \
            f"{venv.path} 1.0"
        assert read_meta(venv.path).layer == a.layer.name and m.layer_path(venv.path) == a.layer
        # console scripts of the layer run from each venv
        cli = subprocess.run([str(venv.path / "bin" / "alpha-cli")], capture_output=True,
                             text=True, timeout=30)
        assert cli.stdout.strip() == "alpha-cli 1.0", cli.stderr
    # disk: the second venv costs its own small files only
    one, both = disk_usage([a.path]), disk_usage([a.path, b.path])
    assert both - one < 64 * 1024 < one
    rows = {r.name: r for r in m.entries()}
    assert rows[a.name].layer_users == rows[b.name].layer_users == 2
    assert rows[other.name].layer_users == 1
    # the layer stays while one venv links it, and goes with the last one
    assert m.prune({b.name, other.name}, all_unused=True) == [a.name]
    assert sorted(layers(cfg)) == sorted([a.layer.name, other.layer.name])
    assert run_py(b.path, "import alpha; print(alpha.VERSION)") == "1.0"
    assert m.prune({other.name}, all_unused=True) == [b.name]
    assert layers(cfg) == [other.layer.name]
    assert [e["layer"] for e in recorder.named("Removed unused layer")] == [a.layer.name]


def test_concurrent_removals_of_venvs_sharing_a_layer(tmp_path, wheelhouse, recorder):
    """Purging many agents at once (each removes its venv, the last one the layer):
    no removal fails because another deleted a venv or the layer under it."""
    cfg = make_cfg(tmp_path, wheelhouse, max_venvs=1000)
    m, inst = manager(cfg, recorder)
    names = [ensure(m, "alpha==1.0\n", agent=f"agent-{i}").name for i in range(12)]
    assert inst.installs == 1 and len(layers(cfg)) == 1
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(names))

    def remove(name: str) -> None:
        try:
            barrier.wait(10)
            assert m.remove(name)
        except BaseException as exc:  # collected: the test reports them all
            errors.append(exc)

    threads = [threading.Thread(target=remove, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert leftovers(cfg) == [] and layers(cfg) == []
    assert not m.remove(names[0])  # already gone: False, not an error


def test_validation_never_runs_the_venvs_python(tmp_path, wheelhouse, recorder, monkeypatch):
    """pard is root: validation checks files (lstat), it runs nothing from the venv."""
    m, _ = manager(make_cfg(tmp_path, wheelhouse), recorder)
    venv = ensure(m, "alpha==1.0\n").path
    runs: list[str] = []
    real_run = procs_module.run

    def counting_run(argv, **kw):
        runs.append(str(argv[0]))
        return real_run(argv, **kw)

    monkeypatch.setattr(procs_module, "run", counting_run)
    assert m.validate(venv, sha("alpha==1.0\n")) is None
    assert ensure(m, "alpha==1.0\n").reused
    assert not [r for r in runs if r.startswith(str(tmp_path))]


@pytest.mark.parametrize("where", ["venv", "layer"])
def test_a_replaced_interpreter_is_refused_without_running_it(tmp_path, wheelhouse, recorder,
                                                              where):
    """A wheel's `.data/scripts/python` replaces bin/python: it must never run as root."""
    m, _ = manager(make_cfg(tmp_path, wheelhouse), recorder)
    first = ensure(m, "alpha==1.0\n")
    marker = tmp_path / "payload-ran"
    python = (first.path if where == "venv" else first.layer) / "bin" / "python"
    python.unlink()
    python.write_text(f"#!/bin/sh\ntouch {marker}\nexec /usr/bin/python3 \"$@\"\n")
    python.chmod(0o755)
    problem = m.validate(first.path, sha("alpha==1.0\n"))
    assert problem is not None and "not a link to the base interpreter" in problem
    assert not ensure(m, "alpha==1.0\n").reused and not marker.exists()


def test_pyvenv_cfg_pointing_elsewhere_is_refused(tmp_path, wheelhouse, recorder):
    """`home` decides where python takes its stdlib from: another one is refused."""
    m, _ = manager(make_cfg(tmp_path, wheelhouse), recorder)
    layer = ensure(m, "alpha==1.0\n").layer
    cfg_file = layer / "pyvenv.cfg"
    cfg_file.write_text(cfg_file.read_text().replace("home = /usr/bin", f"home = {tmp_path}"))
    assert "pyvenv.cfg home" in m.validate(layer, sha("alpha==1.0\n"))


def test_validation_runs_no_package_code(tmp_path, wheelhouse, recorder):
    """A package's .pth file would run as root if validation imported site fully."""
    m, _ = manager(make_cfg(tmp_path, wheelhouse), recorder)
    venv = ensure(m, "alpha==1.0\n").path
    marker = tmp_path / "pth-ran"
    site_packages = next((venv / "lib").glob("python3*/site-packages"))
    evil = f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n"
    (site_packages / "zz-evil.pth").write_text(evil)
    assert m.validate(venv, sha("alpha==1.0\n")) is None
    assert ensure(m, "alpha==1.0\n").reused
    assert not marker.exists()
    run_py(venv, "pass")  # a normal start does run it: the test can fail
    assert marker.exists()


def test_interpreter_change_is_noticed_without_restart(tmp_path, wheelhouse, recorder):
    """A new interpreter binary (an apt upgrade) is asked its version again."""
    link = tmp_path / "python3"
    link.symlink_to("/usr/bin/python3")
    cfg = make_cfg(tmp_path, wheelhouse)
    cfg = dataclasses.replace(cfg, installer=dataclasses.replace(cfg.installer, python=link))
    m, _ = manager(cfg, recorder)
    real = m.base_python()
    # Stand-in for an upgraded interpreter: a wrapper that reports another version.
    link.unlink()
    link.write_text("#!/bin/sh\necho /usr\necho 3.99.0\n")
    link.chmod(0o755)
    assert m.base_python().version == "3.99.0" != real.version


# -- failures leave nothing --------------------------------------------------------------------


@pytest.mark.parametrize("kind", INSTALLERS)
def test_missing_requirement_fails_cleanly(tmp_path, wheelhouse, recorder, kind):
    m, _ = manager(make_cfg(tmp_path, wheelhouse, kind), recorder)
    with pytest.raises(ParError) as err:
        ensure(m, "par-does-not-exist==1.0\n")
    assert err.value.code == "dependency_install_failed"
    assert "par-does-not-exist" in err.value.message
    assert len(err.value.message.splitlines()) <= 41  # one line of ours + the last 40
    assert leftovers(m.cfg) == []
    assert m.counters.snapshot()["failures"] == 1
    assert recorder.named("Venv build failed")[0]["code"] == "dependency_install_failed"
    assert layers(m.cfg) == []


def _pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _with_hang_marker(wheelhouse: Path, dest: Path, marker: Path) -> Path:
    """A copy of `wheelhouse` whose hanging sdist writes `marker` when its build starts."""
    shutil.copytree(wheelhouse, dest)
    build_hanging_sdist(dest, marker=marker)
    return dest


@pytest.mark.parametrize("kind", INSTALLERS)
def test_timeout_kills_the_build_and_leaves_nothing(tmp_path, wheelhouse, recorder, kind,
                                                     monkeypatch):
    marker = tmp_path / "build-started"
    wheelhouse = _with_hang_marker(wheelhouse, tmp_path / "wh", marker)
    m, _ = manager(make_cfg(tmp_path, wheelhouse, kind, timeout_s=3), recorder)
    start = time.monotonic()
    with pytest.raises(ParError) as err:
        ensure(m, "hangpkg==1.0\n")
    assert time.monotonic() - start < 60
    assert err.value.code == "dependency_install_timeout"
    assert err.value.message == "Dependency installation timed out after 3 s"
    assert marker.exists(), "the hanging build never started"
    hung = int(marker.read_text())
    deadline = time.monotonic() + 5
    while not _pid_gone(hung) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pid_gone(hung), "the build backend survived the timeout"
    assert leftovers(m.cfg) == []


class FullDiskInstaller(Installer):
    """Writes into the venv, then hits ENOSPC (what a full disk does mid-install)."""

    name = "full-disk"

    def create_venv(self, *, path, python, prompt=None, timeout=60):
        select_installer(self.cfg).create_venv(path=path, python=python, prompt=prompt)

    def install(self, *, venv_path, requirements_file, timeout):
        (venv_path / "partial.bin").write_bytes(b"x" * 1024)
        raise OSError(28, "No space left on device")

    def _query_version(self) -> str:
        return "0"


def test_disk_full_during_build_is_a_clean_failure(tmp_path, wheelhouse, recorder):
    cfg = make_cfg(tmp_path, wheelhouse)
    m = VenvManager(cfg, recorder.logger, installer=FullDiskInstaller(cfg))
    with pytest.raises(ParError) as err:
        ensure(m, "alpha==1.0\n")
    assert err.value.code == "disk_full" and err.value.status == 507
    assert leftovers(cfg) == []


_FULL_DISK_CHILD = """
import hashlib, json, logging, sys
from pathlib import Path
from tests.unit.test_venvs import make_cfg
from par.venvs import VenvManager
from par.errors import ParError
cfg = make_cfg(Path(sys.argv[1]), Path(sys.argv[2]))
m = VenvManager(cfg, logging.getLogger("child"))
text = "bulky==1.0\\n"
try:
    m.ensure("agent-full", "demo@1.0", text, hashlib.sha256(text.encode()).hexdigest(), set())
    code = None
except ParError as exc:
    code = exc.code
from tests.unit.test_venvs import layers, leftovers
print(json.dumps({"code": code, "left": leftovers(cfg) + layers(cfg)}))
"""


def test_real_full_disk_leaves_nothing(tmp_path, wheelhouse):
    """A real ENOSPC: the build runs in a private mount namespace on a tiny tmpfs."""
    uv_binary()
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to mount a private tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=192k tmpfs {disk} && "
              f'exec {sys.executable} -c "$0" {disk} {wheelhouse}')
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                          _FULL_DISK_CHILD], capture_output=True, text=True, timeout=120, cwd=REPO)
    if out.returncode != 0 and "mount" in out.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"code": "disk_full", "left": []}


_KILLED_CHILD = """
import hashlib, logging, sys
from pathlib import Path
from tests.unit.test_venvs import make_cfg
from par.venvs import VenvManager
cfg = make_cfg(Path(sys.argv[1]), Path(sys.argv[2]), timeout_s=300)
text = "hangpkg==1.0\\n"
VenvManager(cfg, logging.getLogger("child")).ensure(
    "agent-k", "demo@1.0", text, hashlib.sha256(text.encode()).hexdigest(), set())
"""


def test_kill9_during_build_leaves_nothing_reusable(tmp_path, wheelhouse, recorder):
    marker = tmp_path / "build-started"
    wheelhouse = _with_hang_marker(wheelhouse, tmp_path / "wh", marker)
    cfg = make_cfg(tmp_path, wheelhouse)
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(tmp_path), str(wheelhouse)],
                             cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        assert marker.exists(), "the build never started"
        # kill -9 of the daemon; systemd then kills the rest of its cgroup (the installer)
        family = [child, *(psutil.Process(child.pid).children(recursive=True))]
        for proc in family:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    text = "hangpkg==1.0\n"
    name = venv_name("agent-k", "demo@1.0", sha(text))
    left = leftovers(cfg)
    assert name not in left and all(n.startswith(".tmp-") for n in left) and left
    m, inst = manager(cfg, recorder)
    assert m.entries() == []  # the half-built folder is not a venv
    with venv_lock(layout.venvs(cfg), name, blocking=False) as got:
        assert got  # the dead builder's lock went with it
    assert cleanup_stale(cfg) == left
    assert leftovers(cfg) == []
    # the next build of that agent starts from scratch and works
    fresh = ensure(m, "alpha==1.0\n", agent="agent-k")
    assert not fresh.reused and inst.installs == 1


# -- concurrency --------------------------------------------------------------------------------


def test_two_threads_same_venv_install_once(tmp_path, wheelhouse, recorder):
    m, inst = manager(make_cfg(tmp_path, wheelhouse), recorder)
    barrier = threading.Barrier(2)
    results, errors = [], []

    def worker():
        barrier.wait()
        try:
            results.append(ensure(m, "beta==1.0\n"))
        except Exception as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(r.reused for r in results) == [False, True]
    assert (inst.creates, inst.installs) == (1, 1)


_CONCURRENT_CHILD = """
import hashlib, logging, sys, time
from pathlib import Path
from tests.unit.test_venvs import make_cfg
from par.venvs import VenvManager
cfg = make_cfg(Path(sys.argv[1]), Path(sys.argv[2]))
while time.time() < float(sys.argv[3]):
    time.sleep(0.001)
text = "beta==1.0\\n"
r = VenvManager(cfg, logging.getLogger("child")).ensure(
    "agent-p", "demo@1.0", text, hashlib.sha256(text.encode()).hexdigest(), set())
print("reused" if r.reused else "built")
"""


def test_two_processes_same_venv_build_once(tmp_path, wheelhouse):
    uv_binary()  # skips here without uv: in the children a missing uv is a crash, not a skip
    start_at = str(time.time() + 1.5)
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_CHILD, str(tmp_path),
                               str(wheelhouse), start_at], cwd=REPO, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["built", "reused"]


def test_different_venvs_build_in_parallel(tmp_path, wheelhouse, recorder):
    m, _ = manager(make_cfg(tmp_path, wheelhouse), recorder)
    other = venv_name("agent-a", "demo@1.0", sha("alpha==2.0\n"))
    with venv_lock(m.root, other):  # someone is busy with another venv
        done = []
        t = threading.Thread(target=lambda: done.append(ensure(m, "alpha==1.0\n")))
        t.start()
        t.join(30)
        assert done and not done[0].reused


# -- eviction, listing, prewarm -----------------------------------------------------------------


def _age(venv: Path, seconds_ago: float) -> None:
    write_meta(venv, dataclasses.replace(read_meta(venv), last_used=time.time() - seconds_ago))


def test_eviction_is_lru_and_never_touches_in_use(tmp_path, wheelhouse, recorder):
    cfg = make_cfg(tmp_path, wheelhouse, max_venvs=2)
    m, _ = manager(cfg, recorder, evict_grace_s=0)
    a = ensure(m, "alpha==1.0\n", agent="agent-a")
    b = ensure(m, "alpha==1.0\n", agent="agent-b")
    _age(a.path, 300)  # a is the least recently used, but it is in use
    _age(b.path, 100)
    c = ensure(m, "alpha==1.0\n", agent="agent-c", in_use={a.name})
    assert leftovers(cfg) == sorted([a.name, c.name])
    assert [e["venv"] for e in recorder.named("Evicted venv")] == [b.name]
    assert recorder.named("Evicted venv")[0]["reason"] == "max_venvs"
    # over budget with everything in use: nothing is evicted, the build still happens
    d = ensure(m, "alpha==1.0\n", agent="agent-d", in_use={a.name, c.name})
    assert leftovers(cfg) == sorted([a.name, c.name, d.name])
    assert m.counters.snapshot()["evictions"] == 1


def test_prune_respects_budget_in_use_and_grace(tmp_path, wheelhouse, recorder):
    cfg = make_cfg(tmp_path, wheelhouse, min_free_bytes=2**62)  # "the disk is always full"
    built = [ensure(VenvManager(cfg, recorder.logger), "alpha==1.0\n", agent=f"agent-{i}").name
             for i in range(3)]
    # the default grace protects venvs just handed out
    assert VenvManager(cfg, recorder.logger).prune(set()) == []
    m = VenvManager(cfg, recorder.logger, evict_grace_s=0)
    assert sorted(m.prune({built[1]})) == sorted([built[0], built[2]])
    assert leftovers(cfg) == [built[1]]
    store = cfg.paths.cache_dir / "pyc"
    assert list(store.rglob("*.pyc"))  # alpha's bytecode, shared by the venvs
    assert m.prune(set(), all_unused=True) == [built[1]]
    assert leftovers(cfg) == [] and layers(cfg) == []  # the layer went with its last venv
    assert not list(store.rglob("*.pyc"))  # no venv links it any more


def test_byte_budget_counts_hardlinks_once(tmp_path, wheelhouse, recorder):
    cfg = make_cfg(tmp_path, wheelhouse)
    m, _ = manager(cfg, recorder)
    a = ensure(m, "bulky==1.0\n", agent="agent-a")
    b = ensure(m, "bulky==1.0\n", agent="agent-b")
    one = disk_usage([a.path])
    both = disk_usage([a.path, b.path])
    assert one > 256 * 1024
    assert both - one < 200 * 1024  # the blob is one inode shared via uv's cache
    rows = {r.name: r for r in m.entries({a.name: ["dep-1", "dep-2"]})}
    assert rows[a.name].in_use_by == ("dep-1", "dep-2") and rows[b.name].in_use_by == ()
    assert rows[a.name].size_bytes == one and rows[a.name].installer == "uv"
    # a byte budget below two venvs evicts the unused one
    tight = dataclasses.replace(cfg, venvs=VenvsConfig(max_bytes=both - 1))
    assert VenvManager(tight, recorder.logger, evict_grace_s=0).prune({a.name}) == [b.name]


def test_prewarm_fills_the_cache_for_offline_builds(tmp_path, wheelhouse, recorder):
    cfg = make_cfg(tmp_path, wheelhouse)
    req = tmp_path / "requirements.txt"
    req.write_text("beta==1.0\n")
    with serve_index(wheelhouse, tmp_path / "index") as url:
        online = dataclasses.replace(cfg, installer=dataclasses.replace(
            cfg.installer, index_url=url, find_links=[], offline=False))
        warm = VenvManager(online, recorder.logger).prewarm(req)
    assert warm.installer == "uv" and warm.seconds > 0
    assert leftovers(cfg) == []
    # the index is gone: only the shared cache can serve this build
    offline = dataclasses.replace(cfg, installer=dataclasses.replace(
        online.installer, offline=True))
    m, _ = manager(offline, recorder)
    r = ensure(m, "beta==1.0\n")
    assert not r.reused and run_py(r.path, "import beta, alpha; print(alpha.VERSION)") == "2.0"
    # and without prewarm the same offline build fails: the test can fail
    cold = config.with_state_dir(offline, tmp_path / "cold-state", tmp_path / "cold-cache")
    with pytest.raises(ParError):
        VenvManager(cold, recorder.logger).ensure(
            "agent-cold", "demo@1.0", "beta==1.0\n", sha("beta==1.0\n"), set())


def test_cleanup_stale_removes_only_temporary_folders(tmp_path, wheelhouse, recorder):
    cfg = make_cfg(tmp_path, wheelhouse)
    m, _ = manager(cfg, recorder)
    good = ensure(m, "alpha==1.0\n")
    (layout.venvs(cfg) / ".tmp-agent-x_abcdef0-123").mkdir()
    (layout.venvs(cfg) / ".tmp-del-agent-y_abcdef0-9").mkdir()
    assert sorted(cleanup_stale(cfg)) == [".tmp-agent-x_abcdef0-123", ".tmp-del-agent-y_abcdef0-9"]
    assert leftovers(cfg) == [good.name]
    assert ensure(m, "alpha==1.0\n").reused


def test_metadata_round_trip_and_refusal(tmp_path):
    meta = VenvMeta("demo@1.0", None, "a" * 64, "/usr/bin/python3", "3.11.2", "uv", "0.13.9",
                    1.0, 2.0, 3.0)
    write_meta(tmp_path, meta)
    assert read_meta(tmp_path) == meta
    raw = json.loads((tmp_path / METADATA_FILE).read_text())
    assert raw["schema"] == 2 and raw["layer"] is None
    linked = dataclasses.replace(meta, layer="0123456789abcdef")
    write_meta(tmp_path, linked)
    assert read_meta(tmp_path) == linked
    for key, bad in (("schema", 99), ("schema", 1), ("layer", "../x"), ("layer", 5)):
        (tmp_path / METADATA_FILE).write_text(json.dumps({**raw, key: bad}))
        assert read_meta(tmp_path) is None, (key, bad)


def test_cache_and_venvs_share_a_filesystem_by_default(tmp_path, wheelhouse):
    assert cache_on_same_filesystem(make_cfg(tmp_path, wheelhouse))


def test_benchmark_smoke():
    """bench/venv_build.py runs end to end (timings are reported, not asserted,
    except the orders of magnitude the design relies on)."""
    wheelhouse_dir()
    uv_binary()
    out = subprocess.run([sys.executable, str(REPO / "bench" / "venv_build.py"), "--smoke",
                          "--json"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["runs"] == 1
    assert result["b_par_uv_s"] < result["a_legacy_s"]  # uv warm beats venv + pip
    assert 0 < result["d_reuse_ms"] < result["b_par_uv_s"] * 1000
    assert result["disk_uv_5_over_1"] < 5  # hardlinked files are shared


def test_installer_is_chosen_again_after_reset(tmp_path, wheelhouse, recorder, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    cfg = make_cfg(tmp_path, wheelhouse, "pip")
    cfg = dataclasses.replace(cfg, installer=dataclasses.replace(cfg.installer, kind="auto"))
    m = VenvManager(cfg, recorder.logger)
    assert m.installer.name == "pip"  # no uv anywhere yet
    layout.tools(cfg).mkdir(parents=True)
    (layout.tools(cfg) / "uv").symlink_to(uv_binary())  # what install-uv leaves
    assert m.installer.name == "pip"  # kept until told
    m.reset_installer()
    assert m.installer.name == "uv"
