"""A threaded stdlib TCP server that stops at once and drains: the base of the host's HTTP surfaces.

`socketserver`'s own `shutdown()` waits for the accept loop's next poll (0.5 s
by default), and every agent stop or redeploy would pay it.  Here the accept
loop also watches a pipe that `shutdown()` writes to, so it ends at once and
needs no polling while idle.
"""

from __future__ import annotations

import os
import selectors
import socket
import socketserver
import threading
from collections.abc import Callable

from .exitcodes import EXIT_SURFACE_FAILED, HostError
from .surfaces import Surface, http_answers, probe_host

LISTEN_BACKLOG = 128  # socketserver's default of 5 refuses connections under a burst


class DrainingServer(socketserver.ThreadingTCPServer):
    """Counts in-flight requests so `drain` can wait for them after the listener closes.

    Request threads are daemons (a stuck request must not keep the process alive
    past the stop timeout); the count, not `block_on_close`, tracks them.
    """

    daemon_threads = True
    allow_reuse_address = True  # a restarted agent binds its port again at once
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int],
                 handler: Callable[..., socketserver.BaseRequestHandler],
                 listener: socket.socket | None = None) -> None:
        """Bind and listen on `address`, or serve `listener` (a listening socket systemd
        passed: par_agent_host.listen_fds) as it is."""
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._inflight = 0
        self._idle = threading.Condition()
        self._stop_requested = False
        self._loop_ended = threading.Event()
        self._wake_read, self._wake_write = os.pipe()
        try:
            super().__init__(address, handler, bind_and_activate=listener is None)
            if listener is not None:
                self.socket.close()  # the unbound one TCPServer made
                self.socket = listener
                self.server_address = listener.getsockname()
        except BaseException:
            self.server_close()  # TCPServer may have called it already: it closes once
            raise

    def serve_forever(self, poll_interval: float | None = None) -> None:
        """Accept until `shutdown()`; no timeout: the wake pipe ends the wait."""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_read, selectors.EVENT_READ)
                while not self._stop_requested:
                    for key, _ in selector.select():
                        if key.fileobj is self and not self._stop_requested:
                            # BaseServer's own accept-and-dispatch step (not in typeshed)
                            self._handle_request_noblock()  # type: ignore[attr-defined]
        finally:
            self._loop_ended.set()

    def shutdown(self) -> None:
        """End `serve_forever` (running or about to run in another thread) and wait for it."""
        self._stop_requested = True
        os.write(self._wake_write, b"x")
        self._loop_ended.wait()

    def server_close(self) -> None:
        super().server_close()
        # once: a second close could hit an fd number reused meanwhile
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                os.close(fd)
        self._wake_read = self._wake_write = -1

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


class HttpSurface(Surface):
    """Serves `handler` on a DrainingServer in a thread; probed with GET `probe_path`."""

    def __init__(
        self,
        name: str,
        bind_address: str,
        port: int,
        handler: Callable[..., socketserver.BaseRequestHandler],
        probe_path: str,
        listener: socket.socket | None = None,
    ) -> None:
        """`listener`: the port's listening socket when systemd holds it, else None (bind)."""
        self.name = name
        self.port = port
        self._bind = bind_address
        self._handler = handler
        self._probe_path = probe_path
        self._listener = listener
        self._server: DrainingServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        try:
            self._server = DrainingServer((self._bind, self.port), self._handler, self._listener)
        except OSError as exc:
            reason = exc.strerror or exc
            raise HostError(
                EXIT_SURFACE_FAILED,
                f"{self.name} surface cannot listen on {self._bind}:{self.port}: {reason}",
            ) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"par-{self.name}", daemon=True
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
            self._server.shutdown()  # the accept loop ends at once
        # Release the port: new connections are refused, or, when systemd holds the
        # socket, wait in its backlog for the next process (closing our copy only).
        self._server.server_close()
        self._server.drain(timeout)
