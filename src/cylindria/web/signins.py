"""Dashboard sign-ins: random tokens with an expiry, the cookie that carries them, and
each sign-in's CSRF token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from ..errors import BadRequest, BodyTooLarge
from .throttle import Throttle

SIGNIN_SECONDS = 12 * 3600
MAX_SIGNINS = 1000
COOKIE = "cylindria_session"
# The sign-in form's body, at most: a key of up to 128 characters and a `next` path of
# up to NEXT_LIMIT, each percent-encoded (three bytes a character at worst), fit. It is
# read on the event loop, so it stays this small.
FORM_LIMIT = 1024
NEXT_LIMIT = 200
FORM_TYPE = "application/x-www-form-urlencoded"


@dataclass(slots=True)
class Signins:
    """Signed-in browsers: random tokens with an expiry, held in this process only.

    Only a SHA-256 digest of each token is kept, so neither a memory dump nor a
    timing difference in the dict lookup tells anything about a live cookie. A
    restart signs everybody out, which is the safe direction.

    `throttle` counts wrong keys per client address (`clients.client_address`: behind
    a trusted proxy, the client the proxy names), from the sign-in form and from the
    X-API-Key header alike: both guess the same key.

    Each sign-in also has a CSRF token, which its pages carry and send back with the
    actions they take. It is derived from the session token under a key that lives in
    this process only, so nothing more is stored, it cannot lead back to the cookie,
    and it ends with the sign-in.
    """

    lifetime: float = SIGNIN_SECONDS
    limit: int = MAX_SIGNINS
    throttle: Throttle = field(default_factory=Throttle)
    _expiry: dict[bytes, float] = field(default_factory=dict)
    _csrf_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))

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

    def csrf_token(self, token: str) -> str:
        """The CSRF token of the sign-in whose session token is `token`."""
        mac = hmac.new(self._csrf_key, b"csrf\0" + as_bytes(token), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()

    def csrf_matches(self, token: str, given: str | None) -> bool:
        return hmac.compare_digest(self.csrf_token(token).encode(), as_bytes(given or ""))

    def __len__(self) -> int:
        return len(self._expiry)

    def _prune(self) -> None:
        now = time.monotonic()
        for digest in [d for d, expiry in self._expiry.items() if expiry <= now]:
            del self._expiry[digest]


def _digest(token: str) -> bytes:
    return hashlib.sha256(as_bytes(token)).digest()


def as_bytes(text: str) -> bytes:
    """`text` as bytes, whatever it holds: what a request carries may be any bytes
    (aiohttp hands the ones that are no UTF-8 over as lone surrogates, which a plain
    `encode()` refuses)."""
    return text.encode("utf-8", "surrogatepass")


def malformed(token: str | None) -> bool:
    """Whether a session cookie is one this service never set: printable ASCII only."""
    return token is not None and not (token.isascii() and token.isprintable())


def signed_in(request: web.Request, signins: Signins) -> bool:
    return signins.valid(request.cookies.get(COOKIE))


def csrf_token(request: web.Request, signins: Signins) -> str:
    """The CSRF token a page shown to this request embeds: empty without a sign-in."""
    token = request.cookies.get(COOKIE)
    return signins.csrf_token(token) if token and signins.valid(token) else ""


def sign_in(request: web.Request, response: web.StreamResponse, signins: Signins) -> None:
    response.set_cookie(COOKIE, signins.start(), max_age=int(signins.lifetime), path="/",
                        httponly=True, samesite="Strict", secure=request.secure)


def sign_out(request: web.Request, response: web.StreamResponse, signins: Signins) -> None:
    signins.end(request.cookies.get(COOKIE))
    response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict",
                        secure=request.secure)


async def read_form(request: web.Request, limit: int = FORM_LIMIT) -> dict[str, str]:
    """The sign-in form's fields (the first of each name), from at most `limit` bytes.

    A declared length over the limit is refused before anything is read; a body of
    undeclared length is read only up to the limit. A client that goes away meanwhile
    raises ConnectionError (the caller counts it).
    """
    too_large = BodyTooLarge(f"The sign-in form is more than {limit} bytes; send only its "
                             "fields 'key' and 'next'.")
    if (request.content_length or 0) > limit:
        raise too_large
    if request.can_read_body and request.content_type != FORM_TYPE:
        raise BadRequest(f"The sign-in form could not be read. Send it as a form ({FORM_TYPE}) "
                         "with the field 'key'.")
    body = bytearray()
    try:
        while len(body) <= limit:
            chunk = await request.content.read(limit + 1 - len(body))
            if not chunk:
                break
            body += chunk
    except RequestPayloadError:
        raise BadRequest("The sign-in form could not be read as sent (cut short, or a "
                         "broken chunked encoding); send it again.") from None
    if len(body) > limit:
        raise too_large
    # Latin-1 takes any byte; percent-escapes are read as UTF-8, and bytes that are
    # none are kept apart (they only make a key that matches nothing).
    fields: dict[str, str] = {}
    for name, value in parse_qsl(body.decode("latin-1"), keep_blank_values=True,
                                 encoding="utf-8", errors="surrogateescape"):
        fields.setdefault(name, value)
    return fields


def safe_next(target: str | None) -> str | None:
    """`target` if it is a path on this server, else None: never an open redirect.

    Only printable ASCII (what a page's own path is), and short enough that the form
    carrying it stays within FORM_LIMIT.
    """
    if not target or not target.startswith("/") or target.startswith("//"):
        return None
    if "\\" in target or not (target.isascii() and target.isprintable()):
        return None
    return target if len(target) <= NEXT_LIMIT else None
