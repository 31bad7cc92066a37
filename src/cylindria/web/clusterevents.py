"""`GET /events/` with nodes sharing a PostgreSQL database: every node's lasting job
changes, read from the database (store/events.py) with its ids, fanned out by the hub;
a resume reads what the client missed from there, so it works on any node."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from ..appkeys import CLUSTER, EVENTS, JOURNAL, REGISTRY
from ..core.records import Job
from . import render
from .eventhub import REPLAY_BYTES, Event

# A resume replays every event it missed, up to this many (then `resync`), and up to
# REPLAY_BYTES of bodies.
REPLAY_EVENTS = 1000


def feeder(app: web.Application) -> Callable[[int, list[tuple[int, str, str, Job]]], None]:
    """What the events reader hands its rows to, on the event loop: the hub, each body
    rendered only if a stream wants it. This node's job is shown as the registry has
    it now (as `/jobstatus/` shows it; never behind the passing changes already sent),
    another node's as the row was written."""
    hub, registry, cluster = app[EVENTS], app[REGISTRY], app[CLUSTER]
    router, own = app.router, app[CLUSTER].node.name

    def body(job_id: str, node: str, job: Job) -> Callable[[], bytes]:
        def rendered() -> bytes:
            current = registry.get(job_id) if node == own else None
            if current is not None:
                return render.status_bytes(current, router)
            return render.event_body(job, node, cluster, time.monotonic(), router)
        return rendered

    def deliver(last: int, rows: list[tuple[int, str, str, Job]]) -> None:
        hub.feed(last, [(event_id, job_id, body(job_id, node, job))
                        for event_id, job_id, node, job in rows])

    return deliver


async def history(app: web.Application, job_id: str | None, after: int,
                  through: int) -> tuple[list[Event], bool]:
    """The events after `after` up to `through` (of one job, or all), each as its row
    was written, and whether that is the whole gap: not when it was pruned, when it
    passes REPLAY_EVENTS or REPLAY_BYTES. An `after` at or past `through` has nothing
    to replay (this node's reader is behind the node the client came from: the stream
    skips what it already had)."""
    if after >= through:
        return [], True
    oldest, rows = await app[JOURNAL].event_history(after, through, job_id,
                                                     REPLAY_EVENTS + 1)
    if after < oldest - 1 or len(rows) > REPLAY_EVENTS:
        return [], False
    cluster, now, replay, size = app[CLUSTER], time.monotonic(), [], 0
    for event_id, node, job in rows:
        body = render.event_body(job, node, cluster, now, app.router)
        size += len(body)
        if size > REPLAY_BYTES:
            return [], False
        replay.append((event_id, job.job_id, body))
    return replay, True
