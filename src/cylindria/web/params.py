"""Reading a request's path, query and headers into checked values, with clear 400s."""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import Mapping
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from ..addresses import without_userinfo
from ..appkeys import GPUS, WEBHOOKS
from ..core.answers import Raw
from ..core.numbers import canonical_int
from ..core.placement import gpu_number
from ..core.records import JobState
from ..errors import BadRequest, BodyTooLarge, UnknownGpu, UnsupportedEncoding
from ..nodes import node_name_problem
from ..upstream.gpus import Gpu

# The largest body taken, compressed or not: workflows can embed images as base64
# (ComfyUI itself takes up to 100 MB).
MAX_BODY_BYTES = 32 * 1024 * 1024
INLINE_INFLATE_BYTES = 256 * 1024
ZLIB_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
              "deflate": zlib.MAX_WBITS}
JOB_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}", re.ASCII)
MAX_CALLBACK_URL = 2048


def job_id(request: web.Request) -> str:
    return _checked_job_id(request.match_info["job_id"])


def job_filter(query: Mapping[str, str]) -> str | None:
    """`?job_id=`: one job, or None (absent or empty) for every job."""
    value = query.get("job_id")
    return _checked_job_id(value) if value else None


def _checked_job_id(value: str) -> str:
    if not JOB_ID_RE.fullmatch(value):
        raise BadRequest("job_id must be 1 to 128 characters of letters, digits, '.', '_' "
                         f"or '-' (got {value[:140]!r}).")
    if not value.strip("."):
        # The URLs Cylindria hands out name the job in a path segment, and browsers and
        # URL libraries fold '.' and '..' segments away (/joboutput/../0 is /0).
        raise BadRequest(f"job_id {value[:140]!r} is only dots, which URLs cannot carry as "
                         "a path segment; give it at least one letter, digit, '_' or '-'.")
    return value


def gpu(request: web.Request, raw: str, name: str = "GpuId") -> Gpu:
    gpus = request.app[GPUS]
    return gpus[gpu_number(raw, len(gpus), name)]


def node_gpu(request: web.Request, raw: str, node: str, name: str = "gpu") -> tuple[str, int]:
    """With nodes sharing a database, a GPU of any node, as (node, number): `NODE:N`
    (as `GET /gpus/` names it), or `N` for this node's GPU N, as elsewhere in the API."""
    other, colon, number = raw.rpartition(":")
    if not colon or other == node:
        return node, gpu(request, number, name).index
    index = canonical_int(number)
    if node_name_problem(other) is not None or index is None:
        raise UnknownGpu(f"{name} must be a GPU of this node by its number, or any node's "
                         "GPU by its name across the nodes, NODE:N as GET /gpus/ names "
                         f"it (e.g. gpu-b:0); got {raw[:80]!r}.")
    return other, index


async def callback_url(request: web.Request) -> str | None:
    """The X-Callback-Url, once webhooks may go there: 400 for what is no http(s) URL,
    422 (callback_not_allowed) for credentials in it or a host that resolves to a
    place the policy closes, or does not resolve. An empty header asks for none, as an
    empty query value is no filter."""
    url = request.headers.get("X-Callback-Url")
    if not url:
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


