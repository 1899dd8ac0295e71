"""Pure logic of agent units: ids, names, properties, ports (no systemd needed)."""

from __future__ import annotations

import socket
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from par import agent_state, agent_unit, ids, ports
from par.agent_host.par_agent_host import exitcodes
from par.config import Config, Ports, with_state_dir
from par.errors import ParError
from par.host_files import HOST_SOURCE, host_digest, host_dir, install_host
from par.units import SIGNATURES, UnitSpec, properties, unit_name


@pytest.mark.parametrize("bad", ["../x", "a/b", "x.service", "a;b", "a" * 300, "", "ünï", "A b",
                                 "a@b", "-a", "a\nb", "a\\b"])
def test_injection_ids_are_refused(bad: str) -> None:
    with pytest.raises(ParError) as exc:
        unit_name(bad)
    assert exc.value.code == "invalid_id"
    assert exc.value.field == "agentAppId"


@pytest.mark.parametrize("good", ["hello", "hello-agent", "a1", "0abc", "x_y"])
def test_valid_ids(good: str) -> None:
    assert unit_name(good) == f"par-agent@{good}.service"
    assert ids.agent_id(good) == good


def test_non_string_id_is_refused() -> None:
    with pytest.raises(ParError, match="must be a string"):
        ids.deployment_id(12)


def launch(tmp_path: Path, **kw) -> agent_unit.AgentLaunch:
    base = dict(agent_id="hello", deployment_id="d-1", org_id="org", name="hello", version="1.0.0",
                package_root=tmp_path / "extracted/hello@1.0.0",
                venv_path=tmp_path / "venvs/hello_abc1234",
                ports={"rest": 8100, "a2a": 50100, "ui": 3100}, entrypoint="main:handler",
                rest_entry=None, a2a_service=None, ui_path=None,
                env={"FOO": "bar", "REST_PORT": "1"})
    base.update(kw)
    return agent_unit.AgentLaunch(**base)


def test_unit_spec_properties_all_have_signatures(tmp_path: Path) -> None:
    cfg = with_state_dir(Config(), tmp_path)
    host = tmp_path / "host" / "0123456789ab"
    the_launch = launch(tmp_path, memory_mb=256, cpu_units=512, stop_timeout_s=7, host_dir=host)
    spec = agent_unit.unit_spec(cfg, the_launch)
    props = properties(spec)
    for key in props:
        assert key in SIGNATURES, key
    assert props[b"Type"] == "notify"
    assert props[b"KillMode"] == "mixed"
    assert props[b"Restart"] == "on-failure"
    assert props[b"TimeoutStopUSec"] == 7_000_000
    assert props[b"MemoryMax"] == 256 * 1024 * 1024
    assert props[b"MemorySwapMax"] == 0  # the limit is not a move to swap
    assert props[b"CPUQuotaPerSecUSec"] == 500_000  # 512 units = half a CPU
    assert props[b"DynamicUser"] is True and props[b"User"] == "par-hello"
    assert props[b"StateDirectory"] == [f"par-agents/{agent_state.org_key('org')}/hello"]
    # the host's permanent failures, by the host's own numbers
    assert props[b"RestartPreventExitStatus"] == (list(exitcodes.PERMANENT), [])
    assert exitcodes.EXIT_SURFACE_FAILED not in exitcodes.PERMANENT  # that one may retry
    assert props[b"ExecStart"][0][1][-2:] == ["-m", "par_agent_host"]
    assert b"PAR_AGENT_APP_ID=hello" in props[b"LogExtraFields"]
    env = dict(e.split("=", 1) for e in props[b"Environment"])
    # the agent's own variables (secrets, often) are not in Environment=, which any user
    # can read, but in a root-only EnvironmentFile=; PAR's variables win over the package's
    assert env["REST_PORT"] == "8100" and "FOO" not in env
    assert props[b"EnvironmentFiles"] == [(str(tmp_path / "env" / "hello.env"), False)]
    assert agent_unit.env_file_text(cfg, the_launch) == 'FOO="bar"\n'
    path = agent_unit.write_env_file(cfg, the_launch)
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert env["PYTHONPATH"] == str(host)
    assert env["BASE_PATH"] == "/agents/hello"
    # the host is bound back into the agent's namespace (PAR's state is hidden from it)
    assert (str(host), str(host), False, 0) in props[b"BindReadOnlyPaths"]


def test_host_source_holds_only_the_host() -> None:
    names = {p.name for p in HOST_SOURCE.iterdir() if p.name != "__pycache__"}
    assert names == {"par_agent_host"}


