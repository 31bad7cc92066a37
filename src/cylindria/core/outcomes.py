"""What a submission comes to: the verdict and detail a PUT or retry answers with."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..errors import JobIdConflict
from .records import RETRYABLE, Job, JobState


class Verdict(StrEnum):
    ACCEPTED = "accepted"  # submitted now, held for a GPU, or found queued after all
    REPEATED = "repeated"  # the same PUT again: nothing submitted
    REFUSED = "refused"  # the same PUT again, of a job ComfyUI refused


@dataclass(slots=True, frozen=True)
class Outcome:
    job: Job
    verdict: Verdict
    detail: str


def conflict(job: Job) -> JobIdConflict:
    return JobIdConflict(
        f"Job {job.job_id!r} already exists with a different workflow (state "
        f"{job.state.value}). Use a new job_id for a new workflow.",
        reply={"gpu_id": job.gpu_id, "state": job.state.value})


def repeat(job: Job) -> Outcome:
    if job.state is JobState.REJECTED:
        return Outcome(job, Verdict.REFUSED, job.detail)
    detail = (f"Job {job.job_id!r} was already accepted with this workflow; nothing was "
              f"submitted again. It is {job.state.value}.")
    if job.state in RETRYABLE:
        detail += f" To run it again, POST /retryjob/{job.job_id}/."
    return Outcome(job, Verdict.REPEATED, detail)
