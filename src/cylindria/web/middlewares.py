"""The one middleware that turns every error into JSON and counts every answer, and the
headers every answer carries."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web

from ..errors import ApiError
from ..jsonio import json_response
from .params import close_if_body_unread
from .render import JsonAnswer, error_body

log = logging.getLogger(__name__)

_HTTP_HINTS = {
    404: ("not_found", "No such endpoint. See the README for the API: GET /serverstatus, "
                       "PUT /startjob/{job_id}/, GET /jobstatus/{job_id}/."),
    405: ("method_not_allowed", "This endpoint does not take that method."),
    413: ("payload_too_large", "The request body is too large."),
}


# Told of every answer: route name, method, status, seconds (the metrics count them).
RequestCounter = Callable[[str, str, int, float], None]
Middleware = Callable[[web.Request, Any], Awaitable[web.StreamResponse]]


def make_error_middleware(count: RequestCounter) -> Middleware:
    """Every error as JSON, and every answer counted: one middleware for both, because
    each layer costs every request (the cheapest answers most of all). `count` is bound
    here rather than looked up in the app on each request."""
    clock = time.perf_counter

    @web.middleware
    async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        started = clock()
        try:
            response = await handler(request)
        except ApiError as exc:
            if exc.status >= 500:
                # Method and path (which holds the job id), never headers: they carry
                # the key.
                log.warning("%s %s answered %d %s (job %s): %s", request.method,
                            request.path, exc.status, exc.code,
                            request.match_info.get("job_id", "-"), exc.message)
            response = json_response(error_body(exc), status=exc.status,
                                     headers=exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400 or exc.content_type == "application/json":
                # aiohttp answers with the exception itself.
                answer_headers(request, exc)
                count(request.match_info.route.name or "unknown", request.method,
                      exc.status, clock() - started)
                raise
            code, message = _HTTP_HINTS.get(exc.status, ("http_error", exc.reason))
            if exc.status == 405:
                allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
                message = f"{request.method} is not allowed here; use {allowed}."
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            response = json_response(_error(code, message), status=exc.status,
                                     headers=headers)
        except Exception as exc:
            if _name_too_long(request, exc):
                # Static assets are looked up by the name as given, and one longer than
                # the file system takes names no file.
                response = json_response(_error("not_found", "No such file."), status=404)
            elif _client_left(request, exc):
                # Anyone can open a connection and drop it mid-body: one DEBUG line,
                # never a traceback. Nobody reads this answer, and it is not counted.
                log.debug("%s %s: the client went away (%s)", request.method,
                          request.path, exc)
                return json_response(_error("client_gone", "The connection closed before "
                                            "the request was read."), status=400)
            else:
                # Unexpected: log it with the traceback, answer JSON rather than a bare
                # 500.
                log.exception("unhandled error in %s %s", request.method, request.path)
                response = json_response(_error("internal_error", "Cylindria hit an "
                                                "unexpected error; it is logged. Retry, "
                                                "and report it if it persists."),
                                         status=500)
        if type(response) is JsonAnswer:
            # Made with the headers answer_headers sets (render.JSON_HEADERS); the
            # body check inline, since its call would cost the cheapest answers most.
            if not request.content.is_eof():
                close_if_body_unread(request, response)
        elif not response.prepared:
            answer_headers(request, response)
        # A request whose client went away (cancelled) got no answer: it is not counted.
        count(request.match_info.route.name or "unknown", request.method, response.status,
              clock() - started)
        return response

    return error_middleware


def _name_too_long(request: web.Request, exc: Exception) -> bool:
    return (isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG
            and isinstance(request.match_info.route.resource, web.StaticResource))


def _client_left(request: web.Request, exc: Exception) -> bool:
    # A ConnectionError of an upstream call (aiohttp's client raises them too) while
    # this client is still there is a real error, logged as one.
    return isinstance(exc, ConnectionError) and (
        request.transport is None or request.transport.is_closing())


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def answer_headers(request: web.Request, response: web.StreamResponse) -> None:
    """The headers every answer carries, set before it is prepared: by the error
    middleware on every answer it passes (a `render.JsonAnswer` is made with them), and
    by the handlers that prepare a streamed answer themselves. (Not an
    `on_response_prepare` hook: a signal costs every answer a coroutine and a dispatch,
    a tenth of a cheap one's time.)

    JSON answers (the API and its errors) describe state that changes and may carry
    what a key opened: never stored by browsers or proxies. Every answer says its
    Content-Type is to be believed, so no browser runs a file output as a page or
    script. A job's files keep the caching headers ComfyUI gave them. A request whose
    body was not read to its end closes its connection with the answer.
    """
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    # The header as written, not `response.content_type`, which parses it every time.
    if headers.get(hdrs.CONTENT_TYPE, "").startswith("application/json") and not (
            response.status < 400 and request.match_info.route.name == "joboutput"):
        headers["Cache-Control"] = "no-store"
    close_if_body_unread(request, response)
