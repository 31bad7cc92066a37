"""Reading a request's path, query and headers into checked values, with clear 400s."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from ..addresses import without_userinfo
from ..appkeys import GPUS, WEBHOOKS
from ..core.numbers import canonical_int
from ..core.placement import gpu_number
from ..core.records import JobState
from ..errors import BadRequest
from ..upstream.gpus import Gpu

# Set on a request whose body could not be read: its answer closes the connection.
UNREADABLE_BODY = web.RequestKey("unreadable_body", bool)
JOB_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}", re.ASCII)
MAX_CALLBACK_URL = 2048


def job_id(request: web.Request) -> str:
    value = request.match_info["job_id"]
    if not JOB_ID_RE.fullmatch(value):
        raise BadRequest("job_id must be 1 to 128 characters of letters, digits, '.', '_' "
                         f"or '-' (got {value[:140]!r}).")
    return value


def gpu(request: web.Request, raw: str, name: str = "GpuId") -> Gpu:
    gpus = request.app[GPUS]
    return gpus[gpu_number(raw, len(gpus), name)]


async def callback_url(request: web.Request) -> str | None:
    """The X-Callback-Url, once webhooks may go there: 400 for what is no http(s) URL,
    422 (callback_not_allowed) for credentials in it or a host that resolves to a
    place the policy closes, or does not resolve."""
    url = request.headers.get("X-Callback-Url")
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # a bracketed host that is not an IPv6 address
        usable = False
    if not usable or len(url) > MAX_CALLBACK_URL:
        raise BadRequest("X-Callback-Url must be an absolute http:// or https:// URL "
                         f"(got {without_userinfo(url)[:200]!r}).")
    await request.app[WEBHOOKS].check(url)
    return url


async def body(request: web.Request) -> bytes:
    """The request body, decoded as its Content-Encoding says."""
    try:
        return await request.read()
    except RequestPayloadError:
        # The rest of this body cannot be read, so nothing else on this connection can:
        # close it after the answer, without draining the body (which would fail again).
        request.content.feed_eof()
        request[UNREADABLE_BODY] = True
        raise BadRequest("The body could not be read: it is not what its Content-Encoding "
                         f"({request.headers.get('Content-Encoding', 'none')[:40]!r}) says. "
                         "Send it uncompressed, or compressed as declared.") from None


async def close_after_unreadable_body(request: web.Request,
                                      response: web.StreamResponse) -> None:
    """An application hook: the answer to a request whose body could not be read ends
    its connection (and says so in its headers)."""
    if request.get(UNREADABLE_BODY, False):
        response.force_close()
        # Headers are made before this hook runs: say it as well.
        response.headers["Connection"] = "close"


def states(query: Mapping[str, str]) -> set[str] | None:
    if not query.get("state"):
        return None
    wanted = {s.strip() for s in query["state"].split(",") if s.strip()}
    unknown = wanted - {s.value for s in JobState}
    if unknown:
        raise BadRequest(f"Unknown state(s) {', '.join(sorted(unknown))}; use "
                         + ", ".join(s.value for s in JobState) + ".")
    return wanted


def whole_number(query: Mapping[str, str], name: str, low: int,
                 high: int | None) -> int | None:
    """The query value `name` within [low, high], or None when it is absent or empty."""
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    value = canonical_int(raw)
    if value is None or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of {low} or more"
        raise BadRequest(f"{name} must be a whole number {bound}, in plain digits (got "
                         f"{raw[:40]!r}).")
    return value


def last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if not raw:
        return None
    value = canonical_int(raw)
    if value is None:
        raise BadRequest("Last-Event-ID must be an event id this stream sent "
                         f"(a whole number), got {raw[:40]!r}.")
    return value
