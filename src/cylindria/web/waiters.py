"""Requests that wait for a job to finish (`?wait=`): woken by the job's own change."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from aiohttp import web

from ..core.records import Job
from ..errors import TooManyWaiters

log = logging.getLogger(__name__)

# Seconds a client refused for want of a slot is asked to wait before trying again.
RETRY_AFTER = 5


@dataclass(slots=True, eq=False)
class Waiter:
    """One request waiting. `woken` is done once its job finished, its client left, or
    the service is stopping: the request then answers with the job as it stands."""

    address: str
    connection: object
    woken: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    job_id: str | None = None

    def wake(self) -> None:
        if not self.woken.done():
            self.woken.set_result(None)


class Waiters:
    """The requests waiting, by job and by client address; a registry subscriber.

    Nothing polls: a job's end wakes its waiters as the registry announces it, and a
    client that leaves frees its slot when its connection is lost (`watch`), not when
    its wait would have ended. aiohttp does not cancel a handler whose client left."""

    def __init__(self, most: int, most_per_address: int) -> None:
        self.most = most
        self.most_per_address = most_per_address
        self._waiters: set[Waiter] = set()
        self._by_job: dict[str, set[Waiter]] = {}
        self._by_address: dict[str, int] = {}
        self._by_connection: dict[object, Waiter] = {}
        self.closed = False

    @property
    def count(self) -> int:
        return len(self._waiters)

    def count_from(self, address: str) -> int:
        return self._by_address.get(address, 0)

    @contextmanager
    def slot(self, request: web.Request, address: str) -> Iterator[Waiter]:
        """A slot for one waiting request, held until the block ends; TooManyWaiters
        (429) past either limit. A client already gone gets a slot woken at once."""
        if self.count_from(address) >= self.most_per_address:
            raise TooManyWaiters(
                f"This client address ({address}) has {self.most_per_address} requests "
                "waiting with ?wait=, the most one address may "
                "(CYLINDRIA_MAX_WAITERS_PER_ADDRESS). Ask without ?wait= and poll, or "
                "retry when one has answered.", headers={"Retry-After": str(RETRY_AFTER)},
                extra={"limit": self.most_per_address, "per": "address"})
        if self.count >= self.most:
            raise TooManyWaiters(
                f"{self.most} requests are waiting with ?wait=, the most the server takes "
                "(CYLINDRIA_MAX_WAITERS). Ask without ?wait= and poll, or retry later.",
                headers={"Retry-After": str(RETRY_AFTER)},
                extra={"limit": self.most, "per": "server"})
        waiter = Waiter(address, request.protocol)
        self._waiters.add(waiter)
        self._by_address[address] = self.count_from(address) + 1
        self._by_connection[waiter.connection] = waiter
        if self.closed or request.transport is None:
            waiter.wake()
        try:
            yield waiter
        finally:
            self._drop(waiter)

    async def until_finished(self, waiter: Waiter, job: Job, seconds: float) -> None:
        """Return once `job` is finished, or after `seconds`, or sooner when the
        waiter is woken otherwise (its client left, the service stops)."""
        if job.terminal or waiter.woken.done():
            return
        waiter.job_id = job.job_id
        self._by_job.setdefault(job.job_id, set()).add(waiter)
        try:
            async with asyncio.timeout(seconds):
                await waiter.woken
        except TimeoutError:
            pass
        finally:
            self._unlist(waiter)

    def publish(self, job: Job) -> None:
        """The registry's announcement of a change: a finished job wakes its waiters."""
        if job.terminal and job.job_id in self._by_job:
            for waiter in self._by_job.pop(job.job_id):
                waiter.wake()

    def let_go(self, job: Job) -> None:
        """Another node runs this job now (nodes sharing a database): its waiters here
        answer at once, with the job as that node has it."""
        for waiter in self._by_job.pop(job.job_id, ()):
            waiter.wake()

    def left(self, connection: object) -> None:
        """A client connection was lost: its waiter (if any) gives its slot back now."""
        waiter = self._by_connection.get(connection)
        if waiter is not None:
            self._drop(waiter)
            waiter.wake()

    def close(self) -> None:
        """Wake every waiter: the service is stopping, each answers with what it has."""
        self.closed = True
        if self._waiters:
            log.debug("waiters: answering %d waiting request(s) at shutdown",
                      len(self._waiters))
        for waiter in list(self._waiters):
            waiter.wake()

    def watch(self, server: web.Server) -> None:
        """Learn of lost connections from `server` (wrapped on the instance, as
        serving's HeadTimeouts is), so a waiter whose client left is dropped at once."""
        lost = server.connection_lost

        def connection_lost(handler: web.RequestHandler,
                            exc: BaseException | None = None) -> None:
            self.left(handler)
            lost(handler, exc)

        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def _unlist(self, waiter: Waiter) -> None:
        if waiter.job_id is None:
            return
        waiting = self._by_job.get(waiter.job_id)
        if waiting is not None:
            waiting.discard(waiter)
            if not waiting:
                del self._by_job[waiter.job_id]
        waiter.job_id = None

    def _drop(self, waiter: Waiter) -> None:
        if waiter not in self._waiters:
            return
        self._waiters.discard(waiter)
        self._unlist(waiter)
        left = self._by_address[waiter.address] - 1
        if left:
            self._by_address[waiter.address] = left
        else:
            del self._by_address[waiter.address]
        if self._by_connection.get(waiter.connection) is waiter:
            del self._by_connection[waiter.connection]
