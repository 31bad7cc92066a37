"""`GET /events/`: live job changes as server-sent events, with resume."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..appkeys import EVENTS, SETTINGS
from ..errors import TooManyStreams
from ..jsonio import dumps
from . import params
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


def sse(event_id: int, data: bytes, event: str = "job") -> bytes:
    return f"id: {event_id}\nevent: {event}\ndata: ".encode() + data + b"\n\n"


@routes.get("/events/", name="events")
async def get_events(request: web.Request) -> web.StreamResponse:
    hub = request.app[EVENTS]
    settings = request.app[SETTINGS]
    # A job_id not known yet is fine (its events start when it is submitted); one that
    # can never be a job's is a mistake worth saying.
    job_id = params.job_filter(request.query)
    last_id = params.last_event_id(request)
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
    sub, replay, complete = hub.subscribe(job_id, last_id,
                                          alive=lambda: request.transport is not None,
                                          address=address)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    try:
        answer_headers(request, resp)
        await resp.prepare(request)
        await resp.write(b"retry: 2000\n\n")
        if not complete:
            # The gap is older than the buffer, or too large to replay: tell the client
            # to re-read state.
            await resp.write(sse(hub.last_id, RESYNC, event="resync"))
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
