"""Cylindria's own queue for `GpuId=auto`: jobs held until a GPU frees, by priority,
first come first served within a priority, with aging so nothing starves, and a
preference for the GPU that already holds a job's models."""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from .records import Job

# Among the held jobs of the chosen priority, how far down the line the dispatcher
# looks for one whose models the freed GPU holds (CYLINDRIA_MODEL_WINDOW): order is
# kept roughly, never upended. 1: strictly first come, first served.
MODEL_WINDOW = 8
# How many model files per GPU are remembered as loaded (the most recent ones).
MODELS_KEPT = 6


@dataclass(frozen=True)
class Pick:
    job: Job
    reason: str


class _Bucket:
    """The held jobs of one priority, oldest first."""

    __slots__ = ("jobs", "seqs")

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.jobs: dict[int, Job] = {}

    def add(self, job: Job) -> None:
        if not self.seqs or job.seq > self.seqs[-1]:
            self.seqs.append(job.seq)
        else:
            self.seqs.insert(bisect_left(self.seqs, job.seq), job.seq)
        self.jobs[job.seq] = job

    def discard(self, job: Job) -> bool:
        if self.jobs.pop(job.seq, None) is None:
            return False
        at = bisect_left(self.seqs, job.seq)
        del self.seqs[at]
        return True

    def rank(self, job: Job) -> int:
        return bisect_left(self.seqs, job.seq)

    def oldest(self, count: int) -> Iterator[Job]:
        for seq in self.seqs[:count]:
            yield self.jobs[seq]


class HeldQueue:
    """The held jobs. `aging`: seconds of waiting worth one priority level."""

    def __init__(self, aging: float = 60.0, window: int = MODEL_WINDOW) -> None:
        self.aging = aging
        self.window = window
        self._buckets: dict[int, _Bucket] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, job: Job) -> bool:
        bucket = self._buckets.get(job.priority)
        return bucket is not None and job.seq in bucket.jobs

    def add(self, job: Job) -> None:
        if job in self:
            return
        self._buckets.setdefault(job.priority, _Bucket()).add(job)
        self._count += 1

    def discard(self, job: Job) -> None:
        bucket = self._buckets.get(job.priority)
        if bucket is not None and bucket.discard(job):
            self._count -= 1
            if not bucket.seqs:
                del self._buckets[job.priority]

    def position(self, job: Job) -> int | None:
        """1 for the next job out, by priority then age (aging aside: it lifts old jobs
        over time, so a position may improve faster than jobs leave)."""
        bucket = self._buckets.get(job.priority)
        if bucket is None or job.seq not in bucket.jobs:
            return None
        ahead = sum(len(b.seqs) for p, b in self._buckets.items() if p > job.priority)
        return ahead + bucket.rank(job) + 1

    def ordered(self, limit: int) -> list[Job]:
        """Up to `limit` held jobs in dispatch order (aging aside)."""
        found: list[Job] = []
        for priority in sorted(self._buckets, reverse=True):
            found.extend(self._buckets[priority].oldest(limit - len(found)))
            if len(found) >= limit:
                break
        return found

    def _effective(self, priority: int, now: datetime) -> float:
        head = self._buckets[priority].jobs[self._buckets[priority].seqs[0]]
        waited = max(0.0, (now - head.submitted_at).total_seconds())
        return priority + (waited / self.aging if self.aging > 0 else 0.0)

    def next_for(self, gpu: int, models: Sequence[str], now: datetime) -> Pick | None:
        """The job the freed GPU `gpu` should take: from the priority whose oldest job
        ranks highest once aged, the earliest among the first few whose models the GPU
        loaded most recently (`models`, oldest first), else the earliest."""
        if not self._buckets:
            return None
        priority = max(self._buckets, key=lambda p: (self._effective(p, now), p))
        bucket = self._buckets[priority]
        window = list(bucket.oldest(max(1, self.window)))
        if models:
            # A model used more recently is likelier still in VRAM: it weighs more.
            recency = {name: n for n, name in enumerate(models, start=1)}
            best, best_score = None, 0
            for job in window:
                score = sum(recency.get(name, 0) for name in job.models or ())
                if score > best_score:
                    best, best_score = job, score
            if best is not None:
                names = ", ".join(sorted(set(recency).intersection(best.models or ())))
                return Pick(best, f"GPU {gpu} already holds {names}.")
        return Pick(window[0], f"GPU {gpu} was the first to free, and this was the "
                               "next job in line.")


class ModelMemory:
    """Per GPU, the model files its recent jobs loaded, most recent last."""

    def __init__(self, kept: int = MODELS_KEPT) -> None:
        self.kept = kept
        self._gpus: dict[int, OrderedDict[str, None]] = {}

    def used(self, gpu: int, models: Iterable[str]) -> None:
        recent = self._gpus.setdefault(gpu, OrderedDict())
        for name in models:
            recent[name] = None
            recent.move_to_end(name)
        while len(recent) > self.kept:
            recent.popitem(last=False)

    def forget(self, gpu: int) -> None:
        """The GPU's ComfyUI restarted: it holds nothing."""
        self._gpus.pop(gpu, None)

    def of(self, gpu: int) -> list[str]:
        return list(self._gpus.get(gpu, ()))
