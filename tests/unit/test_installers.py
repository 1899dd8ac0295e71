"""par.installers: selection, options, real uv/pip installs of tiny wheels, install-uv."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from par import config, installers, layout, procs
from par.config import Installer as InstallerConfig
from par.errors import ParError
from par.installers import (
    PipInstaller,
    UvInstaller,
    find_uv,
    index_args,
    install_error,
    select_installer,
)
from par.uv_bootstrap import install_uv
from tests.wheels import build_wheel, uv_binary


def _cfg(tmp_path: Path, **installer: object) -> config.Config:
    base = config.with_state_dir(config.from_dict(None), tmp_path / "state")
    return dataclasses.replace(base, installer=InstallerConfig(**installer))


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    wh = tmp_path_factory.mktemp("wh")
    build_wheel(wh, "alpha", "1.0")
    build_wheel(wh, "gamma", "1.0", modules={
        "gamma/__init__.py": "WHO = 'gamma'\n",
        "gamma/broken.py": "def oops(:\n",  # a module that does not compile
    })
    build_wheel(wh, "uv", "9.9.9", modules={"uv/__init__.py": ""},
                scripts={"uv": b"#!/bin/sh\necho 'uv 9.9.9 (par-test)'\n"})
    return wh


def _fake_uv(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    uv = folder / "uv"
    uv.write_text("#!/bin/sh\necho 'uv 0.0.1'\n")
    uv.chmod(0o755)
    return uv


def test_index_args_uv_and_pip_differ_only_offline():
    ic = InstallerConfig(index_url="https://idx/simple", extra_index_urls=["https://x/simple"],
                         find_links=["/wh"], offline=True)
    common = ["--index-url", "https://idx/simple", "--extra-index-url", "https://x/simple",
              "--find-links", "/wh"]
    assert index_args(ic, uv=True) == common + ["--offline"]
    assert index_args(ic, uv=False) == common + ["--no-index"]
    assert index_args(InstallerConfig(), uv=True) == []


def test_select_installer(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    assert isinstance(select_installer(_cfg(tmp_path, kind="pip")), PipInstaller)
    # auto without any uv falls back to pip; kind=uv refuses
    assert isinstance(select_installer(_cfg(tmp_path, kind="auto")), PipInstaller)
    with pytest.raises(ParError) as err:
        select_installer(_cfg(tmp_path, kind="uv"))
    assert err.value.code == "uv_not_found" and err.value.field == "installer.uv_path"
    # the configured path wins, and is the only place looked at when set
    explicit = _fake_uv(tmp_path / "opt")
    chosen = select_installer(_cfg(tmp_path, kind="auto", uv_path=explicit))
    assert isinstance(chosen, UvInstaller) and chosen.uv == explicit
    missing = _cfg(tmp_path, kind="auto", uv_path=tmp_path / "nope" / "uv")
    _fake_uv(layout.tools(missing))
    assert find_uv(missing) is None
    # unset: state_dir/tools/uv, then PATH
    cfg = _cfg(tmp_path, kind="auto")
    assert find_uv(cfg) == layout.tools(cfg) / "uv"
    (layout.tools(cfg) / "uv").unlink()
    on_path = _fake_uv(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert find_uv(cfg) == on_path


def test_install_error_messages():
    lines = "\n".join(f"line {i}" for i in range(100))
    failed = install_error(procs.ProcResult(("x",), 1, lines, 0.1), 300)
    assert failed.code == "dependency_install_failed"
    assert "line 99" in failed.message and "line 59" not in failed.message
    assert "line 60" in failed.message
    timed = install_error(procs.ProcResult(("x",), None, "", 5.0, timed_out=True), 5)
    assert timed.code == "dependency_install_timeout"
    assert timed.message == "Dependency installation timed out after 5 s"
    full = install_error(procs.ProcResult(("x",), 2, "error: failed to write (os error 28)", 1), 5)
    assert full.code == "disk_full" and full.status == 507


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def _imports(venv: Path) -> str:
    out = subprocess.run([str(venv / "bin" / "python"), "-B", "-c",
                          "import alpha; print(alpha.VERSION)"],
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def test_uv_installs_offline_and_pard_compiles_with_the_base_interpreter(tmp_path, wheelhouse):
    cfg = _cfg(tmp_path, kind="uv", uv_path=uv_binary(), find_links=[str(wheelhouse)],
               offline=True)
    inst = select_installer(cfg)
    assert isinstance(inst, UvInstaller) and inst.shared_bytecode
    venv = tmp_path / "venv"
    inst.create_venv(path=venv, python=cfg.installer.python, prompt="demo")
    assert not (venv / "bin" / "pip").exists()  # uv needs no pip in the venv
    req = tmp_path / "req.txt"
    req.write_text("alpha==1.0\n")
    result = inst.install(venv_path=venv, requirements_file=req, timeout=60)
    assert result.ok and _imports(venv) == "1.0"
    # the build compiles nothing; pard does, afterwards, with the base interpreter
    assert not list(_site_packages(venv).glob("alpha/__pycache__/*.pyc"))
    compiled = installers.compile_bytecode(cfg, venv, 60)
    assert compiled.ok and compiled.argv[0] == str(cfg.installer.python)
    assert list(_site_packages(venv).glob("alpha/__pycache__/*.pyc"))
    assert (cfg.paths.cache_dir / "uv").is_dir()
    assert inst.version()[0].isdigit()


def test_pip_installs_offline_and_compiles(tmp_path, wheelhouse):
    cfg = _cfg(tmp_path, kind="pip", find_links=[str(wheelhouse)], offline=True)
    inst = select_installer(cfg)
    assert isinstance(inst, PipInstaller)
    venv = tmp_path / "venv"
    inst.create_venv(path=venv, python=cfg.installer.python)
    req = tmp_path / "req.txt"
    req.write_text("alpha==1.0\n")
    assert not (venv / "bin" / "pip").exists()  # the host's pip installs into it
    assert sum(p.lstat().st_size for p in venv.rglob("*")) < 1024 * 1024
    inst.install(venv_path=venv, requirements_file=req, timeout=120)
    assert _imports(venv) == "1.0"
    site = _site_packages(venv)
    assert not (site / "pip").exists() and not (venv / "bin" / "pip").exists()
    # pard compiles into the shared store afterwards, as for uv
    assert inst.shared_bytecode and not list(site.glob("alpha/__pycache__/*.pyc"))
    assert installers.compile_bytecode(cfg, venv, 60).ok
    assert list(site.glob("alpha/__pycache__/*.pyc"))
    assert (cfg.paths.cache_dir / "pip").is_dir()
    assert inst.version()[0].isdigit()
    # a requirement that does not exist: the installer's own words reach the error
    req.write_text("par-missing-dist==1.0\n")
    with pytest.raises(ParError) as err:
        inst.install(venv_path=venv, requirements_file=req, timeout=120)
    assert err.value.code == "dependency_install_failed"
    assert "par-missing-dist" in err.value.message


def test_install_uv_from_a_wheelhouse(tmp_path, wheelhouse):
    cfg = _cfg(tmp_path, find_links=[str(wheelhouse)], offline=True)
    path = install_uv(cfg, "9.9.9", timeout=120)
    assert path == layout.tools(cfg) / "uv"
    assert os.access(path, os.X_OK)
    assert subprocess.run([str(path), "--version"], capture_output=True, text=True,
                          timeout=10).stdout.startswith("uv 9.9.9")
    # no work folder left; the record names the wheel and its digest
    assert sorted(p.name for p in layout.tools(cfg).iterdir()) == ["uv", "uv.json"]
    record = json.loads((layout.tools(cfg) / "uv.json").read_text())
    wheel = next(wheelhouse.glob("uv-9.9.9-*.whl"))
    assert record["version"] == "9.9.9" and record["wheel"] == wheel.name
    assert record["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert find_uv(cfg) == path


def test_install_uv_refuses_another_version(tmp_path, wheelhouse):
    cfg = _cfg(tmp_path, find_links=[str(wheelhouse)], offline=True, uv_version="9.9.8")
    with pytest.raises(ParError) as err:  # the wheelhouse has 9.9.9 only
        install_uv(cfg, timeout=120)
    assert err.value.code == "uv_install_failed" and "uv 9.9.8" in err.value.message
    assert not (layout.tools(cfg) / "uv").exists()


def test_install_uv_failure_leaves_nothing(tmp_path):
    empty = tmp_path / "empty-wh"
    empty.mkdir()
    cfg = _cfg(tmp_path, find_links=[str(empty)], offline=True)
    with pytest.raises(ParError) as err:
        install_uv(cfg, timeout=120)
    assert err.value.code == "uv_install_failed"
    assert list(layout.tools(cfg).iterdir()) == []


def test_bytecode_is_compiled_once_and_shared(tmp_path, wheelhouse):
    cfg = _cfg(tmp_path, kind="uv", uv_path=uv_binary(), find_links=[str(wheelhouse)],
               offline=True)
    inst = select_installer(cfg)
    req = tmp_path / "req.txt"
    req.write_text("alpha==1.0\ngamma==1.0\n")
    venvs = [tmp_path / "one", tmp_path / "two"]
    outputs = []
    for venv in venvs:
        inst.create_venv(path=venv, python=cfg.installer.python)
        inst.install(venv_path=venv, requirements_file=req, timeout=60)
        outputs.append(installers.compile_bytecode(cfg, venv, 60).output)
    assert "2 newly compiled" in outputs[0] and "0 newly compiled" in outputs[1]
    pycs = [next(_site_packages(v).glob("alpha/__pycache__/__init__.*.pyc")) for v in venvs]
    assert os.stat(pycs[0]).st_ino == os.stat(pycs[1]).st_ino  # one file on disk
    assert pycs[0].stat().st_nlink == 3  # both venvs and the store
    assert not list(_site_packages(venvs[0]).glob("gamma/__pycache__/broken.*"))
    # Python really uses the shared .pyc: swap the source for one of the same size and
    # mtime (a new file, the cached one stays intact); the old code still runs.
    src = _site_packages(venvs[1]) / "alpha" / "__init__.py"
    st = src.stat()
    replacement = src.with_suffix(".new")
    replacement.write_text(src.read_text().replace("1.0", "9.9"))
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    replacement.replace(src)
    assert _imports(venvs[1]) == "1.0"


def test_compile_never_reads_through_a_symlink(tmp_path, wheelhouse):
    """pard compiles as root: a module that is a symlink (to a root-only file that
    happens to be valid Python) must not be compiled into a .pyc agents can read."""
    cfg = _cfg(tmp_path, kind="uv", uv_path=uv_binary(), find_links=[str(wheelhouse)],
               offline=True)
    inst = select_installer(cfg)
    venv = tmp_path / "venv"
    inst.create_venv(path=venv, python=cfg.installer.python)
    secret = tmp_path / "secret_token.py"
    secret.write_text("s3cr3t_value\n")
    site = _site_packages(venv)
    site.mkdir(parents=True, exist_ok=True)
    (site / "leak.py").symlink_to(secret)
    escape = tmp_path / "elsewhere"
    escape.mkdir()
    (site / "pkg").mkdir()
    (site / "pkg" / "mod.py").write_text("X = 1\n")
    (site / "pkg" / "__pycache__").symlink_to(escape)  # a .pyc written here lands outside
    assert installers.compile_bytecode(cfg, venv, 60).ok
    assert not list(site.glob("__pycache__/leak.*")) and list(escape.iterdir()) == []


def test_build_env_passes_only_the_operators_network_settings_and_locale():
    operator = {"https_proxy": "http://proxy:3128", "NO_PROXY": "10.0.0.0/8",
                "SSL_CERT_FILE": "/etc/ssl/ca.pem", "REQUESTS_CA_BUNDLE": "/etc/ssl/ca.pem",
                "PIP_INDEX_URL": "https://mirror/simple", "UV_INDEX_URL": "https://mirror/simple",
                "UV_NATIVE_TLS": "1", "LANG": "C"}
    env = installers.build_env({"UV_CACHE_DIR": "/c", "UV_NO_CONFIG": "1"}, base={
        **operator,
        "PYTHONPATH": "/evil", "PYTHONSTARTUP": "/evil.py", "LD_PRELOAD": "/evil.so",
        "PATH": "/evil/bin", "PIP_TARGET": "/evil", "PIP_CONFIG_FILE": "/evil.conf",
        "UV_CACHE_DIR": "/evil", "UV_NO_CONFIG": "0", "UV_PYTHON": "/evil/python",
        "UV_LINK_MODE": "symlink", "PIP_REQUIRE_VIRTUALENV": "0"})
    assert env == {**operator, "PATH": installers.DEFAULT_PATH, "UV_CACHE_DIR": "/c",
                   "UV_NO_CONFIG": "1"}


def test_uv_trusts_the_host_store():
    env = UvInstaller(config.from_dict(None), Path("/x/uv"))._uv_env()
    assert env["UV_SYSTEM_CERTS"] == "1" and env["UV_NATIVE_TLS"] == "1"