async def body(request: web.Request) -> Raw:
    """The request body, decompressed as its Content-Encoding says: one buffer, or the
    chunks it came in (joining megabytes would hold the event loop; the reader joins
    them off it). Cylindria decodes bodies itself (the server is told not to): only
    where one is read, bounded in size, and with a 4xx that says what was wrong."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    wbits = ZLIB_WBITS.get(encoding)
    if wbits is None and encoding not in ("", "identity"):
        raise UnsupportedEncoding(f"Content-Encoding {encoding[:40]!r} is not supported; send "
                                  "the body uncompressed, or compressed with gzip or deflate.")
    chunks = await _chunks(request)
    if wbits is None:
        return chunks[0] if len(chunks) == 1 else chunks
    raw = b"".join(chunks)
    if len(raw) <= INLINE_INFLATE_BYTES:
        return inflate(raw, wbits, MAX_BODY_BYTES, encoding)
    # zlib lets go of the interpreter while it works: a thread keeps the loop free.
    return await asyncio.to_thread(inflate, raw, wbits, MAX_BODY_BYTES, encoding)


async def _chunks(request: web.Request) -> list[bytes]:
    """The body as received, at most MAX_BODY_BYTES of it."""
    too_large = BodyTooLarge(f"The body is more than {MAX_BODY_BYTES // 2**20} MiB; send a "
                             "smaller workflow.")
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := (await request.content.readchunk())[0]:
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise too_large
            chunks.append(chunk)
    except RequestPayloadError:
        raise BadRequest("The body could not be read as sent (a broken chunked encoding?). "
                         "Send it again.") from None
    return chunks


def inflate(raw: bytes, wbits: int, limit: int, encoding: str) -> bytes:
    """`raw` decompressed, at most `limit` bytes of it (a small body may hide a huge
    one)."""
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(raw, limit + 1)
    except zlib.error:
        if encoding == "deflate" and wbits > 0:
            # Some clients send deflate without its zlib header.
            return inflate(raw, -zlib.MAX_WBITS, limit, encoding)
        raise BadRequest(f"The body is not {encoding} data, as its Content-Encoding says. "
                         "Send it uncompressed, or compressed as declared.") from None
    if len(data) > limit:
        raise BodyTooLarge(f"The body is more than {limit // 2**20} MiB once decompressed; "
                           "send a smaller workflow.")
    if not inflater.eof:
        raise BadRequest(f"The {encoding} body ends before its compressed data does. Send "
                         "all of it.")
    return data


def close_if_body_unread(request: web.Request, response: web.StreamResponse) -> None:
    """Called as an answer is prepared: a request whose body was not read to its end (a route that
    takes none, or one that could not be decoded) ends its connection with the answer,
    instead of aiohttp draining and decoding the rest (and logging its failure)."""
    if not request.content.is_eof():
        request.content.feed_eof()
        response.force_close()
        # Headers are made before this hook runs: say it in them as well.
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


# Priorities for Cylindria's queue (GpuId=auto): a whole number in this range.
PRIORITY_RANGE = 1000


def priority(query: Mapping[str, str]) -> int:
    """`?priority=`: 0 when absent; a whole number from -1000 to 1000, higher first."""
    raw = query.get("priority")
    if raw is None or raw == "":
        return 0
    value = canonical_int(raw[1:]) if raw.startswith("-") else canonical_int(raw)
    if value is None or value > PRIORITY_RANGE or raw in ("-0",):
        raise BadRequest(f"priority must be a whole number from -{PRIORITY_RANGE} to "
                         f"{PRIORITY_RANGE}, in plain digits (got {raw[:40]!r}); higher "
                         "runs first among jobs held for GpuId=auto.")
    return -value if raw.startswith("-") else value


def last_event_id(request: web.Request) -> int | None:
    """The Last-Event-ID header, else the `last_event_id` query value; None when both
    are absent or empty. Each one given is checked, even the one that does not count."""
    header = _event_id(request.headers.get("Last-Event-ID"), "Last-Event-ID")
    query = _event_id(request.query.get("last_event_id"), "last_event_id")
    return query if header is None else header


def _event_id(raw: str | None, name: str) -> int | None:
    if not raw:
        return None
    value = canonical_int(raw)
    if value is None:
        raise BadRequest(f"{name} must be an event id this stream sent (a whole number), "
                         f"got {raw[:40]!r}.")
    return value


def wait(query: Mapping[str, str], most: int) -> int | None:
    """`?wait=`: whole seconds from 1 to `most` (CYLINDRIA_MAX_WAIT); None when absent
    or empty, which answers at once."""
    raw = query.get("wait")
    if raw is None or raw == "":
        return None
    value = canonical_int(raw)
    if value is None or not 1 <= value <= most:
        raise BadRequest(f"wait must be a whole number of seconds from 1 to {most}, in plain "
                         f"digits (got {raw[:40]!r}); leave it out to be answered at once.",
                         extra={"parameter": "wait", "max_wait": most})
    return value
