"""What every surface (REST, A2A, UI) offers the host, the shared health state and the probes.

A surface is "up" only when a real client request gets an answer from outside
its own code path: an HTTP GET for REST and UI, an HTTP/2 SETTINGS exchange
for gRPC (a bound but not started gRPC server accepts TCP connections yet never
answers, so a TCP connect alone would report it ready too early).
"""

from __future__ import annotations

import socket
import threading
from abc import ABC, abstractmethod

PROBE_TIMEOUT_S = 1.0
MAX_PROBE_BYTES = 1 << 20  # read at most this much of a probe's answer
# Client connection preface plus an empty SETTINGS frame (RFC 9113, section 3.4).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 0x4


def probe_host(bind_address: str) -> str:
    """Where to connect to reach a server bound to `bind_address`."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind_address, bind_address)


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """A connected TCP socket to a literal address (what probe_host returns).

    Not socket.create_connection: its getaddrinfo encodes the host with the idna
    codec, an import every agent's start would pay for a numeric address."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if host.startswith("127.") and host != "127.0.0.1":
            # An agent on a loopback address of its own (agents.isolate_loopback) accepts
            # only that source: the kernel would pick 127.0.0.1, which its unit drops.
            sock.bind((host, 0))
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def http_answers(host: str, port: int, path: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when GET `path` returns 200.

    A plain HTTP/1.0 exchange on a socket: `http.client` would cost every agent's
    start its import, and the probe needs only the status line."""
    request = (f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n"
               "User-Agent: par-agent-host-probe\r\n\r\n").encode()
    try:
        with _connect(host, port, timeout) as sock:
            sock.sendall(request)
            head, total = b"", 0
            # read to the end (HTTP/1.0: the server closes), so it never writes to a closed
            # socket; the status line is in the first bytes
            while total < MAX_PROBE_BYTES:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                if len(head) < 1024:
                    head += chunk[:1024]
                total += len(chunk)
    except OSError:
        return False
    status = head.split(b"\r\n", 1)[0].split()
    return len(status) >= 2 and status[0].startswith(b"HTTP/1.") and status[1] == b"200"


def h2_answers(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when the port speaks HTTP/2: our preface is answered with a SETTINGS frame."""
    try:
        with _connect(host, port, timeout) as sock:
            sock.sendall(_H2_PREFACE)
            header = b""
            while len(header) < 9:
                chunk = sock.recv(9 - len(header))
                if not chunk:
                    return False
                header += chunk
            return header[3] == _H2_SETTINGS
    except OSError:
        return False


class Surface(ABC):
    """One listening surface. `start` binds (raising HostError), `stop` drains within a timeout."""

    name: str
    port: int

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def probe(self) -> bool:
        """Does the surface answer a client right now?"""

    @abstractmethod
    def alive(self) -> bool:
        """False once the surface's serving thread has ended without being asked to."""

    @abstractmethod
    def stop(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish within `timeout`, release the port."""


class Health:
    """What /health reports; written by the host's main loop, read by request threads."""

    def __init__(self, declared: tuple[str, ...]) -> None:
        self.declared = declared
        self.ready = False
        self.surfaces: dict[str, bool] = {}
        self._lock = threading.Lock()

    def update(self, surfaces: dict[str, bool]) -> bool:
        """Record probe results; ready when every declared surface answered. Returns ready."""
        with self._lock:
            self.surfaces = dict(surfaces)
            self.ready = all(surfaces.get(name, False) for name in self.declared)
            return self.ready

    def report(self) -> tuple[int, dict]:
        """(HTTP status, body) for GET /health."""
        with self._lock:
            if not self.ready:
                body: dict = {"ok": False}
                if self.surfaces:
                    body["surfaces"] = dict(self.surfaces)
                return 503, body
            return 200, {"ok": True, "surfaces": dict(self.surfaces)}
