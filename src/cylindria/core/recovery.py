"""Recovering the truth from ComfyUI: after a restart, an outage, or lost events."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..config import Settings
from ..errors import ApiError, BackendUnavailable, GpuDrained, StateUnavailable
from .ports import GpuPort, QueueSnapshot
from .records import Job, isoformat
from .registry import Registry

log = logging.getLogger(__name__)

RESTART_DETAIL = ("Cylindria restarted; re-checking this job with ComfyUI (it is still "
                  "queued or running there, finished, or lost).")
# Why an automatic retry may have to wait: nothing was sent to any ComfyUI.
WAIT_FOR_A_GPU = (GpuDrained, StateUnavailable, BackendUnavailable)
# A cancel asked this long ago that ComfyUI still holds is sent again.
CANCEL_AGAIN_AFTER = 2.0


class Recovery:
    """Reconciliation with ComfyUI's queue and history, and restart recovery: the part
    of the jobs service (which builds on it) that follows what ComfyUI did."""

    registry: Registry
    gpus: Sequence[GpuPort]
    settings: Settings

    async def retry(self, job_id: str, gpu_choice: str | None = None,
                    automatic: bool = False) -> object:
        raise NotImplementedError

    def restore(self, jobs: list[Job], last_seq: int, evicted_through: int) -> None:
        """Take in the jobs the journal kept. Those in flight are re-checked with ComfyUI
        by the next reconciliation of their GPU; until then their detail says so."""
        lost: list[Job] = []
        for job in jobs:
            if job.gpu_id is None:
                continue  # held in Cylindria's queue, or refused: nothing to re-check
            if not job.terminal:
                job.unverified = True
                job.events_missed = True
                job.detail = RESTART_DETAIL
                if job.gpu_id >= len(self.gpus):
                    lost.append(job)
        self.registry.restore(jobs, last_seq, evicted_through)
        for job in lost:
            self.registry.lose(job, f"Cylindria restarted with {len(self.gpus)} GPU(s), so "
                                    f"GPU {job.gpu_id}, where this job ran, is not followed "
                                    f"any more. Run it again with POST /retryjob/{job.job_id}/.")

    def unreachable(self, gpu: GpuPort) -> None:
        """The GPU's ComfyUI did not answer a reconciliation: what its jobs do is not
        known until it does."""
        if gpu.unreachable_since is None:
            gpu.unreachable_since = self.registry.now()
        since = isoformat(gpu.unreachable_since)
        for job in self.registry.in_flight(gpu.index):
            if job.unverified and job.detail == RESTART_DETAIL:
                detail = (f"Cylindria restarted and GPU {gpu.index}'s ComfyUI does not answer "
                          f"yet (since {since}); the job stays in flight until it does.")
            else:
                detail = (f"GPU {gpu.index}'s ComfyUI has not answered since {since}; what "
                          f"became of this {job.state.value} job is unknown until it does.")
            self.registry.doubt(job, detail)

    async def reconcile(self, gpu: GpuPort) -> QueueSnapshot:
        """Bring this GPU's in-flight jobs in line with ComfyUI: one `/queue` reading,
        then `/history` for each job the queue no longer holds, which is settled from
        it, confirmed cancelled, or failed as lost once ComfyUI has forgotten it (and
        run again if CYLINDRIA_RETRY_LOST allows)."""
        registry = self.registry
        # /queue before /history: ComfyUI moves a job from one to the other under one
        # lock, so reading in this order never misses a job in between.
        snapshot = await gpu.comfy.queue()
        gpu.unreachable_since = None
        for prompt_id in snapshot.graphs:
            job = registry.by_prompt(prompt_id)
            if job is not None and job.planned_nodes is None:
                registry.set_plan(prompt_id, snapshot.plan(prompt_id) or frozenset())
        grace = self.settings.timing.lost_grace
        for job in registry.set_queue(gpu.index, snapshot.running, snapshot.pending):
            entry = await gpu.comfy.history(job.prompt_id)
            if entry is not None:
                registry.settle_from_history(job.prompt_id, entry)
            elif registry.confirm_removed(job) or registry.settle_by_events(job):
                continue
            elif job.missing_since is None:
                registry.note_missing(job, grace, _lost_detail(job))
            # Still nowhere after the grace period: ask /api/jobs to be sure it is not
            # merely between the two reads.
            elif (await gpu.comfy.job(job.prompt_id) is None
                  and registry.note_missing(job, grace, _lost_detail(job))):
                log.warning("gpu %d: job %s (prompt %s) lost by ComfyUI", gpu.index,
                            job.job_id, job.prompt_id)
                await self._after_lost(job)
        await self._press_cancels(gpu, snapshot)
        return snapshot

    async def settle_awaiting(self, gpu: GpuPort) -> None:
        """The jobs of this GPU whose end came by an event while earlier events may be
        lost: one history read each, without reading the whole queue."""
        registry = self.registry
        for job in [j for j in registry.awaiting_history.values() if j.gpu_id == gpu.index]:
            if job.terminal:
                registry.awaiting_history.pop(job.prompt_id, None)
                continue
            entry = await gpu.comfy.history(job.prompt_id)
            if entry is not None:
                registry.settle_from_history(job.prompt_id, entry)

    async def _press_cancels(self, gpu: GpuPort, snapshot: QueueSnapshot) -> None:
        """Jobs whose cancel was asked and that ComfyUI still holds: ask again (a cancel
        may have been lost to an outage). The interrupt names the prompt, so no other
        job is ever touched."""
        now = self.registry.now()
        for job in self.registry.in_flight(gpu.index):
            asked = job.cancel_requested_at
            # A fresh cancel is being sent by its own request; this is for those that
            # did not get through.
            if (asked is None or not job.confirmed
                    or (now - asked).total_seconds() < CANCEL_AGAIN_AFTER):
                continue
            if job.prompt_id in snapshot.running:
                await gpu.comfy.interrupt(job.prompt_id)
            elif job.prompt_id in snapshot.pending:
                await gpu.comfy.delete_pending(job.prompt_id)

    async def _after_lost(self, job: Job) -> None:
        if job.automatic_retries < self.settings.retry_lost:
            await self._retry_lost(job)

    async def retry_owed(self) -> None:
        """Make the automatic retries that had to wait, oldest first, until one must
        wait again."""
        for job in self.registry.retries_owed():
            if not job.terminal or job.automatic_retries >= self.settings.retry_lost:
                self.registry.owe_retry(job, False)
            elif not await self._retry_lost(job):
                return

    async def _retry_lost(self, job: Job) -> bool:
        """One automatic retry of a lost job; False when it has to wait (owed)."""
        try:
            await self.retry(job.job_id, automatic=True)
        except WAIT_FOR_A_GPU as exc:
            # Its GPU (a pinned job goes back to its own) is drained or not answering
            # yet, or the state file takes no writes: the retry is owed (on disk too)
            # and made as soon as it can be. Auto jobs simply wait in Cylindria's queue.
            if job.terminal and not job.retry_owed:
                self.registry.owe_retry(job, True)
                self.registry.set_detail(job, "ComfyUI lost this job; it will be run again "
                                              "automatically as soon as a GPU is ready.")
                log.info("job %s: automatic retry after it was lost waits for a GPU: %s",
                         job.job_id, exc.message)
            return False
        except ApiError as exc:
            self.registry.owe_retry(job, False)
            log.warning("job %s: automatic retry after it was lost failed: %s", job.job_id,
                        exc.message)
        return True


def _lost_detail(job: Job) -> str:
    retry = f"Run it again with POST /retryjob/{job.job_id}/."
    if not job.confirmed:
        return ("Cylindria stopped while submitting this job, and ComfyUI has no trace of "
                f"it: it never received it, or was restarted since. {retry}")
    if job.started_at is not None:
        # It may have finished while no event reached Cylindria: say so, never guess.
        return ("ComfyUI no longer knows this job, which had started running: it is "
                "neither queued nor in its history (ComfyUI was probably restarted), so "
                f"whether it finished, and its outputs, are unknown. {retry}")
    return ("ComfyUI no longer knows this job: it is neither queued nor in its history "
            f"(ComfyUI was probably restarted). {retry}")
