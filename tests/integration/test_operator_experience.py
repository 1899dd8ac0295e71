"""What operators and agent developers see when something goes wrong (real systemd,
journald and pard): errors that name the line at fault, journal priorities that
`journalctl -p` can filter on, a STATUS= line that says what an exit status means."""

from __future__ import annotations

from par.agent_host.par_agent_host import exitcodes

from . import agents
from .pard import Pard, apkg_with, sh


def test_import_error_names_the_agents_own_line_and_keeps_the_traceback(pard: Pard) -> None:
    agent = "ux-trace"
    files = {
        "agent.yaml": agents.manifest(agent),
        "src/main.py": "import helper\n\ndef handler(ctx):\n    return {}\n",
        # the exception is raised inside the stdlib, the fault is on line 3 here
        "src/helper.py": "import json\n\nCONFIG = json.loads('{not json')\n",
    }
    d = pard.deploy(agent, apkg_with(pard.root / "apkg", files))
    assert d["status"] == "failed", d
    message = d["error"]["message"]
    assert d["error"]["code"] == "agent_start_failed"
    assert message.startswith(exitcodes.describe(exitcodes.EXIT_IMPORT_ERROR)), message
    assert "JSONDecodeError" in message and "src/helper.py:3)" in message, message
    assert "decoder.py" not in message, message

    unit = f"par-agent@{agent}.service"
    errors = sh("journalctl", "-u", unit, "-p", "err", "-o", "cat", "--no-pager").stdout
    # the whole traceback, at priority err, with the agent's own frame in it
    assert "Traceback (most recent call last):" in errors, errors
    assert 'helper.py", line 3, in <module>' in errors, errors
    assert "par-agent-host: cannot import entrypoint module 'main'" in errors, errors
    info = sh("journalctl", "-u", unit, "-p", "info", "-o", "cat", "--no-pager").stdout
    assert "starting agent" in info  # the host's progress stays at info
    assert "starting agent" not in errors


def test_pard_logs_with_real_priorities_and_fields(pard: Pard) -> None:
    agent = "ux-prio"
    d = pard.deploy(agent, apkg_with(pard.root / "apkg", agents.import_error(agent)))
    assert d["status"] == "failed", d
    pard.client().deployment(d["deploymentId"])  # a GET: routine, logged at debug

    def journal(*args: str) -> str:
        return sh("journalctl", "-u", "par.service", "-o", "cat", "--no-pager", *args).stdout

    warnings = journal("-p", "warning")
    assert '"event":"Deployment failed"' in warnings, warnings
    assert '"event":"API request"' not in warnings and '"event":"pard ready"' not in warnings
    # the fields an operator filters on are journal fields of their own
    mine = journal(f"PAR_DEPLOYMENT_ID={d['deploymentId']}", "CODE=agent_start_failed")
    assert '"event":"Deployment failed"' in mine, mine
    assert d["deploymentId"] in journal(f"PAR_AGENT_APP_ID={agent}")
    # GETs are kept, below info
    debug = journal("-p", "debug")
    info = journal("-p", "info")
    get = f'"method":"GET","path":"/deployments/{d["deploymentId"]}"'
    assert get in debug and get not in info


def test_par_service_is_hardened(pard: Pard) -> None:
    """par.service gives up what a root daemon that starts units and builds venvs can
    (docs/security.md, "pard itself"), and pard still works under it (this module's
    deploys ran there)."""
    import re

    out = sh("systemd-analyze", "security", "par.service", "--no-pager").stdout
    found = re.search(r"Overall exposure level for par\.service: ([0-9.]+)", out)
    assert found, out
    print(f"systemd-analyze security par.service: {found.group(1)}")
    assert float(found.group(1)) < 5.0, out


def test_parctl_env_set_restarts_with_the_same_package_and_venv(pard: Pard) -> None:
    import subprocess
    import sys

    from .test_agents import healthy, invoke

    agent = "ux-env"
    files = {"agent.yaml": agents.manifest(agent),
             "src/main.py": "import os\n\ndef handler(ctx):\n"
                            "    return {k: os.environ.get(k) for k in ('GREETING', 'OLD')}\n"}
    d1 = healthy(pard, agent, files, env={"GREETING": "hi", "OLD": "x"})

    def parctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "par.cli", "--socket", str(pard.socket),
                               *args], capture_output=True, text=True, timeout=120)

    res = parctl("env", "set", agent, "GREETING=s3cret-hello")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "s3cret-hello" not in res.stdout + res.stderr
    cur = pard.client().deployment(agent)
    assert cur["deploymentId"] != d1["deploymentId"] and cur["status"] == "healthy"
    assert (cur["venv"], cur["packageDigest"], cur["ports"]) == (
        d1["venv"], d1["packageDigest"], d1["ports"])
    assert invoke(cur["ports"]["rest"], {}) == {"GREETING": "s3cret-hello", "OLD": "x"}

    res = parctl("env", "unset", agent, "OLD", "--no-restart")
    assert res.returncode == 0, res.stdout + res.stderr
    assert invoke(cur["ports"]["rest"], {})["OLD"] == "x"  # not restarted yet
    assert parctl("restart", agent).returncode == 0
    assert invoke(cur["ports"]["rest"], {}) == {"GREETING": "s3cret-hello", "OLD": None}
    assert parctl("env", "list", agent).stdout.split() == ["GREETING"]
