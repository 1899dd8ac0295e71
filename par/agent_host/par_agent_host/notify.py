"""sd_notify over the NOTIFY_SOCKET datagram socket, stdlib only.

Without NOTIFY_SOCKET (run by hand, or by a test without one) every call is a
no-op.  A send failure is reported once on stderr and never raised: a host that
cannot reach systemd still serves, and systemd's start timeout reports it.

The host reads NOTIFY_SOCKET and WATCHDOG_* once and removes them from the
environment before importing the agent, so agent code (or a library it uses)
cannot send READY=1 before the surfaces answer.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from . import log


def _address(raw: str) -> str:
    # '@name' is Linux's abstract namespace, spelled with a leading NUL on the wire.
    return "\0" + raw[1:] if raw.startswith("@") else raw


class Notifier:
    """Sends states to the NOTIFY_SOCKET found in `environ` when it was built."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.socket_path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET") or None
        self._warned = False  # one stderr line per process, not one per watchdog ping

    def __call__(self, *states: str) -> bool:
        """Send `states` (e.g. "READY=1", "STATUS=...") as one datagram; True when sent."""
        if not self.socket_path or not states:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(_address(self.socket_path))
                sock.sendall("\n".join(states).encode())
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.error(f"sd_notify to {self.socket_path} failed: {exc}")
            return False


NOTIFY_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked.

    Like sd_watchdog_enabled(3): WATCHDOG_PID, when set, must be this process.
    """
    environ = os.environ if environ is None else environ
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000
