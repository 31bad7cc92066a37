"""Late binding for `GpuId=auto`: the part of the jobs service that hands held jobs to
GPUs as they free. Selection is synchronous (one pass, no await in between, so two
passes never pick the same job); the submissions it starts run side by side."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from ..config import Settings
from ..errors import ApiError, BackendError, JobConflict, QueueFull, StateUnavailable
from . import placement
from .dispatch import ModelMemory
from .forecast import Forecast, finish_at
from .outcomes import Outcome, Verdict, conflict, repeat
from .ports import GpuPort, Store
from .reading import WorkflowReader
from .records import Job, JobState
from .registry import Registry
from .workflow import Workflow

log = logging.getLogger(__name__)

# A GPU whose ComfyUI refused a dispatched job's connection gets none for this long.
REST_AFTER_FAILURE = 2.0


class Holding:
    registry: Registry
    gpus: Sequence[GpuPort]
    settings: Settings
    store: Store
    reader: WorkflowReader
    _background: set[asyncio.Task[Any]]

    def _init_holding(self) -> None:
        self.forecast = Forecast(self.registry)
        self.models = ModelMemory()
        # Set when a GPU may have room: a job on it started or ended, or one was held.
        self.wake = asyncio.Event()
        self._resting: dict[int, float] = {}
        # With nodes sharing a database: one pass of claims at a time on this node, so
        # that two passes never claim for the same room.
        self._claiming = asyncio.Lock()
        self.registry.held.aging = self.settings.priority_aging
        self.registry.held.window = self.settings.model_window
        self.registry.subscribe(self._on_change)

    async def submit(self, job: Job, gpu: GpuPort, workflow: Workflow) -> Outcome:
        raise NotImplementedError

    async def _hold(self, job_id: str, workflow: Workflow, callback: str | None,
                    priority: int, inputs: list[dict[str, Any]] | None = None) -> Outcome:
        """Put an auto job in Cylindria's queue (on disk before the answer), then let
        the dispatcher run: if a GPU has room, the job goes now and the answer is its
        submission's, as for a pinned job."""
        registry = self.registry
        self.store.ensure_writable()
        if len(registry.held) >= self.settings.max_held:
            raise QueueFull(
                f"Cylindria already holds {len(registry.held)} jobs waiting for a GPU, its "
                f"limit (CYLINDRIA_MAX_HELD={self.settings.max_held}). Retry later, or pin "
                "a GPU with GpuId=n.", headers={"Retry-After": "5"})
        self.store.remember_workflow(job_id, workflow.data)
        try:
            job = registry.begin(job_id, None, str(uuid.uuid4()), workflow.fingerprint,
                                 workflow.nodes, callback_url=callback, auto=True,
                                 priority=priority, models=workflow.models, inputs=inputs)
            job.costs = workflow.costs
        except JobConflict as exc:
            if exc.job.fingerprint != workflow.fingerprint:
                raise conflict(exc.job) from None
            return repeat(exc.job)
        return await self._line_up(job, workflow)

    async def _line_up(self, job: Job, workflow: Workflow) -> Outcome:
        """A job just held (a new one, or a new attempt): on disk before anything else,
        then the dispatcher runs; if a GPU has room, the answer is its submission's."""
        try:
            await self.store.durable(job)
        except StateUnavailable as exc:
            self.registry.reject(job, exc.message,
                                 error={"code": exc.code, "message": exc.message})
            raise
        sent = await self.dispatch({job.job_id: workflow})
        task = sent.get(job.job_id)
        if task is not None:
            try:
                return await asyncio.shield(task)
            except (BackendError, StateUnavailable):
                if not job.held:
                    raise
        self.wake.set()  # the loop takes it from here
        self.registry.freshen(job)
        return Outcome(job, Verdict.ACCEPTED, job.detail)

    def load(self, gpu: GpuPort) -> int:
        return placement.load(self.registry.load(gpu.index), gpu.queue_remaining)

    def _on_change(self, job: Job) -> None:
        if job.gpu_id is not None and (job.terminal or job.state is JobState.RUNNING):
            if len(self.registry.held):
                self.wake.set()

    def foresee(self, job: Job) -> Job:
        """A job in flight as it stands now: its place in Cylindria's line if it is
        held, and its ETA from what has been learned (None where nothing has)."""
        if job.terminal:
            return job  # a finished job shows no ETA
        self.registry.freshen(job)
        moment = self.registry.now()
        usable = [g.index for g in self.gpus if not g.drained]
        seconds = self.forecast.eta(job, moment.timestamp(), usable)
        job.eta_seconds = None if seconds is None else round(seconds, 3)
        job.expected_finish_at = finish_at(moment, seconds)
        return job

    def gpu_eta(self, gpu: GpuPort) -> float | None:
        """Seconds until this GPU is done with what Cylindria sent it."""
        seconds = self.forecast.backlog(gpu.index, self.registry.now().timestamp())
        return None if seconds is None else round(seconds, 3)

    async def read_costs_back(self, limit: int = 1000) -> None:
        """After a restart, what the jobs on the GPUs and the first held ones in line
        cost (their workflows are in the state file), so their ETAs are known."""
        on_gpus = [job for gpu in self.gpus for job in self.registry.in_flight(gpu.index)]
        for job in [*on_gpus, *self.registry.held.ordered(limit)]:
            if job.costs is not None or job.terminal:
                continue
            try:
                stored = await self.store.workflow(job.job_id)
                if stored is not None:
                    job.costs = (await self.reader.read(stored)).costs
            except (ApiError, OSError) as exc:
                log.debug("job %s: its workflow could not be read back (%s)", job.job_id,
                          exc)

    def wait_for_state_file(self, job: Job) -> None:
        """A job taken from Cylindria's queue whose dispatch cannot be written: its
        record as held is on disk already, so it waits there again, never refused."""
        self.registry.rehold(job, "The state file takes no writes now; back in "
                                  "Cylindria's queue until it does.")
        log.warning("job %s: back in Cylindria's queue, the state file takes no writes now",
                    job.job_id)

    def rest(self, gpu: GpuPort) -> None:
        """Its ComfyUI did not take a dispatched job: give it a moment."""
        self._resting[gpu.index] = time.monotonic() + REST_AFTER_FAILURE

    async def dispatch(self, fresh: dict[str, Workflow] | None = None
                       ) -> dict[str, asyncio.Task[Any]]:
        """Hand held jobs to every GPU with room (at most 1 + CYLINDRIA_GPU_PREFETCH of
        Cylindria's jobs each), healthy, undrained. Returns the submissions started,
        by job id; `fresh` holds workflows already in hand (the rest are read back).
        With nodes sharing a database, the jobs come from their one line (`_claim`)."""
        clustered = self.store.clustered
        if not clustered and not len(self.registry.held):
            return {}
        try:
            self.store.ensure_writable()
        except StateUnavailable:
            return {}  # a dispatch must be written first: wait for the state file
        now = time.monotonic()
        candidates = [g for g in self.gpus
                      if not g.drained and self._resting.get(g.index, 0.0) <= now]
        stale = [g for g in candidates if g.healthy_now() is None]
        if stale:
            # Probes are shared and cached; the stale ones are asked side by side.
            await asyncio.gather(*(g.is_healthy() for g in stale))
        ready = sorted((g for g in candidates if g.healthy_now()), key=self.load)
        if clustered:
            return await self._claim(ready, fresh or {})
        return self._assign(ready, fresh or {})

    async def _claim(self, ready: list[GpuPort], fresh: dict[str, Workflow]
                     ) -> dict[str, asyncio.Task[Any]]:
        """Nodes sharing a database: each GPU with room claims the first job of the
        nodes' one line (the database decides, so no two nodes take the same job), one
        at a time, until it has no room or the line is empty."""
        registry = self.registry
        room = 1 + self.settings.gpu_prefetch
        started: dict[str, asyncio.Task[Any]] = {}
        async with self._claiming:
            for gpu in ready:
                while self.load(gpu) < room and not gpu.drained:
                    models = self.models.of(gpu.index)
                    try:
                        claimed = await self.store.claim(
                            gpu.index, models, self.settings.model_window,
                            registry.reserve_seq())
                    except StateUnavailable:
                        return started
                    if claimed is None:
                        return started
                    node, job = self._claimed(claimed[0], claimed[1])
                    reason = ("its models are loaded there" if models and job.models
                              and set(job.models) & set(models) else "first in line")
                    if node != self.store.node_name:
                        reason += f", from node {node}'s place in the shared line"
                    self._start_on(job, gpu, reason, fresh, started, claimed[2])
        return started

    def _claimed(self, node: str, job: Job) -> tuple[str, Job]:
        """The claimed job as this node holds it: its own, or taken in from the row."""
        local = self.registry.get(job.job_id)
        if local is not None and local.held:
            return node, local
        if local is not None:
            self.registry.let_go(local)  # an older record of it: the row is the truth
        return node, self.registry.take_in(job)

    def let_go(self, jobs: Sequence[Job]) -> None:
        """This node's jobs whose rows another node took (a held job it claimed, or an
        id it wrote first): forgotten here; that node answers for them."""
        for job in jobs:
            log.info("job %s: its row is no longer this node's (another node took it, or "
                     "settled it while this node was away), so this node lets it go",
                     job.job_id)
            self.registry.let_go(job)

    async def follow_taken(self, interval: float, wake: asyncio.Event) -> None:
        """Nodes sharing a database: `check_taken` when `wake` is set (a notification
        named this node), and every `interval` seconds."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await wake.wait()
            wake.clear()
            if len(self.registry.held):
                await self.check_taken()

    async def check_taken(self) -> None:
        """Nodes sharing a database: let go of this node's held jobs other nodes took
        (a notification says so at once; this is also run every heartbeat)."""
        held = [job.job_id for job in self.registry.held.ordered(len(self.registry.held))]
        try:
            taken = set(await self.store.taken(held))
        except StateUnavailable:
            return
        self.let_go([job for job_id in taken
                     if (job := self.registry.get(job_id)) is not None and job.held])

    def _assign(self, ready: list[GpuPort], fresh: dict[str, Workflow]
                ) -> dict[str, asyncio.Task[Any]]:
        held = self.registry.held
        room = 1 + self.settings.gpu_prefetch
        started: dict[str, asyncio.Task[Any]] = {}
        clock = self.registry.now()
        for gpu in ready:
            while len(held) and self.load(gpu) < room:
                pick = held.next_for(gpu.index, self.models.of(gpu.index), clock)
                if pick is None:
                    break
                self._start_on(pick.job, gpu, pick.reason, fresh, started)
        return started

    def _start_on(self, job: Job, gpu: GpuPort, reason: str, fresh: dict[str, Workflow],
                  started: dict[str, asyncio.Task[Any]], stored: bytes | None = None) -> None:
        self.registry.dispatch(job, gpu.index, reason)
        self.models.used(gpu.index, job.models or ())
        task = asyncio.get_running_loop().create_task(
            self._send(job, gpu, fresh.get(job.job_id), stored), name=f"send-{job.job_id}")
        self._background.add(task)
        task.add_done_callback(self._sent)
        started[job.job_id] = task

    def _sent(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Recorded in the job already (rejected, or back in line); nothing to raise.
            exc = task.exception()
            if not isinstance(exc, ApiError):
                log.error("dispatch failed unexpectedly", exc_info=exc)

    async def _send(self, job: Job, gpu: GpuPort, workflow: Workflow | None,
                    stored: bytes | None = None) -> Any:
        if workflow is None and stored is not None:
            # Claimed from the nodes' line with its workflow: read it, no second trip.
            workflow = await self.reader.read(stored)
        if workflow is None:
            # Another request may have put it in line a moment ago: its workflow is
            # written with it, so wait for that first.
            try:
                await self.store.durable(job)
                stored = await self.store.workflow(job.job_id)
            except StateUnavailable:
                self.wait_for_state_file(job)
                raise
            if stored is None:
                self.registry.reject(job, "Its workflow was not found in the state file; "
                                          f"submit it again with PUT /startjob/{job.job_id}/.")
                return None
            workflow = await self.reader.read(stored)
        try:
            return await self.submit(job, gpu, workflow)
        except BackendError:
            if job.held:
                self.rest(gpu)
                self.wake.set()
            raise
