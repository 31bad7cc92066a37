"""The one exception the client raises, and the job states it waits for."""

from __future__ import annotations

from typing import Any

FINAL_STATES = frozenset({"completed", "failed", "cancelled", "rejected"})


class CylindriaError(Exception):
    """An error answer of the API, or a service that could not be reached.

    `status` is the HTTP status (0 when no answer came), `code` the API's stable error
    code (`job_not_found`, `unauthorized`, ...; `unreachable` when the service did not
    answer, `timeout` when a wait ran out), `message` its sentence saying what to do,
    and `body` the whole JSON answer (empty when there was none).
    """

    def __init__(self, status: int, code: str, message: str,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.body = body or {}

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"CylindriaError({self.status}, {self.code!r}, {self.message!r})"
