"""The journal's work for nodes sharing PostgreSQL: heartbeats, the rescue of dead
nodes' jobs, the nodes' one queue of held jobs, cancels passed between nodes. Each runs
on the journal's thread, like every other statement."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import ujson

from ..core.records import Job
from .backend import Database

log = logging.getLogger("cylindria.store.journal")

T = TypeVar("T")


class NodesJournal:
    """Mixed into the Journal, whose reads and database these use."""

    _database: Database
    _beat_failing: bool

    @property
    def label(self) -> str:
        raise NotImplementedError

    async def _run(self, work: Callable[[Database], T]) -> T:
        raise NotImplementedError

    async def _read(self, work: Callable[[Database], T]) -> T:
        raise NotImplementedError

    def _answered(self) -> None:
        raise NotImplementedError

    # -- nodes (PostgreSQL) ---------------------------------------------------------

    @property
    def clustered(self) -> bool:
        """Whether the database holds nodes (PostgreSQL): then `beat` and `leave` work."""
        return self._database.clustered

    async def beat(self, gpus: list[dict[str, Any]]) -> list[tuple[Any, ...]] | None:
        """Write this node's heartbeat, on the journal's thread; the other nodes' rows
        (see PostgresDatabase.beat), or None when the write failed (logged)."""
        text = ujson.dumps(gpus)
        try:
            rows = await self._run(lambda db: db.beat(text))  # type: ignore[attr-defined]
        except self._database.errors as exc:
            if not self._beat_failing:  # once, not at every beat
                log.warning("%s: the node's heartbeat failed (%s); the other nodes will "
                            "see this one as not alive until it works again", self.label, exc)
            self._beat_failing = True
            return None
        if self._beat_failing:
            log.warning("%s: the node's heartbeat works again", self.label)
            self._beat_failing = False
        self._answered()
        return rows

    async def rescue(self, grace: float, retry_lost: int = 0,
                     max_attempts: int = 1) -> list[Any]:
        """Settle as lost the jobs in flight of nodes dead for `grace` seconds, or put
        them back in line as CYLINDRIA_RETRY_LOST allows (see rescue.py), on the
        journal's thread: what was rescued (Rescued), none when the database failed
        (the next round tries again)."""
        from .rescue import Retries, rescue
        retries = Retries(retry_lost, max_attempts)
        try:
            return await self._run(lambda db: rescue(db, grace, retries))  # type: ignore[arg-type]
        except self._database.errors as exc:
            if not self._beat_failing:  # else said once by the heartbeat
                log.warning("%s: settling the jobs of dead nodes failed (%s)", self.label,
                            exc)
            return []

    async def leave(self) -> None:
        """Mark this node as stopped in its row."""
        try:
            await self._run(lambda db: db.leave())  # type: ignore[attr-defined]
        except self._database.errors as exc:
            log.warning("%s: marking the node as stopped failed (%s)", self.label, exc)

    # -- the one queue of nodes sharing a database (PostgreSQL; see queue.py) -------

    @property
    def node_name(self) -> str:
        """This node's name among nodes sharing the database ("" without nodes)."""
        node = getattr(self._database, "node", None)
        return node.name if node is not None else ""

    def queue_aging(self, seconds: float) -> None:
        """Seconds of waiting worth one priority level in the shared queue."""
        if self._database.clustered:
            self._database.aging = seconds  # type: ignore[attr-defined]

    async def claim(self, gpu: int, models: Iterable[str], window: int,
                    seq: int) -> tuple[str, Job, bytes | None] | None:
        """The first job of the shared line for this node's GPU `gpu`, now this node's,
        with the node that held it (see queue.claim); StateUnavailable when the database
        fails."""
        from .queue import claim
        models = list(models)
        return await self._read(lambda db: claim(db, gpu, models, window,  # type: ignore[arg-type]
                                                 seq))

    async def take_back(self, job_id: str) -> bool:
        """Take this node's held job out of the shared line; False if another node has
        taken it."""
        from .queue import take_back
        return await self._read(lambda db: take_back(db, job_id))  # type: ignore[arg-type]

    async def taken(self, job_ids: list[str]) -> list[str]:
        """Of these jobs of this node, the ones other nodes have taken."""
        if not job_ids or not self._database.clustered:
            return []
        from .queue import gone
        return await self._read(lambda db: gone(db, job_ids))  # type: ignore[arg-type]

    # -- cancels passed between nodes (PostgreSQL; see cancels.py) -----------------

    async def request_cancel(self, node: str, job_id: str) -> None:
        """Ask node `node` to cancel its job `job_id` (a row, and a notification)."""
        from .cancels import request
        await self._read(lambda db: request(db, node, job_id))  # type: ignore[arg-type]

    async def pending_cancels(self) -> list[str]:
        """This node's jobs other nodes asked it to cancel (none without nodes)."""
        if not self._database.clustered:
            return []
        from .cancels import pending
        return await self._read(lambda db: pending(db))  # type: ignore[arg-type]

    async def drop_cancels(self, job_ids: list[str]) -> None:
        from .cancels import drop
        await self._read(lambda db: drop(db, job_ids))  # type: ignore[arg-type]

    def cancel_listener(self, wake: Callable[[], None],
                        on_queue: Callable[[str], None] | None = None) -> Any:
        """A CancelListener that calls `wake` when another node asks this one to cancel,
        and `on_queue` with each notification of the shared queue (not started); None
        without nodes."""
        if not self._database.clustered:
            return None
        from .cancels import CancelListener
        db: Any = self._database
        return CancelListener(db.params, db.node.name, asyncio.get_running_loop(), wake,
                              on_queue)

    # -- every node's job events (PostgreSQL; see events.py) -----------------------

    def events_reader(self, deliver: Callable[[int, list[Any]], None]) -> Any:
        """An EventsReader that hands every node's new job events to `deliver` (not
        started); None without nodes."""
        if not self._database.clustered:
            return None
        from .events import EventsReader
        db: Any = self._database
        return EventsReader(db.params, asyncio.get_running_loop(), deliver)

    async def event_history(self, after: int, through: int, job_id: str | None,
                            limit: int) -> tuple[int, list[tuple[int, str, Job]]]:
        """The events in (after, through] (see events.history), on the journal's
        thread; StateUnavailable when the database fails."""
        from .events import history
        return await self._read(lambda db: history(db, after, through,  # type: ignore[arg-type]
                                                   job_id, limit))

    async def prune_events(self, before: float) -> int:
        """Delete the events older than `before` (a timestamp), a batch at a time, so
        that commits go in between; none without nodes, or when the database fails."""
        if not self._database.clustered:
            return 0
        from .events import PRUNE_BATCH, prune
        total = 0
        while True:
            try:
                count = await self._run(lambda db: prune(db, before))  # type: ignore[arg-type]
            except self._database.errors as exc:
                log.warning("%s: dropping old job events failed (%s)", self.label, exc)
                return total
            total += count
            if count < PRUNE_BATCH:
                return total
