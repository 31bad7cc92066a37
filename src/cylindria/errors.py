"""Domain errors and the one middleware that turns every error into JSON."""

from __future__ import annotations

import logging
from typing import Any

import ujson
from aiohttp import web

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with an HTTP status, a stable code and a sentence saying what to do."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, extra: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra or {}
        self.headers = headers


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class InvalidWorkflow(ApiError):
    status = 422
    code = "invalid_workflow"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class JobNotFound(ApiError):
    status = 404
    code = "job_not_found"


class JobIdConflict(ApiError):
    status = 409
    code = "job_id_conflict"


class UnknownGpu(ApiError):
    status = 400
    code = "unknown_gpu"


class BackendError(ApiError):
    """ComfyUI answered, but not in a way Cylindria understands."""

    status = 502
    code = "backend_error"


class BackendUnavailable(BackendError):
    status = 502
    code = "backend_unavailable"


class BackendTimeout(BackendError):
    status = 504
    code = "backend_timeout"


def json_response(data: Any, *, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=ujson.dumps)


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


_HTTP_HINTS = {
    404: ("not_found", "No such endpoint. See the README for the API: GET /serverstatus, "
                       "PUT /startjob/{job_id}/, GET /jobstatus/{job_id}/."),
    405: ("method_not_allowed", "This endpoint does not take that method."),
    413: ("payload_too_large", "The request body is too large."),
}


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response(error_body(exc.code, exc.message, **exc.extra),
                             status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        code, message = _HTTP_HINTS.get(exc.status, ("http_error", exc.reason))
        if exc.status == 405:
            allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
            message = f"{request.method} is not allowed here; use {allowed}."
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return json_response(error_body(code, message), status=exc.status, headers=headers)
    except Exception:
        # Unexpected: log it with the traceback, answer JSON rather than a bare 500.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return json_response(
            error_body("internal_error", "Cylindria hit an unexpected error; it is logged. "
                                         "Retry, and report it if it persists."),
            status=500)
