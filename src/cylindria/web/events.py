"""`GET /events/`: live job changes as server-sent events, with resume; with nodes sharing
a database, every node's jobs' lasting changes with the database's ids (resumed from
the database, on any node), and a stream of another node's one job passed through from
that node."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from ..appkeys import EVENTS, JOBS, PEERS, SETTINGS
from ..core import elsewhere
from ..core.ports import HeldElsewhere
from ..errors import BackendError, TooManyStreams
from ..jsonio import dumps
from ..upstream.peers import FORWARDED, holder_url, read_answer
from . import clusterevents, params, render
from .clients import client_address
from .eventhub import Event, Subscriber
from .middlewares import answer_headers

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

RESYNC = dumps({"detail": "Some events were missed; fetch the current state with "
                          "GET /jobstatus/{job_id}/ or GET /jobs/."}).encode()
# How often a waiting stream checks that its client is still there. aiohttp does not
# cancel a handler whose client left (that would cut other handlers short mid-work), and
# a write would only fail at the next keep-alive; between checks the hub still frees the
# slot at once, as it ends streams whose client has gone before counting them.
PRESENCE_CHECK = 1.0
# A stream passed through from another node holds a connection there too: its client's
# presence is checked more often, so that connection is closed soon after it leaves.
RELAY_PRESENCE_CHECK = 0.25
STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                  "X-Accel-Buffering": "no"}


def sse(event_id: int, data: bytes, event: str = "job") -> bytes:
    if not event_id:
        # With nodes sharing a database, a passing change (progress) has no id: the
        # client's last id stays that of the last lasting change.
        return f"event: {event}\ndata: ".encode() + data + b"\n\n"
    return f"id: {event_id}\nevent: {event}\ndata: ".encode() + data + b"\n\n"


@routes.get("/events/", name="events")
async def get_events(request: web.Request) -> web.StreamResponse:
    hub = request.app[EVENTS]
    settings = request.app[SETTINGS]
    # A job_id not known yet is fine (its events start when it is submitted); one that
    # can never be a job's is a mistake worth saying.
    job_id = params.job_filter(request.query)
    last_id = params.last_event_id(request)
    # Another node's job: that node's stream of it (its ids), passed through. A request
    # passed on is answered with this node's stream only.
    held = None if job_id is None or FORWARDED in request.headers else (
        await elsewhere.other_holder(request.app[JOBS], job_id))
    # Per client address as well as in all, so that one client cannot take every
    # slot; behind trusted proxies, the address is the client's they name.
    address = client_address(request)
    per_address = settings.max_event_streams_per_address
    if hub.streams_from(address) >= per_address:
        raise TooManyStreams(
            f"This client address ({address}) has {per_address} event streams open, the "
            "most one address may (CYLINDRIA_MAX_EVENT_STREAMS_PER_ADDRESS); close one "
            "first. One stream without ?job_id= carries every job's events.",
            headers={"Retry-After": "5"}, extra={"limit": per_address, "per": "address"})
    if hub.streams >= settings.max_event_streams:
        raise TooManyStreams(
            f"Too many event streams are open ({settings.max_event_streams}); retry later "
            "or poll GET /jobstatus/{job_id}/.", headers={"Retry-After": "5"},
            extra={"limit": settings.max_event_streams, "per": "server"})
    if held is not None:
        return await relayed(request, held, hub.relay(
            alive=lambda: request.transport is not None, address=address))
    sub, replay, complete = hub.subscribe(job_id, last_id,
                                          alive=lambda: request.transport is not None,
                                          address=address)
    resp = web.StreamResponse(headers=STREAM_HEADERS)
    through = sub.since
    try:
        if hub.clustered and last_id is not None:
            # Read from the database up to where the stream's own events begin; later
            # events the client had (from another node) are skipped.
            sub.since = max(through, last_id)
            replay, complete = await clusterevents.history(request.app, job_id, last_id,
                                                           through)
        answer_headers(request, resp)
        await resp.prepare(request)
        await resp.write(b"retry: 2000\n\n")
        if not complete:
            # The gap is older than the buffer, or too large to replay: tell the client
            # to re-read state.
            await resp.write(sse(through if hub.clustered else hub.last_id, RESYNC,
                                 event="resync"))
        await write_replay(resp, replay)
        # A stream can live for hours: it must not keep the replayed bodies alive.
        replay.clear()
        await stream(request, resp, sub, settings.timing.sse_keepalive)
    except ConnectionError:
        # A client leaving is how every stream ends; nothing went wrong here.
        pass
    finally:
        hub.unsubscribe(sub)
    if request.transport is None:
        log.debug("events: a client left (%s)", request.remote)
    return resp


async def write_replay(resp: web.StreamResponse, replay: list[Event]) -> None:
    for event_id, _, data in replay:
        await resp.write(sse(event_id, data))


async def stream(request: web.Request, resp: web.StreamResponse, sub: Subscriber,
                 keepalive: float) -> None:
    """Write the subscriber's events until the hub ends the stream or the client goes."""
    loop = asyncio.get_running_loop()
    quiet_until = loop.time() + keepalive
    while request.transport is not None:
        left = quiet_until - loop.time()
        try:
            async with asyncio.timeout(min(PRESENCE_CHECK, max(left, 0.0))):
                item = await sub.get()
        except TimeoutError:
            if left <= PRESENCE_CHECK:
                await resp.write(b": keep-alive\n\n")
                quiet_until = loop.time() + keepalive
            continue
        if item is None:
            return
        await resp.write(sse(item[0], item[2]))
        quiet_until = loop.time() + keepalive


