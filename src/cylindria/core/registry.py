"""The job registry: every job by id and prompt id, the state machine, and its queries."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from ..errors import JobConflict
from .records import IN_FLIGHT, TRANSITIONS, Job, JobState, error_summary, utcnow

log = logging.getLogger(__name__)


Listener = Callable[[Job], None]


class Registry:
    """Every job Cylindria knows, by job id and by ComfyUI prompt id.

    All mutation goes through methods that enforce the state machine and stamp
    `updated_at`; each change is announced to subscribers (a journal, live views).
    """

    def __init__(self, clock: Callable[[], datetime] = utcnow,
                 max_jobs: int = 50_000) -> None:
        self._jobs: dict[str, Job] = {}
        self._by_prompt: dict[str, Job] = {}
        self._clock = clock
        self._max_jobs = max_jobs
        self._subscribers: list[Listener] = []
        self._seq = 0

    def now(self) -> datetime:
        return self._clock()

    # -- lookup and queries ---------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def by_prompt(self, prompt_id: str | None) -> Job | None:
        if prompt_id is None:
            return None
        return self._by_prompt.get(prompt_id)

    def __len__(self) -> int:
        return len(self._jobs)

    def in_flight(self, gpu_id: int | None = None) -> list[Job]:
        return [j for j in self._jobs.values()
                if j.state in IN_FLIGHT and (gpu_id is None or j.gpu_id == gpu_id)]

    def in_flight_count(self) -> int:
        return sum(1 for j in self._jobs.values() if j.state in IN_FLIGHT)

    def load(self, gpu_id: int) -> int:
        """Jobs queued or running on this GPU."""
        return len(self.in_flight(gpu_id))

    def queued_count(self, gpu_id: int) -> int:
        return sum(1 for j in self.in_flight(gpu_id) if j.state is JobState.QUEUED)

    def running_on(self, gpu_id: int) -> Job | None:
        for job in self._jobs.values():
            if job.gpu_id == gpu_id and job.state is JobState.RUNNING:
                return job
        return None

    def page(self, *, states: set[str] | None = None, gpu_id: int | None = None,
             before: int | None = None, limit: int = 50) -> list[Job]:
        """Newest first, optionally filtered; `before` is a job's `seq` (a cursor)."""
        found: list[Job] = []
        for job in reversed(self._jobs.values()):
            if before is not None and job.seq >= before:
                continue
            if states is not None and job.state.value not in states:
                continue
            if gpu_id is not None and job.gpu_id != gpu_id:
                continue
            found.append(job)
            if len(found) >= limit:
                break
        return found

    def subscribe(self, listener: Listener) -> None:
        self._subscribers.append(listener)

    # -- submission -----------------------------------------------------------

    def begin(self, job_id: str, gpu_id: int, prompt_id: str, fingerprint: str,
              nodes: Iterable[str], callback_url: str | None = None) -> Job:
        """Record a new submission before ComfyUI is asked, so that events for its
        prompt id that race ahead of the HTTP answer are never lost."""
        old = self._jobs.get(job_id)
        if old is not None:
            if old.state is not JobState.REJECTED:
                raise JobConflict(old)
            # Re-inserted below so that dict order stays submission order.
            del self._jobs[job_id]
            self._by_prompt.pop(old.prompt_id, None)
        now = self._clock()
        self._seq += 1
        job = Job(job_id=job_id, gpu_id=gpu_id, fingerprint=fingerprint,
                  prompt_id=prompt_id, nodes=frozenset(nodes), submitted_at=now,
                  updated_at=now, seq=self._seq, callback_url=callback_url)
        self._jobs[job_id] = job
        self._by_prompt[prompt_id] = job
        self._trim()
        self._changed(job)
        return job

    def confirm(self, job: Job, node_errors: dict[str, Any] | None = None) -> None:
        job.confirmed = True
        if node_errors:
            job.node_errors = node_errors
        if job.state is JobState.QUEUED and job.detail.startswith("Submitting"):
            job.detail = "Queued on ComfyUI."
            if node_errors:
                job.detail += (" Some outputs failed validation and will not run: "
                               + ", ".join(sorted(node_errors)) + ".")
        self._touch(job)

    def reject(self, job: Job, detail: str, node_errors: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> None:
        if self._move(job, JobState.REJECTED):
            job.detail = detail
            job.node_errors = node_errors
            job.error = error
            job.finished_at = self._clock()
            job.queue_position = None
            self._touch(job)

    # -- events from ComfyUI --------------------------------------------------

    def on_start(self, prompt_id: str) -> None:
        job = self.by_prompt(prompt_id)
        if job is None:
            return
        self._start(job)
        self._touch(job)

    def on_cached(self, prompt_id: str, nodes: Iterable[str]) -> None:
        job = self.by_prompt(prompt_id)
        if job is None or job.terminal:
            return
        self._start(job)
        cached = {str(n) for n in nodes} & job.nodes
        job.done_nodes |= cached
        job.cached_nodes |= cached
        self._touch(job)

    def on_executing(self, prompt_id: str | None, node: str, gpu_id: int | None = None) -> None:
        job = self.by_prompt(prompt_id)
        if job is None and prompt_id is None and gpu_id is not None:
            # The reconnect hint carries no prompt id: it is about the GPU's running job.
            job = self.running_on(gpu_id)
        if job is None or job.terminal:
            return
        self._start(job)
        if job.current_node is not None and job.current_node != node:
            job.done_nodes.add(job.current_node)
        job.current_node = node
        if job.node_progress and job.node_progress.get("node") != node:
            job.node_progress = None
        job.detail = f"Running node {node}."
        self._touch(job)

    def on_progress(self, prompt_id: str, node: str | None, value: float, maximum: float) -> None:
        job = self.by_prompt(prompt_id)
        if job is None or job.terminal:
            return
        self._start(job)
        if node is not None and job.current_node != node:
            if job.current_node is not None:
                job.done_nodes.add(job.current_node)
            job.current_node = node
        job.node_progress = {"node": node, "value": value, "max": maximum}
        self._touch(job)

    def on_executed(self, prompt_id: str, node: str, output: Any) -> None:
        job = self.by_prompt(prompt_id)
        if job is None or job.terminal:
            return
        self._start(job)
        job.done_nodes.add(node)
        if output is not None:
            job.outputs[node] = output
        self._touch(job)

    def on_success(self, prompt_id: str) -> None:
        job = self.by_prompt(prompt_id)
        if job is None:
            return
        if self._move(job, JobState.COMPLETED):
            detail = "Completed."
            if job.cancel_requested_at is not None:
                detail = ("Completed: the cancel request came too late, ComfyUI had already "
                          "finished the job.")
            self._finish(job, detail)

    def on_error(self, prompt_id: str, data: dict[str, Any]) -> None:
        job = self.by_prompt(prompt_id)
        if job is None:
            return
        if self._move(job, JobState.FAILED):
            job.error = error_summary(data)
            message = str(data.get("exception_message", "")).strip()
            node = data.get("node_id")
            kind = data.get("node_type")
            job.detail = (f"Failed in node {node} ({kind}): {message}" if node is not None
                          else f"Failed: {message}")
            self._finish(job, None)

    def on_interrupted(self, prompt_id: str, data: dict[str, Any]) -> None:
        job = self.by_prompt(prompt_id)
        if job is None:
            return
        if job.cancel_requested_at is not None:
            if self._move(job, JobState.CANCELLED):
                self._finish(job, "Cancelled: ComfyUI interrupted it at node "
                                  f"{data.get('node_id')}.")
            return
        if self._move(job, JobState.FAILED):
            job.error = {"type": "interrupted", "message": "Execution was interrupted.",
                         "node_id": data.get("node_id"), "node_type": data.get("node_type")}
            self._finish(job, f"Interrupted on ComfyUI at node {data.get('node_id')}; "
                              "Cylindria did not ask for it.")

    # -- cancellation -----------------------------------------------------------

    def request_cancel(self, job: Job) -> None:
        """Note that the client asked to cancel; the state changes only when ComfyUI
        confirms (the job left its queue, or it reported the interruption)."""
        if job.terminal:
            return
        if job.cancel_requested_at is None:
            job.cancel_requested_at = self._clock()
            job.detail = "Cancel requested; waiting for ComfyUI to confirm."
            self._touch(job)

    def confirm_removed(self, job: Job) -> bool:
        """ComfyUI's queue no longer holds a job whose cancel was asked, and it never
        ran to history: it was deleted from the queue."""
        if job.cancel_requested_at is None:
            return False
        if self._move(job, JobState.CANCELLED):
            self._finish(job, "Cancelled: removed from ComfyUI's queue before it ran.")
            return True
        return False

    def set_webhook(self, job: Job, **fields: Any) -> None:
        job.webhook = {**(job.webhook or {}), **fields}
        self._touch(job)

    # -- reconciliation by polling -------------------------------------------

    def set_queue(self, gpu_id: int, running: list[str], pending: list[str]) -> list[Job]:
        """Apply one `/queue` reading (pending already in execution order).

        Returns the in-flight jobs of this GPU that the queue no longer holds:
        they finished (look in history) or were lost.
        """
        positions = {pid: 0 for pid in running}
        for n, pid in enumerate(pending, start=1):
            positions.setdefault(pid, n)
        gone: list[Job] = []
        for job in self.in_flight(gpu_id):
            pos = positions.get(job.prompt_id)
            if pos is None:
                if job.confirmed:
                    gone.append(job)
                continue
            job.missing_since = None
            changed = job.queue_position != pos
            job.queue_position = pos
            if pos == 0:
                changed |= self._start(job)
            elif job.state is JobState.QUEUED:
                detail = f"Queued on ComfyUI, position {pos}."
                changed |= job.detail != detail
                job.detail = detail
            if changed:
                self._touch(job)
        return gone

    def set_plan(self, prompt_id: str, planned: frozenset[str]) -> None:
        job = self.by_prompt(prompt_id)
        if job is not None and planned and job.planned_nodes != planned:
            job.planned_nodes = planned
            # The plan is what progress counts against: a change subscribers see.
            self._touch(job)

    def settle_from_history(self, prompt_id: str, entry: dict[str, Any]) -> None:
        """Settle a job from its ComfyUI history entry (events may have been lost)."""
        job = self.by_prompt(prompt_id)
        if job is None or job.terminal:
            return
        outputs = entry.get("outputs")
        if isinstance(outputs, dict):
            for node, output in outputs.items():
                job.outputs.setdefault(str(node), output)
        status = entry.get("status") or {}
        messages = status.get("messages") or []
        names = [m[0] for m in messages if isinstance(m, list | tuple) and m]
        for name, payload in (m for m in messages if isinstance(m, list | tuple) and len(m) == 2):
            if name == "execution_cached" and isinstance(payload, dict):
                self.on_cached(prompt_id, payload.get("nodes") or [])
        if status.get("status_str") == "success" or status.get("completed") is True:
            self.on_success(prompt_id)
            return
        terminal = dict(messages[-1][1]) if messages and len(messages[-1]) == 2 else {}
        if names and names[-1] == "execution_interrupted":
            self.on_interrupted(prompt_id, terminal)
        elif names and names[-1] == "execution_error":
            self.on_error(prompt_id, terminal)
        else:
            self.on_error(prompt_id, {"exception_message": "ComfyUI recorded the job as "
                                      f"{status.get('status_str', 'unfinished')!r}."})

    def note_missing(self, job: Job, grace_seconds: float, detail: str) -> bool:
        """The job is neither queued nor in history. After `grace_seconds` of that,
        fail it with `detail`. Returns True when it was failed."""
        now = self._clock()
        if job.terminal:
            return False
        if job.missing_since is None:
            job.missing_since = now
            return False
        if (now - job.missing_since).total_seconds() < grace_seconds:
            return False
        if self._move(job, JobState.FAILED):
            job.error = {"type": "lost", "message": detail, "node_id": None,
                         "node_type": None}
            self._finish(job, detail)
            return True
        return False

    # -- internals ------------------------------------------------------------

    def _move(self, job: Job, new: JobState) -> bool:
        if new is job.state:
            return False
        if new not in TRANSITIONS[job.state]:
            log.debug("job %s: ignoring %s -> %s", job.job_id, job.state, new)
            return False
        job.state = new
        return True

    def _start(self, job: Job) -> bool:
        if job.state is JobState.QUEUED and self._move(job, JobState.RUNNING):
            job.started_at = self._clock()
            job.queue_position = 0
            job.missing_since = None
            job.detail = "Running."
            return True
        return False

    def _finish(self, job: Job, detail: str | None) -> None:
        """The job ended on ComfyUI's word (not a refusal at submission): stamp it,
        and owe its callback a delivery, announced with the same change."""
        job.finished_at = self._clock()
        if job.callback_url is not None:
            job.webhook = {"url": job.callback_url, "state": "pending", "attempts": 0,
                           "last_error": None, "delivered_at": None}
        if job.started_at is None:
            job.started_at = job.finished_at
        job.queue_position = None
        job.node_progress = None
        job.current_node = None
        if detail is not None:
            job.detail = detail
        self._touch(job)

    def _touch(self, job: Job) -> None:
        job.updated_at = self._clock()
        self._changed(job)

    def _changed(self, job: Job) -> None:
        for listener in self._subscribers:
            try:
                listener(job)
            except Exception:
                log.exception("registry subscriber failed on job %s", job.job_id)

    def _trim(self) -> None:
        if len(self._jobs) <= self._max_jobs:
            return
        # Dicts keep insertion order: drop the oldest finished jobs first.
        excess = len(self._jobs) - self._max_jobs
        for job_id in [j.job_id for j in self._jobs.values() if j.terminal][:excess]:
            old = self._jobs.pop(job_id)
            self._by_prompt.pop(old.prompt_id, None)
