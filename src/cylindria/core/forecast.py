"""Expected times from learned run times: when each GPU will be done with its work, and
when a job will end (the line ahead of it included). None wherever something needed
has not been learned yet: never a guess dressed as a number."""

from __future__ import annotations

from datetime import datetime, timedelta

from .estimates import JOB_OVERHEAD
from .records import Job, JobState
from .registry import Registry

# Held jobs ahead of one are played out one by one up to this many; beyond it the rest
# of the line is counted at its average cost, spread over the GPUs.
PLAYED_OUT = 200
# Seconds a played-out line is reused for.
LINE_KEPT = 0.05
# Jobs waiting on one GPU whose expected times are worked out one by one; those behind
# them are counted at the average of these (a queue of 100,000 costs one pass, not
# 100,000 estimates).
PLAYED_OUT_ON_GPU = 500
# Seconds a line longer than that is reused for, whatever changes meanwhile: working it
# out costs in proportion to its length, and far down a long line a second is nothing.
LONG_LINE_KEPT = 1.0


class Forecast:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._cached: tuple[tuple[int, int, tuple[int, ...]], _Line | None] | None = None
        self._gpus: dict[int, tuple[tuple[int, int], _GpuLine]] = {}

    def expected(self, job: Job, gpu: int | None) -> float | None:
        """Seconds the job should take on `gpu` (any GPU: None) once it runs."""
        if not job.costs:
            return None
        times = self.registry.run_times
        nodes = times.expect_job(gpu, job.costs)
        if nodes is None:
            return None
        return nodes + (times.expect(gpu, JOB_OVERHEAD, 1.0) or 0.0)

    def backlog(self, gpu: int, now: float) -> float | None:
        """Seconds until `gpu` is done with every job Cylindria has sent it."""
        return self._gpu_line(gpu, now).total

    def eta(self, job: Job, now: float, gpus: list[int]) -> float | None:
        """Seconds until the job ends; `gpus`: those the dispatcher may use now."""
        if job.terminal:
            return None
        if job.state is JobState.RUNNING:
            return self._remaining(job, now)
        if job.gpu_id is not None:
            return self._queued_on(job, job.gpu_id, now)
        return self._held(job, now, gpus)

    def _remaining(self, job: Job, now: float) -> float | None:
        """A running job's rest: from its timeline, or, for one found running after a
        restart (no events seen from its start), its expected time less the time since."""
        if job.timeline is not None:
            return job.timeline.remaining(now)
        expected = self.expected(job, job.gpu_id)
        if expected is None or job.started_at is None:
            return None
        return max(0.0, expected - (now - job.started_at.timestamp()))

    def _queued_on(self, job: Job, gpu: int, now: float) -> float | None:
        """The running job's rest, the jobs ahead in ComfyUI's queue, then this one."""
        line = self._gpu_line(gpu, now)
        found = line.etas.get(job.job_id)
        if found is None and line.long and line.total is not None:
            # Newer than the long line kept a moment: it comes after all of it.
            return line.total + line.average
        return found

    def _gpu_line(self, gpu: int, now: float) -> _GpuLine:
        """One pass over a GPU's jobs, in the order it runs them, each with the time
        its end is expected; kept a moment, so a long queue costs one pass."""
        # Any change to a job changes the line at once, not a moment later.
        key = (round(now / LINE_KEPT), self.registry.changes)
        cached = self._gpus.get(gpu)
        if cached is not None and (cached[0] == key or (
                cached[1].long and now - cached[1].made < LONG_LINE_KEPT)):
            return cached[1]
        line = _GpuLine(now)
        total: float | None = 0.0
        seen: list[Job] = []
        unseen: list[Job] = []
        for job in self.registry.in_flight(gpu):
            if job.state is JobState.RUNNING:
                left = self._remaining(job, now)
                total = None if left is None or total is None else total + left
            elif job.queue_position is not None:
                seen.append(job)
            else:
                unseen.append(job)
        # ComfyUI's order where it is known; jobs not yet seen in its queue after.
        seen.sort(key=_place)
        unseen.sort(key=_seq)
        waiting = seen + unseen
        costs: list[float] = []
        for job in waiting[:PLAYED_OUT_ON_GPU]:
            cost = self.expected(job, gpu)
            total = None if cost is None or total is None else total + cost
            if total is None:
                break
            costs.append(cost)
            line.etas[job.job_id] = total
        if total is not None and len(waiting) > PLAYED_OUT_ON_GPU:
            average = line.average = sum(costs) / len(costs)
            line.long = True
            for job in waiting[PLAYED_OUT_ON_GPU:]:
                total += average
                line.etas[job.job_id] = total
        line.total = total
        self._gpus[gpu] = (key, line)
        return line

    def _held(self, job: Job, now: float, gpus: list[int]) -> float | None:
        line = self._line(now, gpus)
        if line is None:
            return None
        if job.job_id in line.etas:
            return line.etas[job.job_id]
        position = self.registry.held.position(job)
        own = self.expected(job, None)
        if position is None or own is None or not line.played or line.broken:
            return None
        average = sum(line.played) / len(line.played)
        rest = (position - 1 - len(line.played)) * average / len(line.free)
        return min(line.free.values()) + max(rest, 0.0) + own

    def _line(self, now: float, gpus: list[int]) -> _Line | None:
        """The held line played out onto the GPUs, each job to the one free first;
        kept a moment, so a page of held jobs costs one play-out."""
        key = (round(now / LINE_KEPT), self.registry.changes, tuple(gpus))
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        line = self._play(now, gpus)
        self._cached = (key, line)
        return line

    def _play(self, now: float, gpus: list[int]) -> _Line | None:
        if not gpus:
            return None
        free: dict[int, float] = {}
        for gpu in gpus:
            left = self.backlog(gpu, now)
            if left is None:
                return None
            free[gpu] = left
        line = _Line(free)
        for ahead in self.registry.held.ordered(PLAYED_OUT):
            gpu = min(free, key=free.__getitem__)
            cost = self.expected(ahead, gpu)
            if cost is None:
                line.broken = True  # from here on, nothing can be said
                break
            free[gpu] += cost
            line.etas[ahead.job_id] = free[gpu]
            line.played.append(cost)
        return line


class _GpuLine:
    def __init__(self, made: float) -> None:
        self.made = made
        self.total: float | None = None
        self.etas: dict[str, float] = {}
        # Past PLAYED_OUT_ON_GPU waiting jobs: the average cost counted for the rest.
        self.long = False
        self.average = 0.0


class _Line:
    def __init__(self, free: dict[int, float]) -> None:
        self.free = free
        self.etas: dict[str, float] = {}
        self.played: list[float] = []
        self.broken = False


def _place(job: Job) -> tuple[int, int]:
    return (job.queue_position or 0, job.seq)


def _seq(job: Job) -> int:
    return job.seq


def finish_at(start: datetime, seconds: float | None) -> datetime | None:
    return None if seconds is None else start + timedelta(seconds=seconds)
