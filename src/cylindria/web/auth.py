"""The API key check, and which routes a dashboard sign-in may open instead."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import TypeVar

from aiohttp import web
from yarl import URL

from ..errors import TooManyAttempts, Unauthorized
from ..jsonio import dumps
from .clients import client_address
from .signins import COOKIE, Signins, as_bytes, malformed, signed_in
from .throttle import Throttle

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)


class Access(Enum):
    """What opens a route besides the API key; each handler declares its own."""

    KEY = "key"  # the X-API-Key header only: the JSON API
    OPEN = "open"  # nothing: health checks, the sign-in form and its assets
    PAGE = "page"  # a sign-in; without one a browser is sent to the sign-in form
    FEED = "feed"  # a sign-in; without one, 401 JSON (a page's live-update feed)
    READ = "read"  # a sign-in, for GET and HEAD only (files shown in a page as <img>)
    METRICS = "metrics"  # the key, or nothing when CYLINDRIA_METRICS_PUBLIC is on
    # A sign-in, for POST only, from a page of this service that sends its CSRF token:
    # the API routes the dashboard's buttons call (see check_action).
    ACTION = "action"


ACCESS_ATTRIBUTE = "cylindria_access"
# The JSON API's routes that the dashboard's buttons call, by route name: their
# handlers are the API's own, and a signed-in page may call them as actions.
ACTION_ROUTES = frozenset({"canceljob", "retryjob", "gpu_drain", "gpu_undrain"})
CSRF_HEADER = "X-CSRF-Token"
# Tells a browser to forget a session cookie this service cannot have set.
DROP_COOKIE = (f'{COOKIE}=""; expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Path=/; '
               "HttpOnly; SameSite=Strict")


def access(level: Access) -> Callable[[H], H]:
    def mark(handler: H) -> H:
        setattr(handler, ACCESS_ATTRIBUTE, level)
        return handler
    return mark


def route_access(request: web.Request) -> Access:
    # Static assets (stylesheet, script) are the public project's own files.
    if isinstance(request.match_info.route.resource, web.StaticResource):
        return Access.OPEN
    # Routing has already happened; unknown paths get a handler without a mark.
    level = getattr(request.match_info.handler, ACCESS_ATTRIBUTE, Access.KEY)
    if level is Access.KEY and request.match_info.route.name in ACTION_ROUTES:
        return Access.ACTION
    return level


def key_matches(given: str | None, expected: str) -> bool:
    """Whether `given` is the key, in constant time; any text at all is only a wrong key
    (a header's bytes that are no UTF-8 included)."""
    return hmac.compare_digest(as_bytes(given or ""), as_bytes(expected))


def sign_in_opens(level: Access, method: str) -> bool:
    """Whether a valid sign-in cookie opens a route of this level for this method.

    Never the JSON API: API clients send the header, and a browser's ambient
    credentials must not be usable there.
    """
    if level is Access.READ:
        # The cookie is SameSite=Strict, so other sites still cannot use it.
        return method in ("GET", "HEAD")
    return level in (Access.PAGE, Access.FEED)


def same_origin(request: web.Request) -> bool:
    """Whether the request comes from a page of this service: its Origin header (or,
    when a browser sent none, its Referer) names the host and port it was sent to.

    The scheme is not compared: behind a proxy that ends TLS, the page is https while
    the request reaches Cylindria as http; the Host header is the browser's either way.
    """
    source = request.headers.get("Origin")
    if source is None:
        source = request.headers.get("Referer")
    if not source or source == "null":
        return False
    try:
        origin = URL(source)
        if origin.scheme not in ("http", "https") or not origin.host:
            return False
        target = URL.build(scheme=origin.scheme, authority=request.host)
    except ValueError:
        return False
    return (origin.host, origin.port) == (target.host, target.port)


def forbidden(code: str, message: str) -> web.HTTPForbidden:
    # Already JSON in the API's error shape, so the error middleware passes it on.
    return web.HTTPForbidden(text=dumps({"error": {"code": code, "message": message}}),
                             content_type="application/json")


def check_action(request: web.Request, signins: Signins, token: str | None = None) -> None:
    """A signed-in browser's action: refused (403) unless it comes from a page of this
    service and carries that sign-in's CSRF token, in the X-CSRF-Token header or (from
    a plain HTML form, which cannot set headers) as `token`.

    The session cookie is SameSite=Strict, but a site is a host, not an origin: a page
    served by anything else on this host (another port) would still send the cookie.
    """
    if not same_origin(request):
        raise forbidden(
            "origin_refused",
            "This request carries a dashboard sign-in but does not come from a page of "
            "this service (its Origin or Referer header names another site, or none). "
            "Use the dashboard's own buttons, or send the API key in an X-API-Key header.")
    given = request.headers.get(CSRF_HEADER, token)
    if not signins.csrf_matches(request.cookies[COOKIE], given):
        raise forbidden(
            "csrf_token_invalid",
            f"This request carries a dashboard sign-in but not its {CSRF_HEADER} header "
            "(or a wrong one). Reload the dashboard page and try again, or send the API "
            "key in an X-API-Key header.")


def check_throttle(throttle: Throttle, address: str, *, api: bool) -> None:
    """Raise TooManyAttempts while `address` must wait before its key is checked."""
    if not throttle.wait(address):
        return
    seconds = throttle.retry_after(address)
    message = (f"Too many wrong keys from this address ({throttle.limit} within "
               f"{throttle.window:g} s); wait {seconds} s before trying again.")
    if api:
        message += (" Check that this client sends the key the server was started with "
                    "(CYLINDRIA_API_KEY) in its X-API-Key header.")
    raise TooManyAttempts(message, headers={"Retry-After": str(seconds)})


def given_key(request: web.Request) -> str | None:
    """The key sent as X-API-Key, or as `Authorization: Bearer <key>` (what Prometheus
    and many HTTP clients send)."""
    key = request.headers.get("X-API-Key")
    if key is None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            key = token.strip()
    return key


def make_auth_middleware(api_key: str, signins: Signins, login: str,
                         metrics_public: bool = False) -> Middleware:
    """`login` names the route of the sign-in form."""

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        level = route_access(request)
        if level is Access.OPEN or (level is Access.METRICS and metrics_public):
            return await handler(request)
        given = given_key(request)
        # A cookie of bytes no sign-in ever had is a guess as much as a wrong key is.
        forged = malformed(request.cookies.get(COOKIE))
        throttle = signins.throttle
        if given or forged:
            # No address waits while no wrong key is counted: the right key then costs
            # no look at the client's address.
            if len(throttle):
                check_throttle(throttle, client_address(request), api=True)
            if given and key_matches(given, api_key):
                return await handler(request)
        # Behind a trusted proxy, the client it names: each client is throttled alone.
        address = client_address(request)
        if forged and not given:
            signins.throttle.fail(address, "session cookie")
            raise Unauthorized(
                "The dashboard's session cookie is malformed; it is dropped. Sign in to "
                "the dashboard again, or send the key this server was started with "
                "(CYLINDRIA_API_KEY) in an X-API-Key header.",
                headers={"WWW-Authenticate": 'ApiKey header="X-API-Key"',
                         "Set-Cookie": DROP_COOKIE})
        if sign_in_opens(level, request.method) and signed_in(request, signins):
            return await handler(request)
        if (level is Access.ACTION and request.method == "POST"
                and signed_in(request, signins)):
            check_action(request, signins)
            return await handler(request)
        if level is Access.PAGE and given is None:
            target = request.app.router[login].url_for()
            if request.method in ("GET", "HEAD"):
                target = target.with_query(next=request.path_qs)
            raise web.HTTPSeeOther(location=str(target))
        if given:
            signins.throttle.fail(address, "X-API-Key header")
        what = "wrong" if given else "missing"
        message = (f"The X-API-Key header is {what}. Send the key this server was "
                   "started with (CYLINDRIA_API_KEY) in an X-API-Key header (or as "
                   "Authorization: Bearer <key>).")
        if level in (Access.FEED, Access.ACTION):
            message += " In a browser, sign in to the dashboard again."
        raise Unauthorized(message, headers={"WWW-Authenticate": 'ApiKey header="X-API-Key"'})

    return auth_middleware
