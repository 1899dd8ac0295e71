"""How much of pard the API's clients may hold: connection caps per listener and per
client address, and the deadline each request must arrive whole by (attack 5 in
docs/security.md).  par.http_server counts connections in and out and a reaper
thread cuts the late ones."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from email.message import Message


@dataclass(frozen=True)
class ConnectionLimits:
    """How much of pard one listener's clients may hold."""

    max_connections: int = 256
    max_per_address: int | None = None  # TCP: per client address; None: no such cap
    request_deadline_s: float = 15.0
    max_request_line: int = 8192  # bytes, method and target included (414 beyond)
    max_header_bytes: int = 32768  # all header lines together (431 beyond)


def oversized(request_line: bytes, headers: Message,
              limits: ConnectionLimits) -> tuple[int, str] | None:
    """(status, message) for a request line or headers over their caps, else None."""
    if len(request_line) > limits.max_request_line:
        return 414, f"the request line is longer than {limits.max_request_line} bytes"
    size = sum(len(k) + len(v) + 4 for k, v in headers.items())
    if size > limits.max_header_bytes:
        return 431, f"the headers are larger than {limits.max_header_bytes} bytes"
    return None


UNIX_DEFAULTS = ConnectionLimits(max_connections=64)
TCP_DEFAULTS = ConnectionLimits(max_per_address=16)


class Connections:
    """The connections a server holds: counted per client address, each with the
    deadline its current request must arrive by (None while an answer is made)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._per_address: dict[str, int] = {}
        self._deadlines: dict[socket.socket, float | None] = {}

    def admit(self, conn: socket.socket, address: str) -> bool:
        """Count `conn` in, or False when a cap is reached (the caller closes it)."""
        with self._lock:
            if len(self._deadlines) >= self.limits.max_connections:
                return False
            held = self._per_address.get(address, 0)
            if self.limits.max_per_address is not None and held >= self.limits.max_per_address:
                return False
            self._per_address[address] = held + 1
            self._deadlines[conn] = None
            return True

    def release(self, conn: socket.socket, address: str) -> None:
        """Count `conn` out (its handler is done)."""
        with self._lock:
            if conn not in self._deadlines:
                return  # never admitted
            del self._deadlines[conn]
            left = self._per_address.get(address, 1) - 1
            if left:
                self._per_address[address] = left
            else:
                self._per_address.pop(address, None)

    def arm(self, conn: socket.socket) -> None:
        """The next request must have arrived whole within the deadline."""
        with self._lock:
            if conn in self._deadlines:
                self._deadlines[conn] = time.monotonic() + self.limits.request_deadline_s

    def disarm(self, conn: socket.socket) -> None:
        """The request has arrived: making its answer may take as long as it takes."""
        with self._lock:
            if conn in self._deadlines:
                self._deadlines[conn] = None

    def overdue(self) -> list[socket.socket]:
        """The connections whose request is late."""
        now = time.monotonic()
        with self._lock:
            return [c for c, d in self._deadlines.items() if d is not None and d <= now]

    def cut_overdue(self) -> None:
        """Shut down the late connections: their handlers' blocked reads return at once."""
        for conn in self.overdue():
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
