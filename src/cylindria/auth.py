"""API key check, and the dashboard's sign-in sessions that stand in for it in a browser."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from .errors import Unauthorized
from .keys import SESSIONS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

SESSION_COOKIE = "cylindria_session"

# Route names reachable without the key: the health check must work for load
# balancers and process supervisors that know no secrets; the sign-in form, and the
# stylesheet and script it uses, are how a browser gets a session in the first place.
OPEN_ROUTES = frozenset({"healthz", "dashboard_login", "dashboard_static"})
# Dashboard pages: a browser without a session is sent to the sign-in form.
SESSION_PAGES = frozenset({"index", "dashboard_job", "dashboard_logout"})
# The pages' live-update feeds: without a session they answer 401 JSON.
SESSION_FEEDS = frozenset({"dashboard_state", "dashboard_job_state"})
# Job output files may be shown by the dashboard as <img>, which cannot send a header.
# Only GET/HEAD, and the cookie is SameSite=Strict, so other sites still cannot use it.
SESSION_READ_PREFIXES = ("/joboutput/",)


def key_matches(given: str | None, expected: str) -> bool:
    return hmac.compare_digest((given or "").encode(), expected.encode())


def signed_in(request: web.Request) -> bool:
    sessions = request.app.get(SESSIONS)
    return sessions is not None and sessions.valid(request.cookies.get(SESSION_COOKIE))


def start_session(request: web.Request, response: web.StreamResponse) -> None:
    sessions = request.app[SESSIONS]
    response.set_cookie(SESSION_COOKIE, sessions.start(), max_age=int(sessions.lifetime),
                        path="/", httponly=True, samesite="Strict", secure=request.secure)


def end_session(request: web.Request, response: web.StreamResponse) -> None:
    request.app[SESSIONS].end(request.cookies.get(SESSION_COOKIE))
    response.del_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Strict",
                        secure=request.secure)


def safe_next(target: str | None) -> str | None:
    """`target` if it is a path on this server, else None: never an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return None
    if "\\" in target or any(ord(c) < 0x20 for c in target):
        return None
    return target


def make_auth_middleware(api_key: str) -> Middleware:
    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Routing has already happened; unknown paths have no resource and need the key.
        resource = request.match_info.route.resource
        name = resource.name if resource is not None else None
        if name in OPEN_ROUTES:
            return await handler(request)
        given = request.headers.get("X-API-Key")
        if key_matches(given, api_key):
            return await handler(request)
        # The cookie opens the dashboard only, never the JSON API: API clients send
        # the header, and a browser's ambient credentials must not be usable there.
        if session_opens(request, name) and signed_in(request):
            return await handler(request)
        if name in SESSION_PAGES and given is None:
            login = request.app.router["dashboard_login"].url_for()
            if request.method in ("GET", "HEAD"):
                login = login.with_query(next=request.path_qs)
            raise web.HTTPSeeOther(location=str(login))
        what = "wrong" if given else "missing"
        message = (f"The X-API-Key header is {what}. Send the key this server was "
                   "started with (CYLINDRIA_API_KEY) in an X-API-Key header.")
        if name in SESSION_FEEDS:
            message += " In a browser, sign in to the dashboard again."
        raise Unauthorized(message, headers={"WWW-Authenticate": 'ApiKey header="X-API-Key"'})

    return auth_middleware


def session_opens(request: web.Request, name: str | None) -> bool:
    if name in SESSION_PAGES or name in SESSION_FEEDS:
        return True
    resource = request.match_info.route.resource
    return (resource is not None and request.method in ("GET", "HEAD")
            and resource.canonical.startswith(SESSION_READ_PREFIXES))
