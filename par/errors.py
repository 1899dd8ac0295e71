"""The one error type PAR raises for anything a caller can act on.

Every layer raises `ParError` with a stable `code`; the API turns it into
`{"error": {"code", "message", "field"}}` with `status`, and parctl turns it into
a message and an exit code.  Anything else escaping is a bug (HTTP 500).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParError(Exception):
    """An error a person can act on.

    code: stable machine-readable name (e.g. ``bad_request``, ``archive_symlink``).
    message: one sentence for a person, naming what is wrong and, where useful, what to do.
    field: the request field, manifest key or archive entry the error is about.
    status: the HTTP status the API answers with.
    """

    code: str
    message: str
    field: str | None = None
    status: int = 400

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict:
        """The JSON error envelope's inner object."""
        return {"code": self.code, "message": self.message, "field": self.field}


class NotFound(ParError):
    """A deployment, agent or venv that does not exist (HTTP 404)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__("not_found", message, field, 404)
