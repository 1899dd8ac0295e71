"""The UI surface: the package's static folder served on UI_PORT (stdlib http.server).

Imported only by agents that declare `ui.path`: http.server is the costliest
import of the host.
"""

from __future__ import annotations

import functools
import socket
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .exitcodes import EXIT_BAD_ENTRY, HostError
from .httpserver import HttpSurface


class _UiHandler(SimpleHTTPRequestHandler):
    server_version = "par-agent-host"

    def send_head(self):  # as http.server: a file object, or None once answered
        # No dotfile or dot-folder (.env, .git, .pixell): 404 as if absent.
        path = unquote(urlsplit(self.path).path)
        if any(part.startswith(".") for part in path.replace("\\", "/").split("/")):
            self.send_error(404, "File not found")
            return None
        return super().send_head()

    def log_request(self, code="-", size="-") -> None:
        pass


def ui_folder(package_root: Path, ui_path: str) -> Path:
    """The UI folder, checked to be inside the package and to hold index.html."""
    root = package_root.resolve()
    folder = (root / ui_path).resolve()
    if folder != root and root not in folder.parents:
        raise HostError(EXIT_BAD_ENTRY, f"ui path {ui_path!r} points outside the package")
    if folder == root:
        raise HostError(EXIT_BAD_ENTRY, f"ui path {ui_path!r} is the package root (it would "
                        "serve .env and the sources); use a subfolder")
    if not (folder / "index.html").is_file():
        raise HostError(EXIT_BAD_ENTRY, f"ui path {ui_path!r} has no index.html ({folder})")
    return folder


def surface(folder: Path, bind_address: str, port: int,
            listener: socket.socket | None = None) -> HttpSurface:
    """The UI surface; `listener`: UI_PORT's socket when systemd passed it."""
    handler = functools.partial(_UiHandler, directory=str(folder))
    return HttpSurface("ui", bind_address, port, handler, probe_path="/", listener=listener)
