"""`parctl`: the command line people use on the VM to deploy and look after agents.

Each click command is thin: it parses, calls `pard` through `par.client`, and
hands the answer to `render.show`, which prints it as text or (`--json`) the
API's JSON unchanged.  One handler on the group turns a `ParError` into one
line on stderr and an exit code; nothing else reaches the user as a traceback
(PARCTL_DEBUG=1 shows it).  `logs` and `pack` work without `pard`; `doctor`
reports on it rather than needing it.

    app.py             App (socket, seams for tests), exit codes, the error handler, --json
    root.py            the `parctl` group and `main`
    agent_commands.py  deploy, list, deployments, status, health, logs, stop/start/restart, rm
    host_commands.py   venv, installer, pack, doctor, version
    params.py          checks of ids and options (a bad one is exit 2)
    deploy_source.py   PATH|URL → package URL, agent id, version → the POST /deploy body
    progress.py        following a deploy and printing its phases
    doctor.py          the host checks
    render.py          the one printer (text or --json) and the text formats
    views.py           each answer as text
"""

from par.cli.app import App
from par.cli.root import cli, main

__all__ = ["App", "cli", "main"]
