"""par.uv_bootstrap and the venv manager's use of it: fetch once, pip meanwhile, say why."""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

from par import config, layout
from par.cli.doctor import check_installer
from par.config import Installer as InstallerConfig
from par.errors import ParError
from par.uv_bootstrap import UvBootstrap, one_line
from par.venvs import VenvManager

LOG = logging.getLogger("test")


def _cfg(tmp_path: Path, **installer: object) -> config.Config:
    base = config.with_state_dir(config.from_dict(None), tmp_path / "state")
    return dataclasses.replace(base, installer=InstallerConfig(**installer))


def _fake_uv_fetch(cfg: config.Config) -> Path:
    tools = layout.tools(cfg)
    tools.mkdir(parents=True, exist_ok=True)
    uv = tools / "uv"
    uv.write_text("#!/bin/sh\necho 'uv 0.13.9'\n")
    uv.chmod(0o755)
    return uv


def test_nothing_is_fetched_until_enabled(tmp_path):
    calls = []
    boot = UvBootstrap(_cfg(tmp_path), LOG, fetch=lambda cfg: calls.append(cfg) or Path("/x"))
    assert not boot.kick() and boot.status().state == "idle" and not calls


def test_a_fetch_runs_once_and_calls_back(tmp_path):
    ready = threading.Event()
    boot = UvBootstrap(_cfg(tmp_path), LOG, on_ready=ready.set, fetch=_fake_uv_fetch)
    boot.enable()
    assert boot.kick()
    st = boot.wait(10)
    assert st.state == "ready" and st.path and ready.is_set()
    assert not boot.kick()  # in place: never again


def test_a_failure_is_retried_only_after_retry_s(tmp_path):
    def fail(cfg: config.Config) -> Path:
        raise ParError("uv_install_failed", "downloading uv 0.13.9 from http://idx failed: "
                       "connection refused\nlong pip output", None, 502)

    boot = UvBootstrap(_cfg(tmp_path), LOG, fetch=fail, retry_s=3600)
    boot.enable()
    assert boot.kick()
    st = boot.wait(10)
    assert st.state == "failed"
    assert st.reason == "downloading uv 0.13.9 from http://idx failed: connection refused"
    assert st.to_dict() == {"state": "failed", "version": "0.13.9", "reason": st.reason}
    assert not boot.kick()  # too soon
    boot.retry_s = 0
    assert boot.kick()
    boot.wait(10)


def test_one_line_prefers_the_error():
    out = "Looking in links: /x\nWARNING: Retrying ...\nERROR: Could not find a version\nmore\n"
    assert one_line(out) == "ERROR: Could not find a version"
    assert one_line("") == ""
    assert len(one_line("x" * 1000)) == 300


def test_manager_builds_with_pip_then_uv(tmp_path):
    cfg = _cfg(tmp_path, kind="auto", uv_path=None)
    mgr = VenvManager(cfg, LOG)
    mgr.uv_bootstrap = UvBootstrap(cfg, LOG, on_ready=mgr.reset_installer, fetch=_fake_uv_fetch)
    if mgr.installer.name != "pip":  # a uv on PATH: nothing to bootstrap on this host
        assert not mgr.start_uv_bootstrap()
        return
    assert mgr.fallback_reason() and "parctl installer install-uv" in mgr.fallback_reason()
    assert mgr.start_uv_bootstrap()
    mgr.uv_bootstrap.wait(10)
    assert mgr.installer.name == "uv" and mgr.fallback_reason() is None
    status = mgr.installer_status()
    assert status["name"] == "uv" and status["configured"] == "auto"
    assert status["bootstrap"]["state"] == "ready" and "reason" not in status


def _fetching(tmp_path, monkeypatch, uv_wait_s: float) -> tuple[VenvManager, threading.Event]:
    """A manager whose uv fetch is under way until the returned event is set."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no uv on PATH
    cfg = _cfg(tmp_path, kind="auto", uv_wait_s=uv_wait_s)
    release = threading.Event()

    def held_fetch(cfg: config.Config) -> Path:
        release.wait(5)
        return _fake_uv_fetch(cfg)

    mgr = VenvManager(cfg, LOG)
    mgr.uv_bootstrap = UvBootstrap(cfg, LOG, on_ready=mgr.reset_installer, fetch=held_fetch)
    assert mgr.start_uv_bootstrap() and mgr.uv_bootstrap.status().state == "fetching"
    return mgr, release


def test_a_build_waits_for_a_fetch_in_progress(tmp_path, monkeypatch):
    mgr, release = _fetching(tmp_path, monkeypatch, uv_wait_s=10.0)
    threading.Timer(0.3, release.set).start()
    assert mgr._build_installer().name == "uv"  # waited for it, not pip


def test_a_build_uses_pip_when_the_fetch_outlasts_the_wait(tmp_path, monkeypatch):
    mgr, release = _fetching(tmp_path, monkeypatch, uv_wait_s=0.2)
    try:
        assert mgr._build_installer().name == "pip"
    finally:
        release.set()
        mgr.uv_bootstrap.wait(5)


def test_manager_reports_why_pip(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no uv on PATH
    cfg = _cfg(tmp_path, kind="auto")

    def fail(cfg: config.Config) -> Path:
        raise ParError("uv_install_failed", "downloading uv 0.13.9 failed: Network unreachable")

    mgr = VenvManager(cfg, LOG)
    mgr.uv_bootstrap = UvBootstrap(cfg, LOG, on_ready=mgr.reset_installer, fetch=fail)
    assert mgr.start_uv_bootstrap()
    mgr.uv_bootstrap.wait(10)
    status = mgr.installer_status()
    assert status["name"] == "pip" and status["bootstrap"]["state"] == "failed"
    assert status["reason"] == ("uv 0.13.9 could not be fetched: downloading uv 0.13.9 failed: "
                                "Network unreachable")
    check = check_installer(cfg, {"installer": status})
    assert check.status == "warn" and "Network unreachable" in check.detail


def test_kind_pip_or_uv_never_bootstraps(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for kind in ("pip", "uv"):
        mgr = VenvManager(_cfg(tmp_path, kind=kind), LOG)
        assert not mgr.start_uv_bootstrap()
    assert VenvManager(_cfg(tmp_path, kind="pip"), LOG).fallback_reason() is None
