"""API key check: every route but the health check needs `X-API-Key` when a key is set."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from .errors import Unauthorized

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Paths reachable without the key: the health check must work for load balancers
# and process supervisors that know no secrets.
OPEN_PATHS = frozenset({"/healthz"})


def key_matches(given: str | None, expected: str) -> bool:
    return hmac.compare_digest((given or "").encode(), expected.encode())


Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def make_auth_middleware(api_key: str) -> Middleware:
    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            given = request.headers.get("X-API-Key")
            if not key_matches(given, api_key):
                what = "wrong" if given else "missing"
                raise Unauthorized(
                    f"The X-API-Key header is {what}. Send the key this server was "
                    "started with (CYLINDRIA_API_KEY) in an X-API-Key header.",
                    headers={"WWW-Authenticate": 'ApiKey header="X-API-Key"'})
        return await handler(request)

    return auth_middleware
