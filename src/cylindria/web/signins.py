"""Dashboard sign-ins: random tokens with an expiry, and the cookie that carries them."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field

from aiohttp import web

from .throttle import Throttle

SIGNIN_SECONDS = 12 * 3600
MAX_SIGNINS = 1000
COOKIE = "cylindria_session"


@dataclass(slots=True)
class Signins:
    """Signed-in browsers: random tokens with an expiry, held in this process only.

    Only a SHA-256 digest of each token is kept, so neither a memory dump nor a
    timing difference in the dict lookup tells anything about a live cookie. A
    restart signs everybody out, which is the safe direction.

    `throttle` counts wrong keys per client address, from the sign-in form and from
    the X-API-Key header alike: both guess the same key.
    """

    lifetime: float = SIGNIN_SECONDS
    limit: int = MAX_SIGNINS
    throttle: Throttle = field(default_factory=Throttle)
    _expiry: dict[bytes, float] = field(default_factory=dict)

    def start(self) -> str:
        self._prune()
        while len(self._expiry) >= self.limit:
            # Dicts keep insertion order: the oldest sign-in goes first.
            del self._expiry[next(iter(self._expiry))]
        token = secrets.token_urlsafe(32)
        self._expiry[_digest(token)] = time.monotonic() + self.lifetime
        return token

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        expiry = self._expiry.get(_digest(token))
        if expiry is None:
            return False
        if expiry <= time.monotonic():
            del self._expiry[_digest(token)]
            return False
        return True

    def end(self, token: str | None) -> None:
        if token:
            self._expiry.pop(_digest(token), None)

    def __len__(self) -> int:
        return len(self._expiry)

    def _prune(self) -> None:
        now = time.monotonic()
        for digest in [d for d, expiry in self._expiry.items() if expiry <= now]:
            del self._expiry[digest]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def signed_in(request: web.Request, signins: Signins) -> bool:
    return signins.valid(request.cookies.get(COOKIE))


def sign_in(request: web.Request, response: web.StreamResponse, signins: Signins) -> None:
    response.set_cookie(COOKIE, signins.start(), max_age=int(signins.lifetime), path="/",
                        httponly=True, samesite="Strict", secure=request.secure)


def sign_out(request: web.Request, response: web.StreamResponse, signins: Signins) -> None:
    signins.end(request.cookies.get(COOKIE))
    response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict",
                        secure=request.secure)


def safe_next(target: str | None) -> str | None:
    """`target` if it is a path on this server, else None: never an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return None
    if "\\" in target or any(ord(c) < 0x20 for c in target):
        return None
    return target
