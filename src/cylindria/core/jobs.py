"""The jobs service: the one place that decides what a submission, a retry or a cancel
does, with the registry in memory and the journal behind it."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..config import Settings
from ..errors import (
    ApiError,
    BackendError,
    BackendTimeout,
    GpuDrained,
    InputGone,
    InvalidWorkflow,
    JobConflict,
    JobFinished,
    JobTakenElsewhere,
    NotRetryable,
    StateUnavailable,
    TooManyNodes,
    WorkflowRejected,
)
from . import placement
from .answers import Raw
from .carrying import Carrying, names_missing
from .elsewhere import id_holder, not_found
from .holding import Holding
from .outcomes import Outcome, Verdict, check_retryable, repeat_of
from .outcomes import conflict as _conflict
from .outcomes import repeat as _repeat
from .ports import GpuPort, InputFile, Inputs, Store
from .reading import WorkflowReader
from .records import Job, JobState
from .recovery import Recovery
from .registry import Registry
from .workflow import Workflow, rejection_detail, save_copy

log = logging.getLogger(__name__)

# Exit status of a process stopped by a fault hook (CYLINDRIA_FAULTS).
FAULT_EXIT = 70


class JobsService(Holding, Recovery, Carrying):
    """Submissions, duplicate PUTs, timeouts, adoption, retries and cancels; reading
    jobs from memory or the journal; reconciliation with ComfyUI, at restart too."""

    def __init__(self, registry: Registry, gpus: Sequence[GpuPort], settings: Settings,
                 store: Store, reader: WorkflowReader, inputs: Inputs) -> None:
        self.registry = registry
        self.gpus = gpus
        self.settings = settings
        self.store = store
        self.reader = reader
        self.inputs = inputs
        # Cancels still talking to a slow ComfyUI after their answer was sent.
        self._background: set[asyncio.Task[None]] = set()
        # Submissions in flight, by job id: a concurrent PUT of the same job waits on it.
        self._submissions: dict[str, asyncio.Future[None]] = {}
        self._init_holding()

    # -- lookups ------------------------------------------------------------------

    def gpu(self, raw: str, name: str = "GpuId") -> GpuPort:
        return self.gpus[placement.gpu_number(raw, len(self.gpus), name)]

    async def lookup(self, job_id: str, foresee: bool = True) -> Job | None:
        """The job from memory, or from the journal when memory let it go; with its
        forecast unless `foresee` is False (a queued job's forecast walks its GPU's
        line, which is wasted on a job about to change)."""
        job = self.registry.get(job_id)
        # With nodes sharing a database, memory also lets go of jobs it was overruled on.
        if job is None and (self.registry.evicted_through or self.store.clustered):
            job = await self.store.fetch(job_id)
        return None if job is None else self.foresee(job) if foresee else job

    async def find(self, job_id: str, advice: str = "", foresee: bool = True) -> Job:
        job = await self.lookup(job_id, foresee)
        if job is None:
            raise not_found(job_id, advice)
        return job

    async def page(self, states: Iterable[str] | None, gpu_id: int | None,
                   before: int | None, limit: int) -> list[Job]:
        """Newest first: from memory down to where it holds every finished job, then on
        from the journal."""
        floor = self.registry.evicted_through
        found = self.registry.page(states=states, gpu_id=gpu_id, before=before,
                                   limit=limit, floor=floor)
        upper = floor + 1 if before is None else min(before, floor + 1)
        if len(found) < limit and upper > 1:
            for job in await self.store.page(states, gpu_id, upper, limit - len(found)):
                found.append(self.registry.get(job.job_id) or job)
        return [self.foresee(job) for job in found]

    def drain(self, gpu: GpuPort, drained: bool) -> None:
        gpu.drained = drained

    # -- submission -----------------------------------------------------------------

    async def read(self, job_id: str, raw: Raw, names: Iterable[str] = ()) -> Workflow:
        """Decode and check a PUT /startjob body, large ones off the event loop (`names`:
        the files sent beside it). A body that is JSON but not a workflow Cylindria can
        run is recorded as a `rejected` job, as ComfyUI's refusals are."""
        try:
            return await self.reader.read(raw, frozenset(names))
        except (InvalidWorkflow, TooManyNodes) as exc:
            await self._record_refusal(job_id, raw, exc)
            raise

    async def _record_refusal(self, job_id: str, raw: Raw, exc: ApiError) -> None:
        existing = await self.lookup(job_id)
        if existing is not None and existing.state is not JobState.REJECTED:
            return  # an accepted job is never replaced by a refused one
        try:
            self.store.ensure_writable()
        except StateUnavailable:
            return
        job = self.registry.begin(job_id, None, str(uuid.uuid4()),
                                  _digest(raw), ())
        self.registry.reject(job, exc.message, error={"code": exc.code, "message": exc.message,
                                                      **exc.extra})

    async def close(self) -> None:
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.reader.close()

    async def start(self, job_id: str, gpu_choice: str | None, workflow: Workflow,
                    callback: str | None = None, priority: int = 0,
                    attached: Mapping[str, InputFile] | None = None) -> Outcome:
        """Submit a job, or answer a repeat of it from the record. `gpu_choice` is the
        request's GpuId: a number, "auto", or None for the configured default. `auto`
        jobs are held in Cylindria's queue until a GPU has room (at once if one has).
        `attached`: files sent beside the workflow, in the store already, by name."""
        workflow, inputs = await self._bind_inputs(workflow, attached or {})
        try:
            return await self._place(job_id, gpu_choice, workflow, callback, priority, inputs)
        except JobTakenElsewhere:
            # Nodes sharing a database: another node wrote a job of this id first (ids
            # are unique across the nodes), so the PUT is a repeat of that one.
            return repeat_of(await id_holder(self, job_id), workflow.fingerprint)

    async def _place(self, job_id: str, gpu_choice: str | None, workflow: Workflow,
                     callback: str | None, priority: int,
                     inputs: list[dict[str, Any]]) -> Outcome:
        try:
            existing = await self.lookup(job_id)
        except StateUnavailable:
            # Nodes sharing a database that cannot be read: the write of the new job
            # says why it cannot be kept (with its own sentence).
            existing = self.registry.get(job_id)
        if existing is not None and existing.state is not JobState.REJECTED:
            if existing.held:
                return repeat_of(existing, workflow.fingerprint)
            # A repeat is answered from the record, wherever the job was placed.
            gpu, auto = self.gpus[existing.gpu_id], existing.auto
        elif self._is_auto(gpu_choice):
            return await self._hold(job_id, workflow, callback, priority, inputs)
        else:
            gpu, auto = self._pinned(gpu_choice), False
        try:
            return await self._start(job_id, gpu, auto, workflow, callback, existing, inputs)
        except ApiError as exc:
            exc.reply.setdefault("gpu_id", gpu.index)
            raise

    def _choice(self, choice: str | None) -> str:
        """The request's GpuId, or the configured default when it has none."""
        return str(self.settings.default_gpu) if choice is None else choice

    def _is_auto(self, choice: str | None) -> bool:
        return self._choice(choice).strip().lower() == "auto"

    def _pinned(self, choice: str | None) -> GpuPort:
        """The GPU a new attempt is pinned to (GpuId=n): it must take new jobs."""
        gpu = self.gpu(self._choice(choice))
        if gpu.drained:
            raise GpuDrained(f"GPU {gpu.index} is drained and takes no new jobs; use another "
                             "GpuId, GpuId=auto, or POST /gpus/{n}/undrain.")
        return gpu

    async def _start(self, job_id: str, gpu: GpuPort, auto: bool, workflow: Workflow,
                     callback: str | None, existing: Job | None,
                     inputs: list[dict[str, Any]]) -> Outcome:
        registry = self.registry
        digest = workflow.fingerprint
        if existing is not None and existing.state is not JobState.REJECTED:
            if existing.fingerprint != digest:
                raise _conflict(existing)
            pending = self._submissions.get(job_id)
            if pending is not None:
                # The same PUT is in flight: answer with its outcome, never submit twice.
                await asyncio.shield(pending)
                return _repeat(registry.get(job_id) or existing)
            return _repeat(existing)
        self.store.ensure_writable()

        if existing is not None and (existing.error or {}).get("code") == "backend_timeout":
            adopted = await self._adopt_uncertain(existing, workflow, callback)
            if adopted is not None:
                return adopted

        self.store.remember_workflow(job_id, workflow.data)
        try:
            job = registry.begin(job_id, gpu.index, str(uuid.uuid4()), digest, workflow.nodes,
                                 callback_url=callback, auto=auto, inputs=inputs)
        except JobConflict as exc:
            # Another PUT of this job_id got in while ComfyUI was being asked.
            if exc.job.fingerprint != digest:
                raise _conflict(exc.job) from None
            return _repeat(exc.job)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submissions[job_id] = done
        try:
            if self.settings.dev_mode:
                await save_copy(self.settings.dev_save_dir, job_id, workflow)
            return await self.submit(job, gpu, workflow)
        finally:
            self._submissions.pop(job_id, None)
            done.set_result(None)

    async def submit(self, job: Job, gpu: GpuPort, workflow: Workflow) -> Outcome:
        """Send a recorded attempt to ComfyUI: the journal holds it first, so a crash can
        never leave a prompt in ComfyUI that Cylindria does not know."""
        registry = self.registry
        job.costs = workflow.costs
        try:
            await self.store.durable(job)
        except StateUnavailable as exc:
            if job.auto and job.placement is not None:
                # Taken from Cylindria's queue, whose record is on disk already: it
                # waits there again rather than being refused.
                self.wait_for_state_file(job)
            else:
                registry.reject(job, exc.message,
                                error={"code": exc.code, "message": exc.message})
            raise
        self._fault("crash-before-submit")
        for first in (True, False):
            try:
                data, names = await self._with_inputs(job, gpu, workflow)
            except (BackendError, InputGone) as exc:
                self._not_taken(job, gpu, exc)
                raise
            try:
                answer = await gpu.comfy.submit(data, gpu.client_id, job.prompt_id,
                                                timeout=self.settings.timing.submit_timeout)
            except BackendTimeout as exc:
                return await self._after_timeout(job, gpu, exc)
            except BackendError as exc:
                self._not_taken(job, gpu, exc)
                raise
            if first and not answer.accepted and names_missing(answer.body, names):
                # Its ComfyUI lost files it was given (a restart with a new input
                # folder): they are uploaded again, once.
                log.warning("job %s: gpu %d no longer has its input files; uploading them "
                            "again", job.job_id, gpu.index)
                self.inputs.forget(gpu.index, [item["id"] for item in job.inputs or ()])
                continue
            break
        self._fault("crash-after-submit")

        if answer.accepted:
            registry.confirm(job, answer.body.get("node_errors") or None)
            if job.cancel_requested_at is not None:
                # Cancelled while ComfyUI was still answering the submission.
                await self._cancel_upstream(job)
            log.info("job %s accepted on gpu %d as prompt %s", job.job_id, gpu.index,
                     job.prompt_id)
            await self._settled(job)
            return Outcome(job, Verdict.ACCEPTED, job.detail)

        detail = rejection_detail(answer.body)
        node_errors = answer.body.get("node_errors") or {}
        comfy_error = answer.body.get("error") if isinstance(answer.body.get("error"), dict) else {}
        registry.reject(job, detail, node_errors=node_errors or None,
                        error={"code": WorkflowRejected.code, **comfy_error})
        raise WorkflowRejected(detail, reply={"node_errors": node_errors,
                                              "comfy_error": comfy_error})

    def _not_taken(self, job: Job, gpu: GpuPort, exc: ApiError) -> None:
        """ComfyUI never got the job (it refused the connection, an upload failed, or an
        input is gone): a job from Cylindria's queue goes back in line, others fail."""
        if job.auto and job.placement is not None and not isinstance(exc, InputGone):
            # Dispatched from Cylindria's queue and refused before ComfyUI took it:
            # back in line, for another GPU or this one later.
            self.registry.rehold(job, f"GPU {gpu.index} could not take it ({exc.message}); "
                                      "back in Cylindria's queue.")
        else:
            self.registry.reject(job, exc.message,
                                 error={"code": exc.code, "message": exc.message})

    async def _settled(self, job: Job) -> None:
        """Wait for the accepted state to be on disk before answering. If the journal
        fails now, the submission itself is on disk already: after a crash the job is
        found in ComfyUI and followed, so the answer stays a yes."""
        try:
            await self.store.durable(job)
        except StateUnavailable:
            log.warning("job %s: accepted by ComfyUI, but its accepted state could not be "
                        "written; it was recorded as submitted", job.job_id)

    async def _after_timeout(self, job: Job, gpu: GpuPort, exc: BackendTimeout) -> Outcome:
        """POST /prompt timed out: ComfyUI may have queued the job before it stalled.
        Ask it, so the job is neither lost (queued but unknown to us) nor run twice."""
        try:
            queued = await _knows(gpu, job.prompt_id)
        except BackendError as again:
            log.warning("job %s: submission timed out and ComfyUI cannot be asked (%s)",
                        job.job_id, again.message)
            queued = None
        if queued:
            self.registry.confirm(job)
            log.info("job %s: submission timed out but ComfyUI had queued prompt %s",
                     job.job_id, job.prompt_id)
            await self._settled(job)
            return Outcome(job, Verdict.ACCEPTED,
                           "ComfyUI was slow to answer, but it had queued the job.")
        detail = exc.message
        if queued is None:
            detail += (" Cylindria could not check whether ComfyUI queued it; a PUT of the "
                       "same job_id later will check again before submitting anything.")
        self.registry.reject(job, detail, error={"code": exc.code, "message": detail})
        raise BackendTimeout(detail)

    async def _adopt_uncertain(self, old: Job, workflow: Workflow,
                               callback: str | None) -> Outcome | None:
        """A PUT again after a timed-out submission: if ComfyUI did queue that attempt
        after all, track it (on the GPU it went to) instead of submitting a second copy."""
        if old.fingerprint != workflow.fingerprint:
            return None
        gpu = self.gpus[old.gpu_id]
        try:
            if not await _knows(gpu, old.prompt_id):
                return None
        except BackendError:
            return None
        self.store.remember_workflow(old.job_id, workflow.data)
        job = self.registry.begin(old.job_id, gpu.index, old.prompt_id, workflow.fingerprint,
                                  workflow.nodes, callback_url=callback, auto=old.auto,
                                  inputs=old.inputs)
        self.registry.confirm(job)
        await self._settled(job)
        return Outcome(job, Verdict.ACCEPTED,
                       "The earlier attempt reached ComfyUI after all; tracking it instead of "
                       "submitting again.")

    # -- retries ----------------------------------------------------------------------

    async def retry(self, job_id: str, gpu_choice: str | None = None,
                    automatic: bool = False) -> Outcome:
        """Run a failed, cancelled or rejected job's stored workflow again, under the
        same job id, as a new attempt. Without `gpu_choice` it is placed as the job
        was: on its GPU, or by `auto`."""
        job = await self.find(job_id)
        most = self.settings.max_attempts
        check_retryable(job, most)
        ids = [item["id"] for item in job.inputs or ()]
        kept = await self.inputs.lookup(ids) if ids else {}  # this node's, or the database's
        gone = [item for item in job.inputs or () if item["id"] not in kept]
        if gone:
            raise InputGone(
                f"Job {job_id!r} uses the input {gone[0]['name']!r} ({gone[0]['id']}), which "
                "is no longer stored (deleted, or past its retention); submit the job again "
                "with the file.", extra={"input_id": gone[0]["id"]},
                reply={"gpu_id": job.gpu_id})
        stored = await self.store.workflow(job_id)
        if stored is None:
            raise NotRetryable(f"Job {job_id!r} has no stored workflow to run again (it was "
                               "refused before it could be recorded); submit it with PUT "
                               f"/startjob/{job_id}/.", reply={"gpu_id": job.gpu_id})
        if gpu_choice is None:
            gpu_choice = "auto" if job.auto or job.gpu_id is None else str(job.gpu_id)
        if self._is_auto(gpu_choice):
            self.store.ensure_writable()
            workflow = await self.reader.read(stored)
            check_retryable(job, most)  # a concurrent retry may have started meanwhile
            if self.registry.get(job_id) is None:
                self.registry.restore([job])
            job.auto = True
            job.models = workflow.models
            self.registry.retry(job, None, str(uuid.uuid4()), workflow.nodes,
                                automatic=automatic)
            log.info("job %s: attempt %d held for a GPU%s", job_id, job.attempt,
                     " (automatic, after it was lost)" if automatic else "")
            return await self._line_up(job, workflow)
        gpu = self._pinned(gpu_choice)
        check_retryable(job, most)  # a concurrent retry may have started meanwhile
        if self.registry.get(job_id) is None:
            self.registry.restore([job])
        job.auto = False
        workflow = await self.reader.read(stored)
        check_retryable(job, most)
        self.registry.retry(job, gpu.index, str(uuid.uuid4()), workflow.nodes,
                            automatic=automatic)
        log.info("job %s: attempt %d on gpu %d%s", job_id, job.attempt, gpu.index,
                 " (automatic, after it was lost)" if automatic else "")
        try:
            return await self.submit(job, gpu, workflow)
        except ApiError as exc:
            exc.reply.setdefault("gpu_id", gpu.index)
            raise

    # -- cancellation -------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        """Ask for a job to stop; its state changes only on ComfyUI's word."""
        # Its forecast is made for the answer, once the cancel went through: most jobs
        # are cancelled by then, and need none.
        job = await self.find(job_id, foresee=False)
        if job.terminal:
            raise JobFinished(job, f"Job {job_id!r} is already {job.state.value}; there is "
                                   "nothing to cancel.")
        if job.held:
            if self.store.clustered and not await self.store.take_back(job_id):
                # Another node took it from the shared line a moment ago: it is that
                # node's to cancel now (the caller passes the cancel on).
                self.registry.let_go(job)
                raise not_found(job_id)
            self.registry.cancel_held(job)
            return job
        self.registry.request_cancel(job)
        if job.confirmed:
            # Answered within `cancel_wait` whatever ComfyUI does; the rest goes on behind.
            task = asyncio.get_running_loop().create_task(self._cancel_upstream(job),
                                                          name=f"cancel-{job_id}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            done, _ = await asyncio.wait({task}, timeout=self.settings.timing.cancel_wait)
            if not done:
                self.registry.set_detail(job, "Cancel requested; ComfyUI is not answering, "
                                              "so Cylindria keeps trying.")
        return self.foresee(job)

    async def _cancel_upstream(self, job: Job) -> None:
        """Drop the job from ComfyUI's queue, then ask ComfyUI about this one prompt and
        act on its answer: unknown (deleted before it ran), the job is cancelled; running,
        it is interrupted (the interrupt names the prompt, so no other job is touched);
        finished meanwhile, it is settled from its history. Never the whole queue: with
        thousands waiting, reading it would make each cancel cost in proportion. ComfyUI
        looks at its queue before its history, as `reconcile` does, so a job ending in
        between is not missed; the poller presses a cancel that did not get through."""
        gpu = self.gpus[job.gpu_id]
        # A retry may start a new attempt while this runs: act on this one only.
        prompt_id = job.prompt_id
        try:
            await gpu.comfy.delete_pending(prompt_id)
            found = await gpu.comfy.job(prompt_id)
            if job.prompt_id != prompt_id:
                return
            status = None if found is None else found.get("status")
            if found is None:
                self.registry.confirm_removed(job)
            elif status == "in_progress":
                await gpu.comfy.interrupt(prompt_id)
            elif status != "pending":
                entry = await gpu.comfy.history(prompt_id)
                if entry is not None:
                    self.registry.settle_from_history(prompt_id, entry)
        except BackendError as exc:
            # The poller keeps trying to settle the job; the cancel stays requested.
            log.warning("cancel of job %s: ComfyUI did not answer (%s)", job.job_id,
                        exc.message)

    def _fault(self, name: str) -> None:
        if name in self.settings.faults:
            log.critical("fault %s: stopping the process now, as CYLINDRIA_FAULTS asks",
                         name)
            os._exit(FAULT_EXIT)


async def _knows(gpu: GpuPort, prompt_id: str) -> bool:
    """Whether ComfyUI holds this prompt id: queued, running or in history."""
    if (await gpu.comfy.queue()).holds(prompt_id):
        return True
    return await gpu.comfy.job(prompt_id) is not None


def _digest(raw: Raw) -> str:
    """The fingerprint of a body that is no workflow: the hash of its bytes."""
    digest = hashlib.sha256()
    for chunk in raw if isinstance(raw, list) else (raw,):
        digest.update(chunk.encode() if isinstance(chunk, str) else chunk)
    return digest.hexdigest()
