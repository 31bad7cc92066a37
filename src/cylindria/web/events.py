"""`GET /events/`: live job changes as server-sent events, with resume."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..appkeys import EVENTS, SETTINGS
from ..errors import TooManyStreams
from ..jsonio import dumps
from . import params

routes = web.RouteTableDef()

RESYNC = dumps({"detail": "Some events were missed; fetch the current state with "
                          "GET /jobstatus/{job_id}/ or GET /jobs/."}).encode()


def sse(event_id: int, data: bytes, event: str = "job") -> bytes:
    return f"id: {event_id}\nevent: {event}\ndata: ".encode() + data + b"\n\n"


@routes.get("/events/", name="events")
async def get_events(request: web.Request) -> web.StreamResponse:
    hub = request.app[EVENTS]
    settings = request.app[SETTINGS]
    job_id = request.query.get("job_id") or None
    last_id = params.last_event_id(request)
    if hub.streams >= settings.max_event_streams:
        raise TooManyStreams(
            f"Too many event streams are open ({settings.max_event_streams}); retry later "
            "or poll GET /jobstatus/{job_id}/.", headers={"Retry-After": "5"})
    # A job_id not known yet is fine: its events start when it is submitted.
    sub, replay, complete = hub.subscribe(job_id, last_id)
    try:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        await resp.write(b"retry: 2000\n\n")
        if not complete:
            # The gap is older than the buffer: tell the client to re-read state.
            await resp.write(sse(hub.last_id, RESYNC, event="resync"))
        for event_id, _, data in replay:
            await resp.write(sse(event_id, data))
        keepalive = settings.timing.sse_keepalive
        while True:
            try:
                async with asyncio.timeout(keepalive):
                    item = await sub.queue.get()
            except TimeoutError:
                await resp.write(b": keep-alive\n\n")
                continue
            if item is None:
                break
            await resp.write(sse(item[0], item[2]))
        return resp
    finally:
        hub.unsubscribe(sub)