def test_install_host_copies_and_compiles_once(tmp_path: Path) -> None:
    cfg = with_state_dir(Config(), tmp_path)
    host = install_host(cfg)
    assert host == host_dir(cfg, host_digest()) and host.parent == tmp_path / "host"
    sources = sorted(p.relative_to(host) for p in host.rglob("*.py"))
    assert sources == sorted(p.relative_to(HOST_SOURCE) for p in HOST_SOURCE.rglob("*.py")
                             if "__pycache__" not in p.parts)
    tag = sys.implementation.cache_tag
    for source in sources:
        pyc = host / source.parent / "__pycache__" / f"{source.stem}.{tag}.pyc"
        assert pyc.is_file(), pyc  # agents never compile the host themselves
    # readable by the agents' users; nothing left of the temporary copy
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in host.rglob("*"))
    assert [p.name for p in host.parent.iterdir()] == [host.name]
    marker = host / "par_agent_host" / "host.py"
    before = marker.stat().st_mtime_ns
    assert install_host(cfg) == host and marker.stat().st_mtime_ns == before  # reused


def test_install_host_replaces_an_incomplete_copy_and_stale_temporaries(tmp_path: Path) -> None:
    cfg = with_state_dir(Config(), tmp_path)
    half = host_dir(cfg, host_digest())
    (half / "par_agent_host").mkdir(parents=True)  # a crash before the rename: no marker
    (half.parent / ".tmp-x-1").mkdir()
    host = install_host(cfg)
    assert (host / "par_agent_host" / "host.py").is_file()
    assert sorted(p.name for p in host.parent.iterdir()) == [host.name]


def test_install_host_failure_names_the_interpreter_and_leaves_nothing(tmp_path: Path) -> None:
    cfg = with_state_dir(Config(), tmp_path)
    cfg = replace(cfg, installer=replace(cfg.installer, python=tmp_path / "no-python"))
    with pytest.raises(ParError, match="no-python") as info:
        install_host(cfg)
    assert info.value.field == "installer.python"
    assert list((tmp_path / "host").iterdir()) == []


def test_host_digest_follows_the_sources(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "par_agent_host").mkdir(parents=True)
    (src / "par_agent_host" / "a.py").write_text("x = 1\n")
    first = host_digest(src)
    (src / "par_agent_host" / "a.py").write_text("x = 2\n")
    assert host_digest(src) != first and len(first) == 12


def test_dynamic_user_names_are_short_valid_and_unique() -> None:
    a = agent_unit.dynamic_user_name("a" * 60)
    b = agent_unit.dynamic_user_name("a" * 59 + "b")
    assert len(a) <= 31 and len(b) <= 31 and a != b


def test_unknown_property_is_a_clear_error() -> None:
    from par.units import _signature_array
    with pytest.raises(ParError, match="NoSuchProperty"):
        _signature_array({b"NoSuchProperty": 1})


def test_spec_without_sandbox_has_no_dynamic_user() -> None:
    props = properties(UnitSpec(name="par-agent@x.service", description="x", argv=["/bin/true"]))
    assert b"DynamicUser" not in props


def test_ports_allocation_avoids_taken_and_busy() -> None:
    cfg = Ports(rest=[20100, 20110], a2a=[20200, 20210], ui=[20300, 20310])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 20100))
        busy.listen()
        got = ports.allocate(cfg, requested={}, taken={20101})
        assert got["rest"] == 20102
        with pytest.raises(ParError) as exc:
            ports.allocate(cfg, requested={"rest": 20100}, taken=set())
        assert exc.value.code == "port_in_use" and exc.value.field == "surfaces.ports.rest"
    with pytest.raises(ParError):
        ports.allocate(cfg, requested={"ui": 20305}, taken={20305})


def test_ports_inherit_and_exhaustion() -> None:
    cfg = Ports(rest=[20400, 20400], a2a=[20500, 20501], ui=[20600, 20601])
    got = ports.allocate(cfg, requested={}, taken=set(),
                         inherit={"rest": 20400, "a2a": 20501, "ui": 20600})
    assert got == {"rest": 20400, "a2a": 20501, "ui": 20600}
    with pytest.raises(ParError) as exc:
        ports.allocate(cfg, requested={}, taken={20400})
    assert exc.value.code == "ports_exhausted"


def test_par_service_sets_each_directive_once() -> None:
    """par.service once carried its hardening block twice (a merge leftover): list
    directives then add up silently, so a later edit of one copy does nothing."""
    from collections import Counter

    from tests.conftest import REPO

    keys = Counter(line.split("=", 1)[0] for line in
                   (REPO / "systemd/par.service").read_text().splitlines()
                   if "=" in line and not line.startswith("#"))
    assert [k for k, n in keys.items() if n > 1] == []
