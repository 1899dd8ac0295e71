"""The host's exit statuses, in one place.

PAR passes `PERMANENT` to the unit as `RestartPreventExitStatus=`: restarting
an agent that cannot import or whose manifest points at nothing only burns the
start limit.  `EXIT_SURFACE_FAILED` stays restartable (a port briefly taken,
a dependency of `mount(app)` not up yet).
"""

from __future__ import annotations

# Clean stop (SIGTERM/SIGINT), surfaces shut down.
EXIT_OK = 0
# The spec file (PAR_AGENT_SPEC) or the environment is missing or malformed.
EXIT_BAD_SPEC = 2
# The entrypoint, rest, or a2a module raised while being imported.
EXIT_IMPORT_ERROR = 3
# A `module:function` reference names nothing callable, a surface factory
# returned the wrong kind of object, or the UI folder has no index.html.
EXIT_BAD_ENTRY = 4
# A surface could not listen, its factory raised, it never answered within the
# ready timeout, or it died while serving.
EXIT_SURFACE_FAILED = 5

PERMANENT: tuple[int, ...] = (EXIT_BAD_SPEC, EXIT_IMPORT_ERROR, EXIT_BAD_ENTRY)

# What each means, in words.  systemd names exit statuses 1-7 after the LSB
# codes (3 reads "NOTIMPLEMENTED"): the host says what it means in its STATUS=
# line instead, which `systemctl status` shows, and pard in its error messages.
MEANING: dict[int, str] = {
    EXIT_BAD_SPEC: "the agent spec or environment is malformed",
    EXIT_IMPORT_ERROR: "the agent's code failed to import",
    EXIT_BAD_ENTRY: "an entry point names nothing callable, or the UI folder has no index.html",
    EXIT_SURFACE_FAILED: "a surface could not listen or never answered",
}


def describe(code: int) -> str:
    """'<meaning> (exit status N)'."""
    return f"{MEANING.get(code, 'the host failed')} (exit status {code})"


class HostError(Exception):
    """A failure that ends the host: one line for the journal and the exit status."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
