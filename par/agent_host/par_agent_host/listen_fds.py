"""The listening sockets systemd passes the host (socket activation, sd_listen_fds(3)).

pard runs each agent behind a socket unit `par-agent@<id>.socket` that holds the
REST (and UI) listening sockets, so the port is never free while the agent
restarts: no other agent can bind it meanwhile, and connections wait in the
backlog.  systemd passes the sockets as fds 3, 4, ... with LISTEN_FDS and
LISTEN_PID set; the host matches each to a surface by the port it is bound to
(one socket unit gives all its fds one FileDescriptorName, so the port is the
reliable name).  Without them (an old unit, the host run by hand or in a test)
the surfaces bind their ports themselves, as before.

The variables are read once and removed from the environment, so the agent's own
code and its children never mistake the sockets for theirs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from . import log

LISTEN_KEYS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
SD_LISTEN_FDS_START = 3


def take(environ: MutableMapping[str, str] | None = None) -> dict[int, socket.socket]:
    """The passed listening TCP sockets by local port; removes LISTEN_* from `environ`.

    Passed fds that are meant for another process (LISTEN_PID differs) or are not TCP
    listening sockets are left alone (and logged)."""
    env = os.environ if environ is None else environ
    raw_pid, raw_fds = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    for key in LISTEN_KEYS:
        env.pop(key, None)
    if not raw_fds:
        return {}
    if not raw_pid.isdigit() or int(raw_pid) != os.getpid() or not raw_fds.isdigit():
        return {}  # sd_listen_fds: the fds are another process's
    out: dict[int, socket.socket] = {}
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(raw_fds)):
        try:
            sock = socket.socket(fileno=fd)  # family and type read from the fd
        except OSError as exc:
            log.error(f"ignoring passed fd {fd}: {exc}")
            continue
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET,
                                                                  socket.AF_INET6):
            log.error(f"ignoring passed fd {fd}: not a TCP socket")
            sock.detach()
            continue
        # not inherited by the agent's subprocesses (systemd passes them inheritable)
        sock.set_inheritable(False)
        out[sock.getsockname()[1]] = sock
    return out
