"""A stdlib threaded HTTP server that can drain: the base of the stdlib REST and UI surfaces."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .exitcodes import EXIT_SURFACE_FAILED, HostError
from .surfaces import Surface, http_answers, probe_host

POLL_INTERVAL_S = 0.1  # how quickly serve_forever notices shutdown()


class DrainingHTTPServer(ThreadingHTTPServer):
    """Counts in-flight requests so `drain` can wait for them after the listener closes.

    Request threads are daemons (a stuck request must not keep the process alive
    past the stop timeout); the count, not `block_on_close`, tracks them.
    """

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: Callable[..., BaseHTTPRequestHandler]
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._inflight = 0
        self._idle = threading.Condition()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the FQDN, which can stall on DNS at boot.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address) -> None:
        # Counted here, in the accept loop, so drain() cannot miss a just-accepted request.
        with self._idle:
            self._inflight += 1
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until no request is in flight; False when `timeout` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)


class QuietHandler(BaseHTTPRequestHandler):
    """No access log (the journal keeps the agent's own lines); errors still go to stderr."""

    def log_request(self, code="-", size="-") -> None:
        pass


class HttpSurface(Surface):
    """Serves `handler` on a DrainingHTTPServer in a thread; probed with GET `probe_path`."""

    def __init__(
        self,
        name: str,
        bind_address: str,
        port: int,
        handler: Callable[..., BaseHTTPRequestHandler],
        probe_path: str,
    ) -> None:
        self.name = name
        self.port = port
        self._bind = bind_address
        self._handler = handler
        self._probe_path = probe_path
        self._server: DrainingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        try:
            self._server = DrainingHTTPServer((self._bind, self.port), self._handler)
        except OSError as exc:
            reason = exc.strerror or exc
            raise HostError(
                EXIT_SURFACE_FAILED,
                f"{self.name} surface cannot listen on {self._bind}:{self.port}: {reason}",
            ) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL_S},
            name=f"par-{self.name}",
            daemon=True,
        )
        self._thread.start()

    def probe(self) -> bool:
        return http_answers(probe_host(self._bind), self.port, self._probe_path)

    def alive(self) -> bool:
        return self._stopping or (self._thread is not None and self._thread.is_alive())

    def stop(self, timeout: float) -> None:
        self._stopping = True
        if self._server is None:
            return
        if self._thread is not None and self._thread.is_alive():
            self._server.shutdown()  # stop the accept loop (blocks forever if it never ran)
        self._server.server_close()  # release the port: new connections are refused
        self._server.drain(timeout)
