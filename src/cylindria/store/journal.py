"""The journal: a registry subscriber that writes every job change to the state file
from one writer thread, with group commit."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from ..core.records import Job, to_record
from ..errors import StateUnavailable
from .database import Database, Loaded, Row, open_database

log = logging.getLogger(__name__)

T = TypeVar("T")

PRUNE_BATCH = 500


class Journal:
    """Every change the registry announces is marked dirty here; the writer thread
    commits whatever is dirty as soon as its previous commit ends, so a burst of
    changes shares one commit and a lone one waits for nothing. `durable(job)`
    waits until the job's current version is on disk.

    When writes fail (a full disk, a broken file), the error is logged once, new
    submissions are refused (`durable` raises StateUnavailable), jobs already in
    flight go on being tracked in memory, and writing is tried again every few
    seconds until it works.
    """

    def __init__(self, database: Database, executor: ThreadPoolExecutor,
                 on_saved: Callable[[list[tuple[Job, int]]], None],
                 retry_seconds: float) -> None:
        self._database = database
        self._retry_seconds = retry_seconds
        self._executor = executor
        self._on_saved = on_saved
        self._dirty: dict[str, Job] = {}
        self._workflows: dict[str, str] = {}
        self._waiters: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}
        self._writing: asyncio.Future[None] | None = None
        self._failure: str | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._written_event = asyncio.Event()
        self._closed = False
        self.commits = 0

    @property
    def name(self) -> str:
        return self._database.name

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
            log.warning("state file %s: %d job changes could not be written before "
                        "stopping", self.name, len(self._dirty))
        await self._run(lambda db: db.close())
        self._executor.shutdown(wait=True)

    # -- writing ------------------------------------------------------------------

    def note(self, job: Job) -> None:
        """A registry subscriber: the job changed."""
        self._dirty[job.job_id] = job
        self._kick()

    def remember_workflow(self, job_id: str, workflow: str) -> None:
        """Written with the job's next commit (before ComfyUI is asked to run it)."""
        self._workflows[job_id] = workflow

    async def durable(self, job: Job) -> None:
        """Return once the journal holds this version of the job (or a later one)."""
        self.ensure_writable()
        target = job.version
        if job.saved_version >= target:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job.job_id, []).append((target, done))
        self._dirty.setdefault(job.job_id, job)
        self._kick()
        await done

    def _kick(self) -> None:
        if self._writing is not None or not self._dirty or self._closed:
            return
        if self._failure is not None and self._retry is not None:
            return  # failing: only the retry timer tries again
        batch = [(job, job.version, _row(job)) for job in self._dirty.values()]
        workflows = [(job_id, text) for job_id, text in self._workflows.items()
                     if job_id in self._dirty]
        self._dirty.clear()
        self._writing = asyncio.get_running_loop().run_in_executor(
            self._executor, self._database.write, [row for _, _, row in batch], workflows)
        self._writing.add_done_callback(lambda done: self._written(done, batch, workflows))

    def _written(self, done: asyncio.Future[None],
                 batch: list[tuple[Job, int, Row]], workflows: list[tuple[str, str]]) -> None:
        self._writing = None
        self._written_event.set()
        error = None if done.cancelled() else done.exception()
        if error is not None or done.cancelled():
            self._failed(error, batch)
            return
        self.commits += 1
        if self._failure is not None:
            log.warning("state file %s: writes work again; new jobs are accepted",
                        self.name)
            self._failure = None
        for job_id, _ in workflows:
            self._workflows.pop(job_id, None)
        for job, version, _ in batch:
            self._release(job.job_id, version, None)
        self._on_saved([(job, version) for job, version, _ in batch])
        self._kick()

    def _failed(self, error: BaseException | None, batch: list[tuple[Job, int, Row]]) -> None:
        if self._failure is None:
            log.error("state file %s: writing failed (%s); new jobs are refused until "
                      "writes work again, jobs in flight are still followed", self.name,
                      error)
        self._failure = str(error)
        for job, version, _ in batch:
            # Written again with the next attempt, unless a newer version is waiting.
            self._dirty.setdefault(job.job_id, job)
            self._release(job.job_id, version, self._unavailable())
        self._retry = asyncio.get_running_loop().call_later(self._retry_seconds, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._kick()

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
            f"Cylindria cannot write its state file ({self._failure}), so it accepts no new "
            "job now: an accepted job must survive a restart. Retry later; the operator "
            "should check the disk.", headers={"Retry-After": "10"})

    # -- reading and pruning --------------------------------------------------------------

    async def fetch(self, job_id: str) -> Job | None:
        """A job from the file (one that memory no longer holds)."""
        return await self._run(lambda db: db.job(job_id))

    async def workflow(self, job_id: str) -> str | None:
        return await self._run(lambda db: db.workflow(job_id))

    async def page(self, states: Iterable[str] | None, gpu_id: int | None, before: int,
                   limit: int) -> list[Job]:
        return await self._run(lambda db: db.page(states, gpu_id, before, limit))

    async def held(self) -> int:
        return await self._run(lambda db: db.held())

    async def prune(self, before: datetime) -> int:
        """Delete every job finished before `before`, in small transactions so that
        commits of live jobs go in between."""
        total = 0
        while True:
            try:
                count = await self._run(lambda db: db.prune(before.timestamp(), PRUNE_BATCH))
            except sqlite3.Error as exc:
                log.warning("state file %s: dropping old jobs failed (%s)", self.name, exc)
                return total
            total += count
            if count < PRUNE_BATCH:
                return total

    async def _run(self, work: Callable[[Database], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work,
                                                                self._database)


async def open_journal(path: Path | None, memory_jobs: int,
                       on_saved: Callable[[list[tuple[Job, int]]], None],
                       sync_full: bool = False,
                       retry_seconds: float = 2.0) -> tuple[Journal, Loaded]:
    """Open the state file (None: a database in memory) on the journal's own thread and
    read what memory needs; StateFileError if the file cannot be used."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
    try:
        database, loaded = await asyncio.get_running_loop().run_in_executor(
            executor, open_database, path, memory_jobs, sync_full)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    return Journal(database, executor, on_saved, retry_seconds), loaded


def _row(job: Job) -> Row:
    return (job.seq, job.job_id, job.state.value, job.gpu_id,
            job.finished_at.timestamp() if job.finished_at is not None else None,
            to_record(job))
