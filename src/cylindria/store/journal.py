"""The journal: a registry subscriber that writes every job change to its database (the
state file, or PostgreSQL) from one writer thread, with group commit."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import ujson

from ..core.ports import HeldElsewhere, Listed
from ..core.records import Job, to_record
from ..errors import JobTakenElsewhere, StateFileError, StateUnavailable
from ..nodes import NodeInfo, default_node_name
from .backend import Database, Loaded, Row
from .database import open_database
from .journal_nodes import NodesJournal
from .writer import WriterThread

log = logging.getLogger(__name__)

T = TypeVar("T")
# Workflows longer than this are written by the writer thread, never on the event loop.
INLINE_WORKFLOW = 64 * 1024


PRUNE_BATCH = 500
# While writes fail, the next try comes `retry_seconds` after a failure, then twice as
# long after each further one, up to this many times as long. Each wait is shortened by
# up to a fifth at random, so that nodes sharing a database do not all come back at once.
RETRY_CEILING = 8


class Journal(NodesJournal):
    """Every change the registry announces is marked dirty here; the writer thread
    commits whatever is dirty as soon as its previous commit ends, so a burst of
    changes shares one commit and a lone one waits for nothing. Changes that need not
    last (a queue position, the node running) wait for the job's next lasting one.
    `durable(job)` waits until the job's last lasting change is on disk; when nothing
    is being written, it commits that one job at once on the event loop instead (a WAL
    commit without fsync takes tens of microseconds, handing it to the thread and back
    takes longer); with CYLINDRIA_STATE_SYNC=full, or a database across the network,
    it never does.

    When writes fail (a full disk, a broken file, a database that cannot be reached),
    the error is logged once, new submissions are refused (`durable` raises
    StateUnavailable), jobs already in flight go on being tracked in memory, and
    writing is tried again, with backoff, until it works (logged once too); then every
    change made meanwhile is written.
    """

    def __init__(self, database: Database, writer: WriterThread,
                 on_saved: Callable[[list[tuple[Job, int]]], None],
                 retry_seconds: float, inline: bool) -> None:
        self._database = database
        self._retry_seconds = retry_seconds
        self._inline = inline
        # Work handed to the writer thread and not finished: while there is any, only
        # that thread may touch the database.
        self._pending = 0
        self._kick_soon: asyncio.Handle | None = None
        self._writer = writer
        self._on_saved = on_saved
        self._dirty: dict[str, Job] = {}
        self._workflows: dict[str, bytes] = {}
        self._waiters: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}
        self._writing: asyncio.Future[None] | None = None
        self._failure: str | None = None
        self._retry: asyncio.TimerHandle | None = None
        # Failed tries since writes last worked: the backoff's exponent.
        self._tries = 0
        self._written_event = asyncio.Event()
        self._closed = False
        self._beat_failing = False
        # Called with the jobs whose rows another node has taken (nodes sharing a
        # database): their writes changed nothing.
        self.on_taken: Callable[[list[Job]], None] | None = None
        self.commits = 0
        # Seconds from handing a batch over to its commit, summed over `commits`.
        self.commit_seconds = 0.0

    @property
    def name(self) -> str:
        return self._database.name

    @property
    def label(self) -> str:
        """The database as messages name it: its kind, then its name."""
        return f"{self._database.kind} {self._database.name}"

    @property
    def writable(self) -> bool:
        return self._failure is None

    def ensure_writable(self) -> None:
        if self._failure is not None:
            raise self._unavailable()

    async def close(self) -> None:
        """Write what is still dirty (one last try if writes were failing), then close."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._kick()
        while self._writing is not None:
            self._written_event.clear()
            await self._written_event.wait()
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        if self._dirty:
            log.warning("%s: %d job changes could not be written before stopping",
                        self.label, len(self._dirty))
        await self._run(lambda db: db.close())
        await self._writer.stop()

    # -- writing ------------------------------------------------------------------

    def note(self, job: Job) -> None:
        """A registry subscriber: the job changed. Written with what else changes in
        this turn of the event loop, unless the change need not last."""
        if job.lasting_version <= job.saved_version:
            return
        self._dirty[job.job_id] = job
        if self._kick_soon is None:
            self._kick_soon = asyncio.get_running_loop().call_soon(self._kick)

    def remember_workflow(self, job_id: str, workflow: bytes) -> None:
        """Written with the job's next commit (before ComfyUI is asked to run it)."""
        self._workflows[job_id] = workflow

    async def durable(self, job: Job) -> None:
        """Return once the journal holds the job's last lasting change."""
        self.ensure_writable()
        target = job.lasting_version
        if job.saved_version >= target:
            return
        # Every change is noted, so the job is dirty or in the batch being written. A
        # large workflow is never written on the loop.
        if (self._inline and self._pending == 0 and not self._closed
                and len(self._workflows.get(job.job_id, b"")) <= INLINE_WORKFLOW):
            self._commit_now(job)
            self.ensure_writable()
            if job.saved_version >= target:
                return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job.job_id, []).append((target, done))
        self._kick()
        await done

    def _take_batch(self, only: Job | None = None
                    ) -> tuple[list[tuple[Job, int, Row]], list[tuple[str, str]]]:
        """The dirty jobs (or just `only`), taken off the dirty list, with their
        workflows still to write."""
        jobs = list(self._dirty.values()) if only is None else [only]
        batch = [(job, job.version, _row(job)) for job in jobs]
        workflows = [(job.job_id, self._workflows[job.job_id]) for job in jobs
                     if job.job_id in self._workflows]
        if only is None:
            self._dirty.clear()
        else:
            self._dirty.pop(only.job_id, None)
        return batch, workflows

    def _commit_now(self, job: Job) -> None:
        """Commit this one job on the event loop (the writer thread is idle); the rest
        of what is dirty goes to the thread as usual."""
        batch, workflows = self._take_batch(job)
        started = time.perf_counter()
        try:
            left = self._database.write([row for _, _, row in batch], workflows)
        except self._database.errors as exc:
            self._failed(exc, batch)
        else:
            self._succeeded(batch, workflows, time.perf_counter() - started, left)

    def _kick(self) -> None:
        self._kick_soon = None
        if self._writing is not None or not self._dirty or self._closed:
            return
        if self._failure is not None and self._retry is not None:
            return  # failing: only the retry timer tries again
        batch, workflows = self._take_batch()
        started = time.perf_counter()
        self._writing = self._submit(self._database.write, [row for _, _, row in batch],
                                     workflows)
        self._writing.add_done_callback(
            lambda done: self._written(done, batch, workflows, started))

    def _written(self, done: asyncio.Future[None], batch: list[tuple[Job, int, Row]],
                 workflows: list[tuple[str, bytes]], started: float) -> None:
        self._writing = None
        self._written_event.set()
        error = None if done.cancelled() else done.exception()
        if error is not None or done.cancelled():
            self._failed(error, batch)
        else:
            self._succeeded(batch, workflows, time.perf_counter() - started,
                            done.result())
            self._kick()

    def _succeeded(self, batch: list[tuple[Job, int, Row]],
                   workflows: list[tuple[str, bytes]], elapsed: float,
                   left: list[str] | None = None) -> None:
        self.commits += 1
        self.commit_seconds += elapsed
        if self._failure is not None:
            log.warning("%s: writes work again; new jobs are accepted", self.label)
            self._failure = None
            self._tries = 0
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
        for job_id, _ in workflows:
            self._workflows.pop(job_id, None)
        taken = set(left or ())
        for job, version, _ in batch:
            if job.job_id in taken:
                self._release(job.job_id, version, JobTakenElsewhere(job.job_id))
            else:
                self._release(job.job_id, version, None)
        self._on_saved([(job, version) for job, version, _ in batch
                        if job.job_id not in taken])
        if taken and self.on_taken is not None:
            self.on_taken([job for job, _, _ in batch if job.job_id in taken])

    def _failed(self, error: BaseException | None, batch: list[tuple[Job, int, Row]]) -> None:
        self._lost(error)
        for job, version, _ in batch:
            # Written again with the next attempt, unless a newer version is waiting.
            self._dirty.setdefault(job.job_id, job)
            self._release(job.job_id, version, self._unavailable())

    def _lost(self, error: BaseException | None) -> None:
        """Writes fail: said once, not at each try; the next try is set, with backoff."""
        if self._failure is None:
            log.error("%s: writing failed (%s); new jobs are refused until writes work "
                      "again, jobs in flight are still followed", self.label,
                      _one_line(error))
        self._failure = _one_line(error)
        if self._retry is None and not self._closed:
            factor = min(2 ** self._tries, RETRY_CEILING)
            if factor < RETRY_CEILING:
                self._tries += 1
            self._retry = asyncio.get_running_loop().call_later(
                self._retry_seconds * factor * random.uniform(0.8, 1.0), self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._kick()

    def _answered(self) -> None:
        """The database answered (a heartbeat went through): while writes fail, they are
        tried now rather than at the end of the backoff."""
        if self._failure is not None and self._retry is not None:
            self._retry.cancel()
            self._retry_now()

    def _release(self, job_id: str, version: int, error: BaseException | None) -> None:
        waiting = self._waiters.get(job_id)
        if not waiting:
            return
        keep = []
        for target, done in waiting:
            if done.done():
                continue
            if error is not None:
                done.set_exception(error)
            elif target <= version:
                done.set_result(None)
            else:
                keep.append((target, done))
        if keep:
            self._waiters[job_id] = keep
        else:
            del self._waiters[job_id]

    def _unavailable(self) -> StateUnavailable:
        return StateUnavailable(
            f"Cylindria cannot write its {self._database.kind} ({self._failure}), so it "
            "accepts no new job now: an accepted job must survive a restart. Retry later; "
            f"the operator should check {self._database.look_at}.",
            headers={"Retry-After": "10"})

    # -- reading and pruning --------------------------------------------------------------

    async def fetch(self, job_id: str) -> Job | None:
        """A job from the file (one that memory no longer holds)."""
        return await self._read(lambda db: db.job(job_id))

    async def elsewhere(self, job_id: str) -> list[HeldElsewhere]:
        """With nodes sharing the database, the other nodes' jobs of this id (read on
        the journal's thread); none otherwise."""
        if not self._database.clustered:
            return []
        return await self._read(lambda db: db.elsewhere(job_id))  # type: ignore[attr-defined]

    async def workflow(self, job_id: str) -> bytes | str | None:
        return await self._read(lambda db: db.workflow(job_id))

    async def page(self, states: Iterable[str] | None, gpu_id: int | None, before: int,
                   limit: int) -> list[Job]:
        return await self._read(lambda db: db.page(states, gpu_id, before, limit))

    async def listing(self, states: Iterable[str] | None, gpu: tuple[str, int] | None,
                      before: int | None, limit: int) -> list[Listed]:
        """With nodes sharing the database: every node's jobs (see listing.py)."""
        return await self._read(lambda db: db.listing(  # type: ignore[attr-defined]
            states, gpu, before, limit))

    async def _read(self, work: Callable[[Database], T]) -> T:
        """A read for a request: when the database fails it, StateUnavailable (a 503)."""
        try:
            return await self._run(work)
        except self._database.errors as exc:
            raise StateUnavailable(
                f"Cylindria cannot read its {self._database.kind} now ({_one_line(exc)}). "
                f"Retry later; the operator should check {self._database.look_at}.",
                headers={"Retry-After": "10"}) from None

    async def save_run_times(self, state: dict[str, Any]) -> None:
        """Keep what was learned of run times (written whole; it is small). Not while
        writes fail: the next change, or the shutdown, writes them."""
        if self._failure is not None:
            return
        text = ujson.dumps(state)
        try:
            await self._run(lambda db: db.set_meta("run_times", text))
        except self._database.errors as exc:
            log.warning("%s: saving run times failed (%s)", self.label, exc)

    async def held(self) -> int:
        return await self._run(lambda db: db.held())

    async def prune(self, before: datetime) -> int:
        """Delete every job finished before `before`, in small transactions so that
        commits of live jobs go in between."""
        total = 0
        while self._failure is None:
            try:
                count = await self._run(lambda db: db.prune(before.timestamp(), PRUNE_BATCH))
            except self._database.errors as exc:
                log.warning("%s: dropping old jobs failed (%s)", self.label, exc)
                return total
            total += count
            if count < PRUNE_BATCH:
                return total
        return total

    async def _run(self, work: Callable[[Database], T]) -> T:
        return await self._submit(work, self._database)

    def _submit(self, work: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        self._pending += 1
        done = self._writer.submit(work, *args)
        done.add_done_callback(self._finished)
        return done

    def _finished(self, _: asyncio.Future[Any]) -> None:
        self._pending -= 1

    @property
    def backlog(self) -> int:
        """Pieces of work handed to the writer thread and not done yet."""
        return self._pending


async def open_journal(path: Path | None, memory_jobs: int,
                       on_saved: Callable[[list[tuple[Job, int]]], None],
                       sync_full: bool = False, retry_seconds: float = 2.0,
                       database_url: str | None = None,
                       node: NodeInfo | None = None) -> tuple[Journal, Loaded]:
    """Open the jobs' database on the journal's own thread and read what memory needs:
    PostgreSQL at `database_url` when there is one (as `node`, by default named after
    this host), else the state file at `path` (None: a database in memory).
    StateFileError if it cannot be used."""
    writer = WriterThread(asyncio.get_running_loop())
    try:
        if database_url is not None:
            node = node or NodeInfo(default_node_name(), "")
            database, loaded = await writer.submit(_open_postgres, database_url, memory_jobs,
                                                   node)
        else:
            database, loaded = await writer.submit(open_database, path, memory_jobs,
                                                   sync_full)
    except BaseException:
        await writer.stop()
        raise
    inline = database.commits_inline and not sync_full
    return Journal(database, writer, on_saved, retry_seconds, inline), loaded


def _open_postgres(url: str, memory_jobs: int, node: NodeInfo) -> tuple[Database, Loaded]:
    # Imported here: the driver is an extra, and SQLite's users need not install it.
    try:
        from .postgres import open_postgres
    except ImportError as exc:
        raise StateFileError(
            f"--database-url needs the PostgreSQL driver psycopg, which cannot be loaded "
            f"({exc}): pip install 'cylindria[postgres]'") from None
    return open_postgres(url, memory_jobs, node)


def _one_line(error: BaseException | None) -> str:
    # A driver's message may run over several lines (psycopg's hints do).
    if error is None:
        return "the write was cancelled"
    return " ".join(str(error).split()) or error.__class__.__name__


def _row(job: Job) -> Row:
    return (job.seq, job.job_id, job.state.value, job.gpu_id,
            job.finished_at.timestamp() if job.finished_at is not None else None,
            to_record(job))
