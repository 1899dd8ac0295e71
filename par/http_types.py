"""What the API's transport (par.http_server) and its routes (par.api) exchange: a
decoded request, the answer, the endpoint a request line resolves to, and the one
error envelope."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from par.errors import ParError


@dataclass(frozen=True)
class Request:
    """One decoded request, as an endpoint sees it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    local: bool
    params: tuple[str, ...] = ()  # path parameters, set by the resolver's endpoint
    max_json_depth: int = 32  # set by the resolver's endpoint (listen.max_json_depth)


@dataclass(frozen=True)
class Response:
    """What goes back: a JSON-able body (dict) or text (metrics)."""

    status: int
    body: dict | str
    headers: tuple[tuple[str, str], ...] = ()


class MethodNotAllowed(ParError):
    """405, carrying the methods the path accepts (for the Allow header)."""

    def __init__(self, allowed: str) -> None:
        super().__init__("method_not_allowed", f"method not allowed here; use {allowed}", None, 405)
        self.allowed = allowed


class Unauthorized(ParError):
    """401 on TCP: no or a wrong bearer token."""

    def __init__(self) -> None:
        message = "a valid Authorization: Bearer token is required"
        super().__init__("unauthorized", message, None, 401)


def error_response(err: ParError) -> Response:
    """The one error envelope, `{"error": {"code", "message", "field"}}`, with err's status."""
    headers: tuple[tuple[str, str], ...] = ()
    if isinstance(err, Unauthorized):
        headers = (("WWW-Authenticate", 'Bearer realm="par"'),)
    elif isinstance(err, MethodNotAllowed):
        headers = (("Allow", err.allowed),)
    return Response(err.status, {"error": err.to_dict()}, headers)


@dataclass(frozen=True)
class Endpoint:
    """What a request line resolved to: whether it takes a body, and what answers it."""

    answer: Callable[[Request], Response]
    needs_body: bool = False


# (method, raw path) -> Endpoint; raises ParError (404, 405 as MethodNotAllowed, 400).
Resolver = Callable[[str, str], Endpoint]
