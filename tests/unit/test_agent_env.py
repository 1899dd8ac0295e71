"""The environment an agent may set: the decision table of par.agent_env, and where it applies."""

from __future__ import annotations

from pathlib import Path

import pytest

from par import agent_env, agent_unit
from par.agent_env import PARS, REFUSED, SOURCE_DOTENV, SOURCE_MANIFEST, SOURCE_REQUEST
from par.config import Config, with_state_dir
from par.deploy_request import parse_deploy_request
from par.errors import ParError
from par.pipeline import read_package
from tests.unit.apkg_factory import GOOD_MANIFEST, make_cfg

# (key, decision: refused | par | None for the agent's own)
TABLE = [
    ("LD_PRELOAD", REFUSED), ("LD_LIBRARY_PATH", REFUSED), ("LD_AUDIT", REFUSED),
    ("GLIBC_TUNABLES", REFUSED),
    ("PYTHONHOME", REFUSED), ("PYTHONSTARTUP", REFUSED), ("PYTHONINSPECT", REFUSED),
    ("PYTHONUSERBASE", REFUSED), ("PYTHONNOUSERSITE", REFUSED),
    ("PATH", REFUSED),
    ("NOTIFY_SOCKET", REFUSED), ("WATCHDOG_USEC", REFUSED), ("WATCHDOG_PID", REFUSED),
    ("LISTEN_FDS", REFUSED), ("LISTEN_PID", REFUSED), ("INVOCATION_ID", REFUSED),
    ("JOURNAL_STREAM", REFUSED), ("SYSTEMD_EXEC_PID", REFUSED), ("STATE_DIRECTORY", REFUSED),
    ("CREDENTIALS_DIRECTORY", REFUSED), ("USER", REFUSED), ("MAINPID", REFUSED),
    ("PAR_BIND_ADDRESS", REFUSED), ("PAR_AGENT_SPEC", REFUSED), ("PAR_ANYTHING", REFUSED),
    ("AGENT_APP_ID", PARS), ("DEPLOYMENT_ID", PARS), ("ORG_ID", PARS), ("REST_PORT", PARS),
    ("A2A_PORT", PARS), ("UI_PORT", PARS), ("BASE_PATH", PARS), ("MULTIPLEXED", PARS),
    ("AGENT_PACKAGE_PATH", PARS), ("AGENT_VENV_PATH", PARS), ("HOME", PARS),
    ("PYTHONPATH", PARS), ("PYTHONUNBUFFERED", PARS), ("PYTHONDONTWRITEBYTECODE", PARS),
    # the agent's own
    ("OPENAI_API_KEY", None), ("PYTHONWARNINGS", None), ("PYTHONIOENCODING", None),
    ("MALLOC_ARENA_MAX", None), ("HTTPS_PROXY", None), ("TZ", None), ("LANG", None),
    ("LD_SDK_KEY", None), ("ld_preload", None), ("MY_PATH", None), ("PARSER", None),
    ("AGENT_NAME", None), ("SSL_CERT_FILE", None),
]


@pytest.mark.parametrize(("key", "decision"), TABLE)
def test_decision_table(key: str, decision: str | None) -> None:
    rule = agent_env.rule_for(key)
    assert (rule.decision if rule else None) == decision


def test_par_environment_keys_are_all_pars(tmp_path: Path) -> None:
    """Every variable par_environment sets is PAR's or reserved: none is left to the agent."""
    cfg = with_state_dir(Config(), tmp_path)
    launch = agent_unit.AgentLaunch(
        agent_id="a", deployment_id="d", org_id="o", name="a", version="1",
        package_root=tmp_path / "p", venv_path=tmp_path / "v",
        ports={"rest": 8100, "a2a": 50100, "ui": 3100}, entrypoint="main:handler",
        rest_entry=None, a2a_service=None, ui_path=None, env={})
    for key in agent_unit.par_environment(cfg, launch):
        rule = agent_env.rule_for(key)
        assert rule is not None, key
        assert key in agent_env.PAR_SET_KEYS or key.startswith("PAR_"), key


@pytest.mark.parametrize(("source", "field", "words"), [
    (SOURCE_REQUEST, "env.LD_PRELOAD", "env.LD_PRELOAD"),
    (SOURCE_MANIFEST, "environment.LD_PRELOAD", "agent.yaml: environment.LD_PRELOAD"),
    (SOURCE_DOTENV, ".env", ".env: LD_PRELOAD"),
])
def test_refusal_names_key_and_source(source: str, field: str, words: str) -> None:
    with pytest.raises(ParError) as info:
        agent_env.check({"OK": "1", "LD_PRELOAD": "/tmp/evil.so"}, source)
    err = info.value
    assert (err.code, err.field, err.status) == ("env_forbidden", field, 400)
    assert err.message.startswith(words) and "dynamic loader" in err.message
    assert "/tmp/evil.so" not in err.message  # values may be secrets


def test_merge_order_and_pars_dropped() -> None:
    merged = agent_env.merge({"A": "m", "B": "m", "REST_PORT": "1"},
                             {"B": "d", "C": "d", "PYTHONPATH": "src"},
                             {"C": "r", "AGENT_APP_ID": "spoofed"})
    assert merged.env == {"A": "m", "B": "d", "C": "r"}
    assert merged.dropped == ("AGENT_APP_ID", "PYTHONPATH", "REST_PORT")


@pytest.mark.parametrize("source", ["manifest", "dotenv", "request"])
def test_merge_refuses_from_each_source(source: str) -> None:
    envs: dict[str, dict[str, str]] = {"manifest": {}, "dotenv": {}, "request": {}}
    envs[source] = {"NOTIFY_SOCKET": "/dev/null"}
    with pytest.raises(ParError) as info:
        agent_env.merge(envs["manifest"], envs["dotenv"], envs["request"])
    assert info.value.code == "env_forbidden"


def test_deploy_request_env_is_checked() -> None:
    body = {"deploymentId": "d1", "agentAppId": "a", "orgId": "o", "version": "1",
            "packageUrl": "https://x/y.apkg", "env": {"K": "v", "PYTHONHOME": "/x"}}
    with pytest.raises(ParError) as info:
        parse_deploy_request(body, local=False, idempotency_key=None)
    assert (info.value.code, info.value.field, info.value.status) == \
        ("env_forbidden", "env.PYTHONHOME", 400)
    body["env"] = {"K": "v", "AGENT_APP_ID": "spoofed"}  # PAR's: accepted, PAR's value wins
    assert parse_deploy_request(body, local=False, idempotency_key=None).env["K"] == "v"


@pytest.mark.parametrize(("where", "field"), [("dotenv", ".env"),
                                               ("manifest", "environment.LD_PRELOAD")])
def test_read_package_refuses_package_env(tmp_path: Path, where: str, field: str) -> None:
    cfg = make_cfg(tmp_path)
    manifest = GOOD_MANIFEST
    if where == "manifest":
        manifest += "environment:\n  LD_PRELOAD: /x.so\n"
    else:
        (tmp_path / ".env").write_text("A=1\nexport LD_PRELOAD=/x.so\n")
    (tmp_path / "agent.yaml").write_text(manifest)
    with pytest.raises(ParError) as info:
        read_package(tmp_path, cfg, None)
    assert (info.value.code, info.value.field) == ("env_forbidden", field)
