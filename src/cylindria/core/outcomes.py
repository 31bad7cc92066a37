"""What a submission comes to: the verdict and detail a PUT or retry answers with."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..errors import AttemptsExhausted, JobIdConflict, NotRetryable
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


def repeat_of(job: Job, fingerprint: str) -> Outcome:
    """A PUT of a job id known already: a repeat, or a conflict if its workflow differs."""
    if job.fingerprint != fingerprint:
        raise conflict(job)
    return repeat(job)


def check_retryable(job: Job, max_attempts: int) -> None:
    """Refuse a retry of a job that cannot run again (NotRetryable, AttemptsExhausted)."""
    if job.state not in RETRYABLE:
        raise NotRetryable(
            f"Job {job.job_id!r} is {job.state.value}; only a failed, cancelled or rejected "
            "job can run again.", reply={"gpu_id": job.gpu_id, "state": job.state.value})
    if job.attempt >= max_attempts:
        # Each attempt stays in the job's record and its answers: a job id retried
        # without end would grow them, and every retry would cost more than the last.
        raise AttemptsExhausted(
            f"Job {job.job_id!r} has run {job.attempt} attempts, the most this server "
            f"allows one job (CYLINDRIA_MAX_ATTEMPTS={max_attempts}); submit it as a new "
            "job, under a new job_id, with PUT /startjob/{job_id}/.",
            extra={"attempts": job.attempt, "max_attempts": max_attempts},
            reply={"gpu_id": job.gpu_id, "state": job.state.value})