async def relayed(request: web.Request, held: HeldElsewhere,
                  sub: Subscriber) -> web.StreamResponse:
    """Node `held.node`'s stream of its job, passed through chunk by chunk with this
    node's stream headers, `Last-Event-ID` passed on; counted in `sub` (this node's
    limits). Its refusals come back as it answered them; unreachable: 502."""
    headers = {"Accept": "text/event-stream"}
    if request.headers.get("Last-Event-ID"):
        headers["Last-Event-ID"] = request.headers["Last-Event-ID"]
    timing = request.app[SETTINGS].timing
    resp: web.StreamResponse | None = None
    try:
        # That node writes at least a keep-alive every interval: silence past it and a
        # request timeout means the node is gone.
        async with request.app[PEERS].request(
                "GET", held.node, holder_url(held), request.rel_url.raw_path_qs, headers,
                read_timeout=timing.request_timeout + timing.sse_keepalive) as upstream:
            if upstream.status != 200 or upstream.content_type != "text/event-stream":
                return render.passed_back(await read_answer(held.node, upstream))
            resp = web.StreamResponse(headers=STREAM_HEADERS)
            answer_headers(request, resp)
            await resp.prepare(request)
            await pass_through(request, resp, upstream, sub)
    except BackendError as exc:
        if resp is None or not resp.prepared:
            raise
        log.info("events: node %s's stream of job %s ended (%s)", held.node,
                 held.job.job_id, exc.message)
    except ConnectionError:
        pass  # the client left
    finally:
        request.app[EVENTS].unsubscribe(sub)
    return resp


async def pass_through(request: web.Request, resp: web.StreamResponse,
                       upstream: aiohttp.ClientResponse, sub: Subscriber) -> None:
    """Write what the other node sends until it ends, the client leaves (the other
    node's connection is closed at once then) or this node stops."""
    while request.transport is not None and not sub.dropped:
        timer = asyncio.timeout(RELAY_PRESENCE_CHECK)
        try:
            async with timer:
                chunk = await upstream.content.readany()
        except TimeoutError:
            if timer.expired():
                continue  # nothing yet: look whether the client is still there
            raise
        if not chunk:
            return
        await resp.write(chunk)
    upstream.close()
