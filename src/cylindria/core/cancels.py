"""Nodes sharing a database: a cancel of another node's job, passed to the node that
holds it, and the cancels other nodes pass to this one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from ..errors import ApiError, JobFinished, JobNotFound, StateUnavailable
from .elsewhere import held_elsewhere, require_alive
from .ports import HeldElsewhere
from .records import Job

if TYPE_CHECKING:
    from .jobs import JobsService

log = logging.getLogger(__name__)


async def cancel_anywhere(jobs: JobsService, job_id: str) -> Job | HeldElsewhere:
    """This node's job, cancelled as `jobs.cancel` does; else the one other node's that
    holds the id, asked to cancel it: a request that node reads at its next heartbeat,
    or at once when its notification gets there. JobFinished when that job is finished
    already (as for a job here), NodeNotAlive when that node is not alive."""
    try:
        return await jobs.cancel(job_id)
    except JobNotFound:
        held = await held_elsewhere(jobs, job_id, "")
    if held.job.terminal:
        raise JobFinished(held, f"Job {job_id!r} is already {held.job.state.value} on node "
                                f"{held.node}; there is nothing to cancel.")
    require_alive(held, "cancel")
    await jobs.store.request_cancel(held.node, job_id)
    return held


async def relay_cancels(jobs: JobsService) -> int:
    """Run the cancels other nodes asked of this one, each as a local cancel, then drop
    the requests (a job finished or gone meanwhile too). How many were run."""
    try:
        job_ids = await jobs.store.pending_cancels()
    except StateUnavailable:
        return 0  # the heartbeat says the database fails; read again next round
    if not job_ids:
        return 0
    outcomes = await asyncio.gather(*(jobs.cancel(job_id) for job_id in job_ids),
                                    return_exceptions=True)
    for job_id, outcome in zip(job_ids, outcomes, strict=True):
        if isinstance(outcome, (JobFinished, JobNotFound)):
            log.info("job %s: another node asked to cancel it; it is %s", job_id,
                     "gone" if isinstance(outcome, JobNotFound) else "finished already")
        elif isinstance(outcome, ApiError):
            log.warning("job %s: another node asked to cancel it, which failed (%s)",
                        job_id, outcome.message)
        elif isinstance(outcome, BaseException):
            log.error("job %s: another node asked to cancel it, which failed", job_id,
                      exc_info=outcome)
        else:
            log.info("job %s: cancel asked by another node", job_id)
    with contextlib.suppress(StateUnavailable):  # else dropped next round
        await jobs.store.drop_cancels(job_ids)
    return len(job_ids)


async def follow_cancels(jobs: JobsService, interval: float, wake: asyncio.Event) -> None:
    """Run the cancels other nodes ask of this one: at every heartbeat interval (so a
    lost notification delays one by an interval at most), and as soon as `wake` is set."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), interval)
        wake.clear()
        await relay_cancels(jobs)
