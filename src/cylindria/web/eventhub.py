"""The event hub: fans registry changes out to live streams and keeps the recent ones."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.records import Job

log = logging.getLogger(__name__)

Event = tuple[int, str, bytes]

# Per-client backlog: a client further behind than this many events, or than this many
# bytes of them, is dropped, so one slow reader never holds memory or time of the
# service. Bodies are shared between streams, so this bounds what a stream keeps alive;
# 256 ordinary status bodies (a few KiB each) stay far below the byte limit, which
# only bites when bodies are large (many outputs, long texts).
CLIENT_QUEUE = 256
CLIENT_QUEUE_BYTES = 4 * 1024 * 1024
# A resume replays each job that changed since the client's last event; past this many
# bytes of bodies it sends `resync` instead (the client re-reads the state it needs),
# so a reconnecting client never makes the service render and hold an unbounded burst.
# 1000 ordinary bodies fit.
REPLAY_BYTES = 8 * 1024 * 1024


def _always() -> bool:
    return True


@dataclass(slots=True, eq=False)
class Subscriber:
    job_id: str | None
    # Whether the client is still connected; a stream whose client has gone is ended
    # as soon as the hub notices, so it never holds a slot or a backlog.
    alive: Callable[[], bool] = _always
    # The client address (web/clients.py) the stream is counted against.
    address: str = ""
    queue: asyncio.Queue[Event | None] = field(
        default_factory=lambda: asyncio.Queue(CLIENT_QUEUE))
    queued_bytes: int = 0
    dropped: bool = False
    # Another node's stream passed through (web/events.py): counted, never fed.
    relayed: bool = False
    # The hub's last id when it subscribed: with nodes sharing a database, a resume
    # reads up to it, and every later event comes through the queue.
    since: int = 0

    async def get(self) -> Event | None:
        """The next event, or None once the stream is ended."""
        item = await self.queue.get()
        if item is not None:
            self.queued_bytes -= len(item[2])
        return item


class EventHub:
    """Fans registry changes out to SSE clients, each change serialized once however
    many clients there are, and only when there are any. Keeps the ids of the last
    changes for resume: a client that comes back gets, for every job that changed
    since its last event, the job's state now (one event per job, in order)."""

    def __init__(self, buffer: int, render: Callable[[Job], bytes],
                 clustered: bool = False) -> None:
        # With nodes sharing a database, ids are the database's (see feed) and a resume
        # reads what was missed from there (web/clusterevents.py), not from memory.
        self.clustered = clustered
        self._recent: deque[tuple[int, Job]] = deque(maxlen=buffer)
        self._subscribers: set[Subscriber] = set()
        self._next_id = 1
        self._render = render
        self.closed = False
        # Clients cut off for falling behind, for /metrics.
        self.dropped = 0

    @property
    def streams(self) -> int:
        """Open streams; those whose client has gone are ended first, so a slot is
        free again the moment its client leaves."""
        return len(self._live())

    def streams_from(self, address: str) -> int:
        """Open streams of one client address; those whose client has gone are ended
        first, as for `streams`."""
        return sum(1 for sub in self._live() if sub.address == address)

    def _live(self) -> set[Subscriber]:
        for sub in [s for s in self._subscribers if not s.alive()]:
            self._end(sub)
        return self._subscribers

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    def publish(self, job: Job) -> None:
        if self.clustered:
            # The database brings every lasting change, with its id (feed); a passing
            # one of this node's job (progress, a place in line) goes out at once,
            # without an id: a stream resumed anywhere does not miss it.
            if job.version != job.lasting_version:
                self._fan_out(0, job.job_id, lambda: self._render(job))
            return
        event_id = self._next_id
        self._next_id += 1
        self._recent.append((event_id, job))
        self._fan_out(event_id, job.job_id, lambda: self._render(job))

    def feed(self, last: int, events: list[tuple[int, str, Callable[[], bytes]]]) -> None:
        """With nodes sharing a database: the events the database holds up to `last`,
        in id order, each (id, job id, its body when asked), fanned out with their
        ids; `last` is the newest id a resume reads up to."""
        for event_id, job_id, body in events:
            self._fan_out(event_id, job_id, body)
        self._next_id = max(self._next_id, last + 1)

    def _fan_out(self, event_id: int, job_id: str, body: Callable[[], bytes]) -> None:
        event = None
        for sub in list(self._subscribers):
            if sub.relayed or (sub.job_id is not None and sub.job_id != job_id):
                continue
            if 0 < event_id <= sub.since:
                continue  # replayed to it already, or had by its client from another node
            if not sub.alive():
                self._end(sub)
                continue
            if event is None:
                event = (event_id, job_id, body())
            size = len(event[2])
            if sub.queue.full():
                self.dropped += 1
                self._end(sub)
                log.info("events: dropped a client more than %d events behind", CLIENT_QUEUE)
            elif sub.queued_bytes and sub.queued_bytes + size > CLIENT_QUEUE_BYTES:
                # One event always gets through, however large, so a stream that keeps
                # up still receives a body bigger than the limit.
                self.dropped += 1
                self._end(sub)
                log.info("events: dropped a client more than %d MiB behind",
                         CLIENT_QUEUE_BYTES // 2**20)
            else:
                sub.queue.put_nowait(event)
                sub.queued_bytes += size

    def _end(self, sub: Subscriber) -> None:
        sub.dropped = True
        self._subscribers.discard(sub)
        # Make room for the end marker so the stream notices at once.
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queued_bytes = 0
        sub.queue.put_nowait(None)

    def subscribe(self, job_id: str | None, last_event_id: int | None,
                  alive: Callable[[], bool] = _always, address: str = ""
                  ) -> tuple[Subscriber, list[Event], bool]:
        """A new subscriber, what it missed (each job that changed since
        `last_event_id`, as it is now), and whether that is the whole gap: not when
        the gap is older than the buffer, nor when its bodies pass REPLAY_BYTES (the
        replay is then empty, and the client should re-read the state).
        With nodes sharing a database, the replay is the caller's to read (see
        web/clusterevents.py), up to `sub.since`."""
        sub = Subscriber(job_id, alive, address, since=self.last_id)
        replay: list[Event] = []
        complete = True
        if last_event_id is not None and not self.clustered:
            oldest = self._recent[0][0] if self._recent else self._next_id
            # An id above the last one sent comes from before a restart: resync too.
            complete = oldest - 1 <= last_event_id <= self.last_id
            latest: dict[str, tuple[int, Job]] = {}
            for event_id, job in self._recent:
                if event_id > last_event_id and (job_id is None or job.job_id == job_id):
                    latest[job.job_id] = (event_id, job)
            size = 0
            for event_id, job in sorted(latest.values(), key=lambda e: e[0]):
                body = self._render(job)
                size += len(body)
                if size > REPLAY_BYTES:
                    # Rendering stops here too: the work is bounded as well as the bytes.
                    replay, complete = [], False
                    break
                replay.append((event_id, job.job_id, body))
        self._subscribers.add(sub)
        return sub, replay, complete

    def relay(self, alive: Callable[[], bool] = _always, address: str = "") -> Subscriber:
        """A slot for a stream this node passes through from another node: counted as
        a stream of `address` until unsubscribed, ended (`dropped`) like the others at
        shutdown, and given no events."""
        sub = Subscriber(None, alive, address, relayed=True)
        self._subscribers.add(sub)
        return sub

    def end_job(self, job: Job) -> None:
        """End the streams of this one job: another node runs it now (nodes sharing a
        database), and a client that reconnects is passed that node's stream."""
        for sub in [s for s in self._subscribers
                    if s.job_id == job.job_id and not s.relayed]:
            self._end(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def close(self) -> None:
        """End every stream: the service is stopping (not a slow-client drop)."""
        self.closed = True
        if self._subscribers:
            log.debug("events: ending %d stream(s) at shutdown", len(self._subscribers))
        for sub in list(self._subscribers):
            self._end(sub)
