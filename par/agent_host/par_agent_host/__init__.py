"""The PAR agent host: runs one agent inside the agent's own venv (stdlib only).

The unit runs ``<venv>/bin/python -m par_agent_host`` with ``PYTHONPATH``
pointing at ``par/agent_host/``, a folder holding this package alone, so the
agent's venv decides every other import.  The host never imports PAR or PAR's
dependencies (PyYAML, requests, pystemd, sdnotify, psutil, click); FastAPI and
uvicorn are imported only for an agent that declares ``rest.entry``, from its
venv.

Spec file
---------
PAR writes the manifest fields the host needs as JSON (so the host needs no
YAML parser) and passes the file's path in ``PAR_AGENT_SPEC`` (default:
``$AGENT_PACKAGE_PATH/par-agent.json``)::

    {
      "name": "hello",                 # required
      "version": "1.0.0",              # default "0.0.0"
      "entrypoint": "main:handler",    # default "main:handler"; module alone means :handler
      "rest_entry": "api:mount",       # or null: stdlib server with the host routes only
      "a2a_service": "grpc_server:create_grpc_server",  # or null; module alone means that function
      "ui_path": "ui",                 # or null; folder inside the package holding index.html
      "package_root": "/var/lib/pixell-runtime/extracted/hello@1.0.0"
    }

``package_root`` defaults to ``AGENT_PACKAGE_PATH``, then the spec's folder; a
relative one is relative to the spec's folder.  Unknown keys are ignored, so
PAR may add fields before the host reads them.

Environment
-----------
``REST_PORT`` (required), ``A2A_PORT`` / ``UI_PORT`` (required when the
surface is declared), ``AGENT_APP_ID``, ``DEPLOYMENT_ID``, ``ORG_ID`` (shown by
``/meta``), ``AGENT_PACKAGE_PATH``, ``AGENT_VENV_PATH``, ``BASE_PATH`` (the host
routes are also served below it), ``MULTIPLEXED``, ``PAR_BIND_ADDRESS``
(default ``127.0.0.1``), ``PAR_STOP_TIMEOUT`` (seconds to drain on SIGTERM,
default 25: keep it below ``TimeoutStopSec``), ``PAR_READY_TIMEOUT`` (seconds
for the surfaces to answer, default 90: keep it below ``TimeoutStartSec``),
and from systemd ``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``WATCHDOG_PID``.
``<package_root>/.env`` fills in keys not already set.

Behaviour
---------
``package_root`` and ``package_root/src`` go first on ``sys.path``; the
entrypoint module is imported at start.  REST_PORT serves ``GET /health``
(503 ``{"ok": false}`` until every surface answers, with ``"surfaces"`` once
they were probed; then 200 ``{"ok": true, "surfaces": {"rest": true, ...}}``),
``GET /meta`` and ``POST /invoke`` (the handler, sync or async, called with
the JSON body as its context; its result is the JSON answer).  ``READY=1``
and ``STATUS=serving rest=.. a2a=.. ui=..`` are sent once every declared
surface answers a real request; ``WATCHDOG=1`` at half of ``WATCHDOG_USEC``
while they keep answering.  SIGTERM or SIGINT: ``STOPPING=1``, listeners
closed, in-flight requests drained within ``PAR_STOP_TIMEOUT``, exit 0.

Exit statuses (``exitcodes.py``; ``PERMANENT`` is what PAR passes as
``RestartPreventExitStatus=``): 0 stopped cleanly, 2 bad spec or environment,
3 import error, 4 bad entry, 5 surface failed.  Each failure is one stderr
line naming the reference, the module and the error.
"""

from .exitcodes import (
    EXIT_BAD_ENTRY,
    EXIT_BAD_SPEC,
    EXIT_IMPORT_ERROR,
    EXIT_OK,
    EXIT_SURFACE_FAILED,
    PERMANENT,
)

__all__ = [
    "EXIT_BAD_ENTRY",
    "EXIT_BAD_SPEC",
    "EXIT_IMPORT_ERROR",
    "EXIT_OK",
    "EXIT_SURFACE_FAILED",
    "PERMANENT",
]
