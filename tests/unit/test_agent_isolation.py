"""Ports, addresses, IPC and default limits of an agent's unit (attacks 6, 8, 10)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from par import agent_isolation, agent_unit
from par.config import Agents, Config, ConfigError, from_dict, with_state_dir
from par.units import _signature_array, properties
from tests.unit.test_unit_spec import launch


def spec_props(tmp_path: Path, cfg: Config | None = None, **kw) -> dict[bytes, object]:
    cfg = with_state_dir(cfg or Config(), tmp_path)
    props = properties(agent_unit.unit_spec(cfg, launch(tmp_path, **kw)))
    _signature_array(props)  # every value marshals with its D-Bus signature
    return props


def test_agent_binds_only_its_own_ports(tmp_path: Path) -> None:
    props = spec_props(tmp_path)
    assert props[b"SocketBindAllow"] == [(0, 6, 1, 3100), (0, 6, 1, 8100), (0, 6, 1, 50100)]
    assert props[b"SocketBindDeny"] == [(0, 0, 0, 0)]


def test_metadata_addresses_are_denied(tmp_path: Path) -> None:
    deny = spec_props(tmp_path)[b"IPAddressDeny"]
    assert (2, bytes([169, 254, 169, 254]), 32) in deny
    assert (10, bytes.fromhex("fd000ec2000000000000000000000254"), 128) in deny
    cfg = Config(agents=Agents(ip_address_deny=[]))
    assert b"IPAddressDeny" not in spec_props(tmp_path, cfg)


def test_private_ipc_shm_and_run_lock(tmp_path: Path) -> None:
    props = spec_props(tmp_path)
    assert props[b"PrivateIPC"] is True
    tmpfs = dict(props[b"TemporaryFileSystem"])  # type: ignore[arg-type]
    assert tmpfs["/dev/shm"] == "rw,nosuid,nodev,noexec,mode=1777,size=64m"
    assert tmpfs["/run/lock"] == "ro"
    assert tmpfs[str(tmp_path)] == "ro"  # PAR's state stays hidden


def test_default_limits_apply_without_request_values(tmp_path: Path) -> None:
    props = spec_props(tmp_path)
    assert props[b"MemoryMax"] == 2048 * 1024 * 1024
    assert props[b"CPUQuotaPerSecUSec"] == 2_000_000
    assert props[b"TasksMax"] == 512
    asked = spec_props(tmp_path, memory_mb=256, cpu_units=512)
    assert asked[b"MemoryMax"] == 256 * 1024 * 1024
    assert asked[b"CPUQuotaPerSecUSec"] == 500_000
    unlimited = Config(agents=dataclasses.replace(Agents(), memory_max_mb=None,
                                                  cpu_quota_percent=None))
    props = spec_props(tmp_path, unlimited)
    assert b"MemoryMax" not in props and b"CPUQuotaPerSecUSec" not in props


@pytest.mark.parametrize("raw", [{"agents": {"tasks_max": 0}},
                                 {"agents": {"memory_max_mb": 0}},
                                 {"agents": {"ip_address_deny": ["not-an-ip"]}}])
def test_bad_limits_are_config_errors(raw: dict) -> None:
    with pytest.raises(ConfigError):
        from_dict(raw)


def test_bind_filter_enforced_reads_systemd_features() -> None:
    assert agent_isolation.bind_filter_enforced("+PAM +SECCOMP +BPF_FRAMEWORK +XZ")
    assert not agent_isolation.bind_filter_enforced("+PAM -BPF_FRAMEWORK +XZ")


def test_ui_folder_is_never_the_package_root(tmp_path: Path) -> None:
    from par.agent_host.par_agent_host.exitcodes import HostError
    from par.agent_host.par_agent_host.ui import ui_folder
    from par.errors import ParError
    from par.manifest import _ui_path

    (tmp_path / "index.html").write_text("x")
    (tmp_path / ".env").write_text("SECRET=1")
    for path in (".", "./"):
        with pytest.raises(ParError, match="package root"):
            _ui_path(tmp_path, path)
        with pytest.raises(HostError, match="package root"):
            ui_folder(tmp_path, path)


def test_ui_surface_refuses_dotfiles(tmp_path: Path) -> None:
    import socket
    import urllib.error
    import urllib.request

    from par.agent_host.par_agent_host.ui import surface

    (tmp_path / "index.html").write_text("hello")
    (tmp_path / ".env").write_text("SECRET=1")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("x")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = surface(tmp_path, "127.0.0.1", port)
    ui.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert r.read() == b"hello"
        for path in ("/.env", "/%2eenv", "/.git/config", "/x/../.env"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
            assert err.value.code == 404, path
    finally:
        ui.stop(1.0)
