"""The host's own REST routes, independent of the server that serves them.

`GET /health`, `GET /meta` and `POST /invoke` are served at `/` and, when
BASE_PATH is set, also below it (a multiplexing proxy may or may not strip it).
The stdlib server (`stdlib_rest.py`) and the FastAPI app (`rest.py`) both use
these functions, so the two answer the same.
"""

from __future__ import annotations

import sys
from collections import namedtuple
from collections.abc import Awaitable, Callable

from . import log

ROUTES = ("/health", "/meta", "/invoke")


class HostApi(namedtuple("_HostApi", "spec env health handler")):
    """Everything the host routes answer from: the spec (AgentSpec), the environment
    (HostEnv), health (Health) and the agent's handler (a callable)."""

    __slots__ = ()

    def prefixes(self) -> tuple[str, ...]:
        return ("", self.env.base_path) if self.env.base_path else ("",)

    def route(self, path: str) -> str | None:
        """The host route `path` addresses (with or without BASE_PATH), or None."""
        path = path.split("?", 1)[0]
        for prefix in self.prefixes():
            if path.startswith(prefix) and path[len(prefix) :] in ROUTES:
                return path[len(prefix) :]
        return None

    def meta(self) -> dict:
        ports = self.env.ports
        return {
            "name": self.spec.name,
            "version": self.spec.version,
            "agentAppId": self.env.agent_app_id,
            "deploymentId": self.env.deployment_id,
            "orgId": self.env.org_id,
            "surfaces": list(self.spec.surfaces),
            "ports": {
                "rest": ports.rest,
                "a2a": ports.a2a if self.spec.a2a_service else None,
                "ui": ports.ui if self.spec.ui_path else None,
            },
            "basePath": self.env.base_path or "/",
            "python": sys.version.split()[0],
        }


def invoke_error(exc: BaseException) -> dict:
    """Body of a 500 from /invoke; the traceback goes to stderr (the journal), not the client."""
    log.exception(exc)
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def call_handler_sync(handler: Callable[..., object], context: object) -> object:
    """Call a sync or async handler from a plain thread (the stdlib server's request thread)."""
    result = handler(context)
    if isinstance(result, Awaitable):
        # Each request thread has no loop of its own: run the coroutine to completion here.
        # (asyncio is imported here: a sync agent's start need not pay for it.)
        import asyncio

        result = asyncio.run(_await(result))
    return result


async def _await(awaitable: Awaitable) -> object:
    return await awaitable
