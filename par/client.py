"""The client side of `pard`'s HTTP API, spoken over the local unix socket.

`parctl` is this module's only user.  Each method is one endpoint of
docs/api.md and returns the decoded JSON answer unchanged (so `parctl --json`
prints exactly what the API said).  Two errors come out of it:

- `ApiError`: pard answered with its error envelope (or an unexpected status);
  it carries the HTTP status, the stable `code`, the `message` and the `field`.
- `DaemonUnreachable`: nothing answers on the socket (missing, refused, no
  permission, timed out); its message says what to do.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from par.errors import ParError

DEFAULT_SOCKET = Path("/run/par/par.sock")
DEFAULT_TIMEOUT_S = 30.0
# Building a venv or downloading uv can take minutes (installer timeout: 300 s).
LONG_TIMEOUT_S = 900.0
# A waiting GET /deployments/{id} is given this long beyond its wait to answer.
WAIT_MARGIN_S = 10.0
START_HINT = "start it with `systemctl start par`"


class ApiError(ParError):
    """An error answer from pard: `status` is the HTTP status, `code` the envelope's code."""


class DaemonUnreachable(ParError):
    """pard does not answer on its socket; the message names the socket and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__("daemon_unreachable", message, None, 503)


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP/1.1 connection whose transport is an AF_UNIX stream socket."""

    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        # The host only fills the Host header; pard ignores it on the socket.
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    """pard's API over its unix socket; one short connection per call."""

    def __init__(self, socket_path: Path = DEFAULT_SOCKET,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    # -- deployments -------------------------------------------------------

    def deploy(self, body: dict) -> dict:
        """POST /deploy; `Idempotency-Key` is the deploymentId, so a retry never deploys twice."""
        headers = {}
        if isinstance(body.get("deploymentId"), str):
            headers["Idempotency-Key"] = body["deploymentId"]
        return self._json("POST", "/deploy", body=body, headers=headers)

    def deployments(self, agent_app_id: str | None = None, status: str | None = None) -> dict:
        """GET /deployments: `{"deployments": [record, ...]}`, newest first."""
        query = {"agentAppId": agent_app_id, "status": status}
        return self._json("GET", "/deployments", query=query)

    def deployment(self, deployment_id: str, wait: float | None = None,
                   since: float | None = None) -> dict:
        """GET /deployments/{id}: one deployment record; with `wait`, once its `updatedAt`
        differs from `since` (the one the caller holds; default: as it is now), or after
        `wait` seconds (at most 60)."""
        if not wait:
            return self._json("GET", f"/deployments/{_seg(deployment_id)}")
        query = {"wait": f"{wait:g}", "since": repr(since) if since is not None else None}
        return self._json("GET", f"/deployments/{_seg(deployment_id)}", query=query,
                          timeout=max(self.timeout, wait + WAIT_MARGIN_S))

    def health(self, deployment_id: str) -> dict:
        """GET /deployments/{id}/health: `{status, healthy, message, details, surfaces, ports}`."""
        return self._json("GET", f"/deployments/{_seg(deployment_id)}/health")

    def events(self, deployment_id: str, limit: int | None = None) -> dict:
        """GET /deployments/{id}/events: `{"events": [...]}`, oldest first."""
        return self._json("GET", f"/deployments/{_seg(deployment_id)}/events",
                          query={"limit": limit})

    def action(self, deployment_id: str, name: str) -> dict:
        """POST /deployments/{id}/stop|start|restart: the updated record."""
        if name not in ("stop", "start", "restart"):
            raise ValueError(f"unknown action {name!r}")
        return self._json("POST", f"/deployments/{_seg(deployment_id)}/{name}")

    def set_env(self, deployment_id: str, values: dict[str, str], unset: list[str],
                restart: bool = True) -> dict:
        """POST /deployments/{id}/env: with `restart`, the accepted replacement
        deployment (follow it like a deploy); without, the updated current record."""
        return self._json("POST", f"/deployments/{_seg(deployment_id)}/env",
                          body={"set": values, "unset": unset, "restart": restart})

    def env_names(self, deployment_id: str) -> dict:
        """GET /deployments/{id}/env: the names of the deployment's own variables."""
        return self._json("GET", f"/deployments/{_seg(deployment_id)}/env")

    def delete(self, deployment_id: str, purge: bool = False) -> dict:
        """DELETE /deployments/{id}[?purge=1]: `{"deleted": id, "purged": [paths]}`."""
        query = {"purge": "1" if purge else None}
        return self._json("DELETE", f"/deployments/{_seg(deployment_id)}", query=query)

    # -- host --------------------------------------------------------------

    def agents(self, include_all: bool = False) -> dict:
        """GET /agents: the current deployment of every agent, with its live status, unit
        and resources; `include_all`: agents without a current deployment too."""
        return self._json("GET", "/agents", query={"all": "1" if include_all else None})

    def daemon_health(self) -> dict:
        """GET /health: pard's own state (version, agents by status, disk, installer)."""
        return self._json("GET", "/health")

    def metrics(self) -> str:
        """GET /metrics: Prometheus text."""
        status, _, data = self._request("GET", "/metrics")
        if status >= 400:
            raise _api_error(status, data)
        return data.decode("utf-8", errors="replace")

    def venvs(self) -> dict:
        """GET /venvs: `{"venvs": [{name, sizeBytes, lastUsed, inUseBy}]}`."""
        return self._json("GET", "/venvs")

    def prune_venvs(self) -> dict:
        """POST /venvs/prune: `{"evicted": [name, ...]}`."""
        return self._json("POST", "/venvs/prune", timeout=LONG_TIMEOUT_S)

    def prewarm(self, requirements: str) -> dict:
        """POST /venvs/prewarm: fill the shared cache for a requirements text; `{"seconds"}`."""
        return self._json("POST", "/venvs/prewarm", body={"requirements": requirements},
                          timeout=LONG_TIMEOUT_S)

    def install_uv(self, version: str | None = None) -> dict:
        """POST /installer/install-uv: `{"path", "version"}` of the uv binary pard now uses
        (`version`: that uv release, default installer.uv_version)."""
        return self._json("POST", "/installer/install-uv",
                          body={"version": version} if version else None,
                          timeout=LONG_TIMEOUT_S)

    # -- transport ---------------------------------------------------------

    def _json(
        self,
        method: str,
        path: str,
        *,
        body: dict | None = None,
        query: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> dict:
        status, _, data = self._request(method, path, body=body, query=query, headers=headers,
                                        timeout=timeout)
        if status >= 400:
            raise _api_error(status, data)
        try:
            answer = json.loads(data)
        except ValueError:
            raise ParError("bad_response", f"pard answered {method} {path} with something "
                           f"that is not JSON: {_preview(data)}", None, 502) from None
        if not isinstance(answer, dict):
            raise ParError("bad_response", f"pard answered {method} {path} with a JSON "
                           f"{type(answer).__name__}, not an object", None, 502)
        return answer

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: dict | None = None,
        query: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request; return (status, headers, body).  Transport failures become
        `DaemonUnreachable`; HTTP statuses are left to the caller."""
        params = {k: v for k, v in (query or {}).items() if v is not None}
        target = path + ("?" + urlencode(params) if params else "")
        send_headers = {"Accept": "application/json", **(headers or {})}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            send_headers["Content-Type"] = "application/json"
        conn = UnixHTTPConnection(self.socket_path, max(timeout or 0, self.timeout))
        try:
            conn.request(method, target, body=payload, headers=send_headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        except FileNotFoundError:
            raise DaemonUnreachable(
                f"pard is not running (no socket at {self.socket_path}): {START_HINT}") from None
        except ConnectionRefusedError:
            raise DaemonUnreachable(
                f"pard is not running ({self.socket_path} refuses connections): {START_HINT}"
            ) from None
        except PermissionError:
            # The socket and its folder are root only: starting par would not help, and
            # there is no group to join (the API can start code as root: it is root's).
            raise DaemonUnreachable(
                f"permission denied on {self.socket_path}: pard's socket is root-only; "
                "run parctl as root (sudo parctl ...)") from None
        except TimeoutError:
            raise DaemonUnreachable(
                f"pard did not answer {method} {path} within {conn.timeout:g} s "
                f"(socket {self.socket_path}): check `systemctl status par`") from None
        except (http.client.HTTPException, ConnectionError) as exc:
            raise DaemonUnreachable(
                f"pard closed the connection during {method} {path} ({exc.__class__.__name__}): "
                "check `systemctl status par`") from None
        except OSError as exc:
            # e.g. the path is too long for AF_UNIX or is not a socket
            raise DaemonUnreachable(
                f"cannot connect to pard at {self.socket_path}: {exc.strerror or exc}; "
                f"if pard is not running, {START_HINT}") from None
        finally:
            conn.close()


def _seg(value: str) -> str:
    """One path segment, quoted so an id can never address another path."""
    return quote(str(value), safe="")


def _preview(data: bytes, limit: int = 200) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _api_error(status: int, data: bytes) -> ApiError:
    """The error envelope `{"error": {code, message, field}}` as an ApiError; anything
    else (a proxy's HTML, an empty body) still becomes one, with code `http_<status>`."""
    try:
        err = json.loads(data)["error"]
        code, message = err["code"], err["message"]
        if isinstance(code, str) and isinstance(message, str):
            field = err.get("field")
            return ApiError(code, message, field if isinstance(field, str) else None, status)
    except (ValueError, KeyError, TypeError):
        pass
    reason = http.client.responses.get(status, "error")
    detail = _preview(data)
    return ApiError(f"http_{status}", f"pard answered HTTP {status} {reason}"
                    + (f": {detail}" if detail else ""), None, status)
