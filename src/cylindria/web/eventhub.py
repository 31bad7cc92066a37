"""The event hub: fans registry changes out to live streams and keeps the recent ones."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.records import Job

log = logging.getLogger(__name__)

# Per-client backlog: a client further behind than this is dropped, so one slow
# reader never holds memory or time of the service.
CLIENT_QUEUE = 256


@dataclass(slots=True, eq=False)
class Subscriber:
    job_id: str | None
    queue: asyncio.Queue[tuple[int, str, bytes] | None] = field(
        default_factory=lambda: asyncio.Queue(CLIENT_QUEUE))
    dropped: bool = False


class EventHub:
    """Fans registry changes out to SSE clients, each change serialized once however
    many clients there are, and only when there are any. Keeps the ids of the last
    changes for resume: a client that comes back gets, for every job that changed
    since its last event, the job's state now (one event per job, in order)."""

    def __init__(self, buffer: int, render: Callable[[Job], bytes]) -> None:
        self._recent: deque[tuple[int, Job]] = deque(maxlen=buffer)
        self._subscribers: set[Subscriber] = set()
        self._next_id = 1
        self._render = render
        self.closed = False

    @property
    def streams(self) -> int:
        return len(self._subscribers)

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    def publish(self, job: Job) -> None:
        event_id = self._next_id
        self._next_id += 1
        self._recent.append((event_id, job))
        event = None
        for sub in list(self._subscribers):
            if sub.job_id is not None and sub.job_id != job.job_id:
                continue
            if event is None:
                event = (event_id, job.job_id, self._render(job))
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._drop(sub)

    def _drop(self, sub: Subscriber) -> None:
        sub.dropped = True
        self._subscribers.discard(sub)
        # Make room for the end marker so the stream notices at once.
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(None)
        log.info("events: dropped a client more than %d events behind", CLIENT_QUEUE)

    def subscribe(self, job_id: str | None, last_event_id: int | None
                  ) -> tuple[Subscriber, list[tuple[int, str, bytes]], bool]:
        """A new subscriber, what it missed (each job that changed since
        `last_event_id`, as it is now), and whether the buffer covered the whole gap."""
        sub = Subscriber(job_id)
        replay: list[tuple[int, str, bytes]] = []
        complete = True
        if last_event_id is not None:
            oldest = self._recent[0][0] if self._recent else self._next_id
            # An id above the last one sent comes from before a restart: resync too.
            complete = oldest - 1 <= last_event_id <= self.last_id
            latest: dict[str, tuple[int, Job]] = {}
            for event_id, job in self._recent:
                if event_id > last_event_id and (job_id is None or job.job_id == job_id):
                    latest[job.job_id] = (event_id, job)
            replay = [(event_id, job.job_id, self._render(job))
                      for event_id, job in sorted(latest.values(), key=lambda e: e[0])]
        self._subscribers.add(sub)
        return sub, replay, complete

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def close(self) -> None:
        self.closed = True
        for sub in list(self._subscribers):
            self._drop(sub)


