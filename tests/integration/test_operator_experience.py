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
