"""A local HTTP file server for tests (packages, package indexes), on loopback."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _FilesHandler(SimpleHTTPRequestHandler):
    """Serves a folder; `/slow/<file>` answers only after `slow_s`; `/to/<url>` redirects
    (302) to `<url>`; anything else missing is 404.  Each request's path goes to `seen`."""

    slow_s = 0.0
    seen: list[str] | None = None

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.seen is not None:
            self.seen.append(self.path)
        if self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/to/"):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/slow/"):
            time.sleep(self.slow_s)
            self.path = self.path[len("/slow"):]
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_files(folder: Path, slow_s: float = 0.0, host: str = "127.0.0.1",
                seen: list[str] | None = None) -> Iterator[str]:
    """Serve `folder` on `host` (pard shares the network); yields the base URL.
    Request paths are appended to `seen` when given."""
    handler = type("Handler", (_FilesHandler,), {"slow_s": slow_s, "seen": seen})
    server = ThreadingHTTPServer((host, 0), partial(handler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
