"""The job registry: the jobs in memory, indexed, and the only place that changes them."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

from ..errors import JobConflict
from .dispatch import HeldQueue
from .estimates import RunTimes
from .indexes import SeqIndex, SeqList
from .machine import JobMachine
from .records import IN_FLIGHT, TERMINAL, TRANSITIONS, Job, JobState, utcnow

log = logging.getLogger(__name__)

Listener = Callable[[Job], None]

# Finished jobs kept in memory by default; older ones are answered from the journal.
MEMORY_JOBS = 10_000


class Registry(JobMachine):
    """Every job in memory, by job id, prompt id, state, GPU and submission order.

    Memory holds every job in flight and the most recent finished ones; the journal
    behind it holds them all. Every operation a request or an event makes costs
    O(1) or O(log n) in the number of jobs held. All mutation goes through methods
    that enforce the state machine and stamp `updated_at`; each change is announced
    to subscribers (the journal, live views, webhooks).
    """

    def __init__(self, clock: Callable[[], datetime] = utcnow,
                 memory_jobs: int = MEMORY_JOBS) -> None:
        self._clock = clock
        self._memory_jobs = memory_jobs
        self._subscribers: list[Listener] = []
        self._leaving: list[Listener] = []
        self._seq = 0
        self._jobs: dict[str, Job] = {}
        self._by_prompt: dict[str, Job] = {}
        self._by_seq: dict[int, Job] = {}
        self._all = SeqList()
        self._finished = SeqList()
        self._states = SeqIndex()
        self._gpus = SeqIndex()
        self._flight: dict[int, dict[str, Job]] = {}
        self._running: dict[int, dict[str, Job]] = {}
        self._counts: Counter[JobState] = Counter()
        # Input files used by jobs in flight, by input id: the store keeps these.
        self._inputs: Counter[str] = Counter()
        # Lost jobs whose automatic retry waits for a GPU.
        self._owed: dict[str, Job] = {}
        self.awaiting_history: dict[str, Job] = {}
        # GpuId=auto jobs waiting in Cylindria for a GPU (state queued, no gpu_id).
        self.held = HeldQueue()
        # What each kind of node takes on each GPU, learned from the events.
        self.run_times = RunTimes()
        # Counts every lasting change to any job (a state, a GPU, a place in a line):
        # what is worked out from many jobs is kept while it stays the same.
        self.changes = 0
        # Every finished job with a higher sequence number is in memory.
        self._evicted_through = 0

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

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def evicted_through(self) -> int:
        """Finished jobs up to this sequence number may live only in the journal."""
        return self._evicted_through

    def in_flight(self, gpu_id: int) -> list[Job]:
        return list(self._flight.get(gpu_id, {}).values())

    def in_flight_count(self) -> int:
        return sum(len(jobs) for jobs in self._flight.values())

    def load(self, gpu_id: int) -> int:
        """Jobs queued or running on this GPU."""
        return len(self._flight.get(gpu_id, ()))

    def queued_count(self, gpu_id: int) -> int:
        return self.load(gpu_id) - len(self._running.get(gpu_id, ()))

    def running_on(self, gpu_id: int) -> Job | None:
        running = self._running.get(gpu_id)
        return next(iter(running.values())) if running else None

    def counts(self) -> dict[str, int]:
        return {state.value: self._counts[state] for state in JobState}

    def uses_input(self, input_id: str) -> bool:
        """Whether a job in flight (held, queued or running) uses this input file."""
        return input_id in self._inputs

    def unverified(self, gpu_id: int) -> list[Job]:
        return [job for job in self.in_flight(gpu_id) if job.unverified]

    def page(self, *, states: Iterable[str] | None = None, gpu_id: int | None = None,
             before: int | None = None, limit: int = 50, floor: int = 0) -> list[Job]:
        """Newest first, optionally filtered, with sequence numbers below `before` and
        above `floor`; walks only the index that fits the filter."""
        wanted = None if states is None else {JobState(s) for s in states}
        seqs: Iterator[int]
        keep: Callable[[Job], bool] = lambda job: True  # noqa: E731
        if wanted is not None and gpu_id is not None:
            if self._gpus.size([gpu_id]) <= self._states.size(wanted):
                seqs = self._gpus.newest([gpu_id], before)
                keep = lambda job: job.state in wanted  # noqa: E731
            else:
                seqs = self._states.newest(wanted, before)
                keep = lambda job: job.gpu_id == gpu_id  # noqa: E731
        elif wanted is not None:
            seqs = self._states.newest(wanted, before)
        elif gpu_id is not None:
            seqs = self._gpus.newest([gpu_id], before)
        else:
            seqs = self._all.newest(before)
        found: list[Job] = []
        for seq in seqs:
            if seq <= floor or len(found) >= limit:
                break
            job = self._by_seq[seq]
            if keep(job):
                found.append(job)
        return found

    def subscribe(self, listener: Listener) -> None:
        self._subscribers.append(listener)

    # -- submission and retries ---------------------------------------------------

    def begin(self, job_id: str, gpu_id: int | None, prompt_id: str, fingerprint: str,
              nodes: Iterable[str], callback_url: str | None = None,
              auto: bool = False, priority: int = 0,
              models: frozenset[str] | None = None,
              inputs: list[dict[str, Any]] | None = None) -> Job:
        """Record a new submission before ComfyUI is asked, so that events for its
        prompt id that race ahead of the HTTP answer are never lost."""
        old = self._jobs.get(job_id)
        if old is not None:
            if old.state is not JobState.REJECTED:
                raise JobConflict(old)
            self._remove(old)
        now = self._clock()
        self._seq += 1
        job = Job(job_id=job_id, gpu_id=gpu_id, fingerprint=fingerprint,
                  prompt_id=prompt_id, nodes=frozenset(nodes), submitted_at=now,
                  updated_at=now, seq=self._seq, callback_url=callback_url, auto=auto,
                  priority=priority, models=models or None, inputs=inputs or None)
        if job.held:
            job.detail = "Held in Cylindria's queue until a GPU frees."
        self._insert(job)
        self._touch(job)
        return job

    def retry(self, job: Job, gpu_id: int | None, prompt_id: str, nodes: Iterable[str],
              automatic: bool = False) -> None:
        """Start a new attempt of a finished job under the same job id: a new prompt
        id, perhaps another GPU; the attempt that ended is kept in summary."""
        self._remove(job)
        # Before the prompt id changes: what waited for the last attempt's history.
        self._heard_in_full(job)
        job.earlier_attempts = [*(job.earlier_attempts or ()), job.attempt_summary()]
        job.attempt += 1
        if automatic:
            job.automatic_retries += 1
        self._seq += 1
        job.seq = self._seq
        job.gpu_id = gpu_id
        job.prompt_id = prompt_id
        job.submitted_at = self._clock()
        job.state = JobState.QUEUED
        job.confirmed = False
        job.detail = (f"Submitting attempt {job.attempt} to ComfyUI." if gpu_id is not None
                      else f"Attempt {job.attempt} held in Cylindria's queue until a GPU "
                           "frees.")
        for name in ("queue_position", "current_node", "node_progress", "done_nodes",
                     "planned_nodes", "started_at", "finished_at", "error", "node_errors",
                     "outputs", "cached_nodes", "missing_since", "cancel_requested_at",
                     "webhook", "placement", "upload_seconds"):
            setattr(job, name, None)
        job.unverified = False
        job.retry_owed = False
        self._owed.pop(job.job_id, None)
        job.reopen(nodes)
        self._insert(job)
        self._touch(job)

    def confirm(self, job: Job, node_errors: dict[str, Any] | None = None) -> None:
        job.confirmed = True
        if node_errors:
            job.node_errors = node_errors
        if job.state is JobState.QUEUED and job.detail.startswith("Submitting"):
            job.detail = "Queued on ComfyUI."
            if node_errors:
                job.detail += (" Some outputs failed validation and will not run: "
                               + _skipped_outputs(node_errors) + ".")
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

    def set_webhook(self, job: Job, **fields: Any) -> None:
        job.webhook = {**(job.webhook or {}), **fields}
        self._touch(job)

    def uploading(self, job: Job, count: int, gpu_id: int) -> str:
        """Say that the attempt's input files are going to its GPU; returns what the
        job said before, for `uploaded` to say again."""
        before = job.detail
        job.detail = (f"Putting {count} input file{'s' if count != 1 else ''} on GPU "
                      f"{gpu_id}'s ComfyUI.")
        self._touch(job, lasting=False)
        return before

    def uploaded(self, job: Job, seconds: float, detail: str) -> None:
        """The attempt's inputs are on its GPU; the time it took joins its record."""
        job.upload_seconds = round(seconds, 4)
        if job.state is JobState.QUEUED and not job.confirmed:
            job.detail = detail
        self._touch(job, lasting=False)

    def doubt(self, job: Job, detail: str) -> None:
        """Until ComfyUI answers again, this in-flight job's state is not known for sure:
        the next reconciliation checks it."""
        if not job.terminal and (not job.unverified or job.detail != detail):
            job.unverified = True
            job.detail = detail
            self._touch(job, lasting=False)

    # -- Cylindria's own queue ------------------------------------------------------

    def dispatch(self, job: Job, gpu_id: int, reason: str) -> None:
        """A held job leaves Cylindria's queue for a GPU (its submission follows)."""
        self._leave(job, job.state)
        self._gpus.discard(None, job.seq)
        job.gpu_id = gpu_id
        job.placement = reason
        job.queue_position = None
        job.detail = f"Submitting to ComfyUI on GPU {gpu_id}: {reason}"
        self._gpus.add(gpu_id, job.seq)
        self._enter(job, job.state)
        self._touch(job)

    def rehold(self, job: Job, detail: str) -> None:
        """Back in Cylindria's queue, in its old place: its GPU never got it."""
        self._leave(job, job.state)
        self._gpus.discard(job.gpu_id, job.seq)
        job.gpu_id = None
        job.placement = None
        job.detail = detail
        self._gpus.add(None, job.seq)
        self._enter(job, job.state)
        self._touch(job)

    # -- the queue nodes share (PostgreSQL) ------------------------------------------

    def reserve_seq(self) -> int:
        """A number for a job another node held, should this node take it."""
        self._seq += 1
        return self._seq

    def take_in(self, job: Job) -> Job:
        """A held job this node took from another node's place in the shared line, as
        the database holds it: taken in silently (its row is this node's already)."""
        self.restore([job])
        return job

    def let_go(self, job: Job) -> None:
        """This node's held job was taken by another node, which runs it and answers
        for it from now on: forgotten here (its row is that node's). Not a change of
        the job: only the `on_leave` listeners hear of it (its streams and waiters here
        end, so their clients ask again, and reach that node)."""
        if self._jobs.get(job.job_id) is job:
            self._remove(job)
            self._owed.pop(job.job_id, None)
            for listener in self._leaving:
                listener(job)

    def on_leave(self, listener: Listener) -> None:
        """Call `listener` with each job this node lets go (`let_go`)."""
        self._leaving.append(listener)

    def cancel_held(self, job: Job) -> None:
        """A held job's cancel needs no GPU's word: it is cancelled at once."""
        if self._move(job, JobState.CANCELLED):
            job.cancel_requested_at = self._clock()
            self._finish(job, "Cancelled while it waited in Cylindria's queue; no GPU "
                              "ever ran it.")

    def freshen(self, job: Job) -> Job:
        """A held job's place in line moves as others leave: read it now."""
        if job.held:
            position = self.held.position(job)
            if position is not None and position != job.queue_position:
                job.queue_position = position
                job.detail = (f"Held in Cylindria's queue at position {position} "
                              f"(priority {job.priority}); it goes to the first GPU that "
                              "frees.")
                self._touch(job, lasting=False)
        return job

    def owe_retry(self, job: Job, owed: bool) -> None:
        """Mark (or clear) an automatic retry that waits for a GPU; it lasts across a
        restart."""
        if owed:
            self._owed[job.job_id] = job
        else:
            self._owed.pop(job.job_id, None)
        if job.retry_owed != owed:
            job.retry_owed = owed
            self._touch(job)

    def retries_owed(self) -> list[Job]:
        """Jobs whose automatic retry waits for a GPU, oldest first."""
        return sorted(self._owed.values(), key=lambda job: job.seq)

    def set_detail(self, job: Job, detail: str) -> None:
        if job.detail != detail:
            job.detail = detail
            self._touch(job, lasting=False)

    # -- the journal's side -------------------------------------------------------

    def restore(self, jobs: Iterable[Job], last_seq: int = 0,
                evicted_through: int = 0) -> None:
        """Take in jobs read from the journal, silently: nothing about them changed.
        `evicted_through`: finished jobs up to it stay in the journal only."""
        for job in jobs:
            old = self._jobs.get(job.job_id)
            if old is not None:
                self._remove(old)
            job.saved_version = job.lasting_version = job.version
            self._insert(job)
            if job.retry_owed:
                self._owed[job.job_id] = job
        self._seq = max(self._seq, last_seq)
        self._evicted_through = max(self._evicted_through, evicted_through)

    def saved(self, versions: Iterable[tuple[Job, int]]) -> None:
        """The journal now holds these versions of these jobs: finished ones beyond the
        memory bound may go."""
        count = 0
        for job, version in versions:
            count += 1
            if version > job.saved_version:
                job.saved_version = version
        self.evict(batch=count + 100)

    def webhooks_due(self) -> list[Job]:
        """Finished jobs in memory whose webhook was not delivered yet (after a restart)."""
        return [job for job in self._jobs.values()
                if job.webhook is not None and job.webhook.get("state") in ("pending",
                                                                            "retrying")]

    def evict(self, retain_after: datetime | None = None, batch: int = 500) -> int:
        """Forget up to `batch` finished jobs the journal holds: the oldest beyond the
        memory bound, and any finished before `retain_after`. Returns how many."""
        evicted = 0
        while evicted < batch:
            seq = self._finished.first()
            if seq is None:
                break
            job = self._by_seq[seq]
            expired = (retain_after is not None and job.finished_at is not None
                       and job.finished_at < retain_after)
            if len(self._finished) <= self._memory_jobs and not expired:
                break
            if job.saved_version < job.lasting_version:
                break  # wait for the journal
            self._remove(job)
            self._evicted_through = max(self._evicted_through, seq)
            evicted += 1
        return evicted

    def retention_cutoff(self, days: float) -> datetime:
        return self._clock() - timedelta(days=days)

    # -- internals ------------------------------------------------------------

    def _insert(self, job: Job) -> None:
        self._jobs[job.job_id] = job
        self._by_prompt[job.prompt_id] = job
        self._by_seq[job.seq] = job
        self._all.add(job.seq)
        self._gpus.add(job.gpu_id, job.seq)
        self._enter(job, job.state)

    def _remove(self, job: Job) -> None:
        self._leave(job, job.state)
        self._gpus.discard(job.gpu_id, job.seq)
        self._all.discard(job.seq)
        self._by_seq.pop(job.seq, None)
        if self._by_prompt.get(job.prompt_id) is job:
            del self._by_prompt[job.prompt_id]
        if self._jobs.get(job.job_id) is job:
            del self._jobs[job.job_id]

    def _enter(self, job: Job, state: JobState) -> None:
        self._counts[state] += 1
        self._states.add(state, job.seq)
        if state in IN_FLIGHT:
            for item in job.inputs or ():
                self._inputs[item["id"]] += 1
            self._flight.setdefault(job.gpu_id, {})[job.job_id] = job
            if job.gpu_id is None and state is JobState.QUEUED:
                self.held.add(job)
            if state is JobState.RUNNING:
                self._running.setdefault(job.gpu_id, {})[job.job_id] = job
        elif state in TERMINAL:
            self._finished.add(job.seq)

    def _leave(self, job: Job, state: JobState) -> None:
        self._counts[state] -= 1
        self._states.discard(state, job.seq)
        if state in IN_FLIGHT:
            for item in job.inputs or ():
                left = self._inputs[item["id"]] - 1
                if left > 0:
                    self._inputs[item["id"]] = left
                else:
                    del self._inputs[item["id"]]
        self._flight.get(job.gpu_id, {}).pop(job.job_id, None)
        self._running.get(job.gpu_id, {}).pop(job.job_id, None)
        if job.gpu_id is None:
            self.held.discard(job)
        if state in TERMINAL:
            self._finished.discard(job.seq)

    def _move(self, job: Job, new: JobState) -> bool:
        if new is job.state:
            return False
        if new not in TRANSITIONS[job.state]:
            log.debug("job %s: ignoring %s -> %s", job.job_id, job.state, new)
            return False
        self._leave(job, job.state)
        job.state = new
        self._enter(job, new)
        return True

    def _touch(self, job: Job, lasting: bool = True) -> None:
        """Announce a change. `lasting`: the journal must hold it; other changes (a
        queue position, the node running) are written with the next lasting one."""
        job.updated_at = self._clock()
        job.version += 1
        if lasting:
            job.lasting_version = job.version
            self.changes += 1
        if job.terminal:
            job.compact()
        for listener in self._subscribers:
            try:
                listener(job)
            except Exception:
                log.exception("registry subscriber failed on job %s", job.job_id)


def _skipped_outputs(node_errors: dict[str, Any]) -> str:
    """The output nodes that will not run, from ComfyUI's node_errors."""
    outputs: set[str] = set()
    failing: set[str] = set()
    for node_id, info in node_errors.items():
        failing.add(str(node_id))
        if isinstance(info, dict) and isinstance(info.get("dependent_outputs"), list):
            outputs.update(str(o) for o in info["dependent_outputs"])
    named = sorted(outputs or failing, key=lambda n: (len(n), n))
    return ("output node " if len(named) == 1 else "output nodes ") + ", ".join(named)
