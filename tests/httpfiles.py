"""A local HTTP file server for tests (packages, package indexes), on 127.0.0.1."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _FilesHandler(SimpleHTTPRequestHandler):
    """Serves a folder; `/slow/<file>` answers only after `slow_s`; anything else missing is 404."""

    slow_s = 0.0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.startswith("/slow/"):
            time.sleep(self.slow_s)
            self.path = self.path[len("/slow"):]
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_files(folder: Path, slow_s: float = 0.0) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 (pard shares the network); yields the base URL."""
    handler = type("Handler", (_FilesHandler,), {"slow_s": slow_s})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
