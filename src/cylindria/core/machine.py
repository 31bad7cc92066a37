"""How ComfyUI's word moves a job: its events, a cancel, and what reconciliation finds."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from .estimates import RunTimes, Timeline
from .records import Job, JobState, error_summary

log = logging.getLogger(__name__)


class JobMachine:
    """The state machine's moves; the registry, which subclasses it, stores the jobs,
    keeps the indexes a move changes, and announces every change."""

    _clock: Callable[[], datetime]
    run_times: RunTimes
    # Jobs whose end an event told while their earlier events may be lost, by prompt
    # id: each waits for one read of its history.
    awaiting_history: dict[str, Job]

    def by_prompt(self, prompt_id: str | None) -> Job | None:
        raise NotImplementedError

    def running_on(self, gpu_id: int) -> Job | None:
        raise NotImplementedError

    def in_flight(self, gpu_id: int) -> list[Job]:
        raise NotImplementedError

    def _move(self, job: Job, new: JobState) -> bool:
        raise NotImplementedError

    def _touch(self, job: Job, lasting: bool = True) -> None:
        raise NotImplementedError

    # -- events from ComfyUI --------------------------------------------------

    def missed_events(self, gpu_id: int) -> None:
        """Events of this GPU's jobs in flight may have been lost (its listener was
        away): each one's end is to be read from ComfyUI's history."""
        for job in self.in_flight(gpu_id):
            job.events_missed = True

    def _from_history(self, job: Job, how: str, data: dict[str, Any]) -> bool:
        """An end told by an event, for a job whose earlier events may be lost: kept
        until the reconciliation reads the history, which has all of its outputs (the
        listener wakes it at the job's last event). True when the end waits."""
        if not job.events_missed or job.terminal:
            return False
        job.ending = (how, data)
        self.awaiting_history[job.prompt_id] = job
        job.detail = "Finished on ComfyUI; reading its outputs from ComfyUI's history."
        self._touch(job, lasting=False)
        return True

    def _heard_in_full(self, job: Job) -> None:
        """Nothing of the attempt is missing any more (its history was read, or a new
        attempt begins): its end is taken as the events tell it."""
        job.events_missed, job.ending = False, None
        self.awaiting_history.pop(job.prompt_id, None)

    def settle_by_events(self, job: Job) -> bool:
        """The end the events told, when the history has none to give (it was cleared
        in between): the outputs are those the events told. True if there was one."""
        if job.ending is None or job.terminal:
            return False
        how, data = job.ending
        self._heard_in_full(job)
        log.warning("job %s: ComfyUI's history has no entry for prompt %s; its end is "
                    "taken from the events received", job.job_id, job.prompt_id)
        if how == "success":
            self.on_success(job.prompt_id)
        else:
            self.on_error(job.prompt_id, data)
        return True

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
        if job.timeline is not None:
            job.timeline.cached(cached)
        if cached:
            job.done_nodes = (job.done_nodes or set()) | cached
            job.cached_nodes = (job.cached_nodes or set()) | cached
        self._touch(job)

    def on_executing(self, prompt_id: str | None, node: str, gpu_id: int | None = None) -> None:
        job = self.by_prompt(prompt_id)
        if job is None and prompt_id is None and gpu_id is not None:
            # The reconnect hint carries no prompt id: it is about the GPU's running job.
            job = self.running_on(gpu_id)
        if job is None or job.terminal:
            return
        started = self._start(job)
        if job.current_node is not None and job.current_node != node:
            _mark_done(job, job.current_node)
        job.current_node = node
        if job.timeline is not None:
            job.timeline.executing(node, self._moment())
        if job.node_progress and job.node_progress.get("node") != node:
            job.node_progress = None
        job.detail = f"Running node {node}."
        # Where a running job is, a restart learns again from ComfyUI's next event.
        self._touch(job, lasting=started)

    def on_progress(self, prompt_id: str, node: str | None, value: float, maximum: float) -> None:
        job = self.by_prompt(prompt_id)
        if job is None or job.terminal:
            return
        started = self._start(job)
        if node is not None and job.current_node != node:
            if job.current_node is not None:
                _mark_done(job, job.current_node)
            job.current_node = node
        job.node_progress = {"node": node, "value": value, "max": maximum}
        if job.timeline is not None:
            job.timeline.progress(node, value, maximum, self._moment())
        self._touch(job, lasting=started)

    def on_executed(self, prompt_id: str, node: str, output: Any) -> None:
        job = self.by_prompt(prompt_id)
        if job is None or job.terminal:
            return
        started = self._start(job)
        _mark_done(job, node)
        if output is not None:
            job.outputs = {**(job.outputs or {}), node: output}
        # Outputs of a running job need not be on disk: after a restart, ComfyUI's
        # history gives them all again (and a large text is then written once).
        self._touch(job, lasting=started)

    def on_success(self, prompt_id: str) -> None:
        job = self.by_prompt(prompt_id)
        if job is None:
            return
        if self._from_history(job, "success", {}):
            return
        if job.timeline is not None:
            job.timeline.finished(self._moment(), success=True)
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
        if self._from_history(job, "error", data):
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
        if job.started_at is None:
            detail = "Cancelled: removed from ComfyUI's queue before it ran."
        else:
            # It had run: ComfyUI lost it (a restart) before the cancel could reach it.
            detail = (f"Cancelled: it had started ({int(job.progress * 100)}% done) and "
                      "ComfyUI no longer has it nor any record of it (ComfyUI was probably "
                      "restarted), so it stopped there.")
        if self._move(job, JobState.CANCELLED):
            self._finish(job, detail)
            return True
        return False

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
                # Not yet confirmed: its POST /prompt may still be on the way, unless the
                # job was loaded at start-up, and then it is either in history or lost.
                if job.confirmed or job.unverified:
                    gone.append(job)
                continue
            # Only a job's state and what ComfyUI confirmed must reach the journal; a
            # position is read again after a restart.
            lasting = not job.confirmed or job.unverified
            job.confirmed = True
            job.missing_since = None
            changed = job.queue_position != pos or lasting
            if job.unverified:
                # Loaded at start-up and found where the journal left it.
                job.unverified = False
                changed = True
                if job.state is JobState.RUNNING:
                    job.detail = (f"Running node {job.current_node}." if job.current_node
                                  else "Running.")
            job.queue_position = pos
            if pos == 0:
                lasting |= self._start(job)
            elif job.state is JobState.QUEUED:
                detail = f"Queued on ComfyUI, position {pos}."
                changed |= job.detail != detail
                job.detail = detail
            if changed or lasting:
                self._touch(job, lasting=lasting)
        return gone

    def set_plan(self, prompt_id: str, planned: frozenset[str]) -> None:
        job = self.by_prompt(prompt_id)
        if job is not None and planned and job.planned_nodes != planned:
            job.planned_nodes = planned
            # The plan is what progress counts against: a change subscribers see.
            self._touch(job, lasting=False)

    def settle_from_history(self, prompt_id: str, entry: dict[str, Any]) -> None:
        """Settle a job from its ComfyUI history entry (events may have been lost)."""
        job = self.by_prompt(prompt_id)
        if job is None or job.terminal:
            return
        job.unverified = False
        self._heard_in_full(job)
        outputs = entry.get("outputs")
        if isinstance(outputs, dict):
            # The history holds every output of the prompt: it is the truth, whatever
            # the events that reached Cylindria told.
            job.outputs = {str(node): output for node, output in outputs.items()} or None
        status = entry.get("status") or {}
        messages = status.get("messages") or []
        names = [m[0] for m in messages if isinstance(m, list | tuple) and m]
        for name, payload in (m for m in messages if isinstance(m, list | tuple) and len(m) == 2):
            if name == "execution_start" and isinstance(payload, dict):
                self._start(job, _moment(payload.get("timestamp")))
            elif name == "execution_cached" and isinstance(payload, dict):
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
        return self.lose(job, detail)

    def lose(self, job: Job, detail: str) -> bool:
        """Fail a job ComfyUI no longer has (error type `lost`). True if it was failed."""
        if self._move(job, JobState.FAILED):
            job.error = {"type": "lost", "message": detail, "node_id": None,
                         "node_type": None}
            self._finish(job, detail)
            return True
        return False

    def _start(self, job: Job, at: datetime | None = None) -> bool:
        if job.state is JobState.QUEUED and self._move(job, JobState.RUNNING):
            job.started_at = at or self._clock()
            job.queue_position = 0
            job.missing_since = None
            job.detail = "Running."
            if job.costs is not None and job.gpu_id is not None and at is None:
                job.timeline = Timeline(job.gpu_id, job.costs, self.run_times)
                job.timeline.started(job.started_at.timestamp())
            return True
        return False

    def _moment(self) -> float:
        return self._clock().timestamp()

    def _finish(self, job: Job, detail: str | None) -> None:
        """The job ended on ComfyUI's word (not a refusal at submission): stamp it,
        and owe its callback a delivery, announced with the same change."""
        job.finished_at = self._clock()
        if job.callback_url is not None:
            job.webhook = {"url": job.callback_url, "state": "pending", "attempts": 0,
                           "last_error": None, "delivered_at": None}
        job.queue_position = None
        job.node_progress = None
        job.current_node = None
        if detail is not None:
            job.detail = detail
        self._touch(job)


def _mark_done(job: Job, node: str) -> None:
    if job.done_nodes is None:
        job.done_nodes = {node}
    else:
        job.done_nodes.add(node)


def _moment(timestamp: Any) -> datetime | None:
    """ComfyUI's message timestamps are milliseconds since the epoch."""
    if isinstance(timestamp, int | float) and not isinstance(timestamp, bool):
        try:
            return datetime.fromtimestamp(timestamp / 1000, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None
