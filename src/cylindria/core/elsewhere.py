"""Nodes sharing a database: the status of a job asked of a node that does not hold it,
read from the database as the node that holds it last wrote it; which node a request
about it is passed to."""

from __future__ import annotations

import uuid
from datetime import datetime

from ..errors import AmbiguousJobId, JobNotFound, JobTakenElsewhere, NodeNotAlive
from .ports import HeldElsewhere, JobLookup
from .records import Job, isoformat
from .registry import Registry


def not_found(job_id: str, advice: str = "") -> JobNotFound:
    return JobNotFound(f"No job {job_id!r} is known here.{advice}",
                       extra={"job_id": job_id})


async def find_anywhere(jobs: JobLookup, job_id: str,
                        advice: str = "") -> Job | HeldElsewhere:
    """This node's job (as `jobs.find` gives it), else the one other node's that holds
    the id. Several other nodes holding it: AmbiguousJobId (409), since ids are each
    node's own and none of them is more the one asked for than the others."""
    job = await jobs.lookup(job_id)
    if job is not None:
        return job
    return await held_elsewhere(jobs, job_id, advice)


async def held_elsewhere(jobs: JobLookup, job_id: str, advice: str) -> HeldElsewhere:
    """The one other node's job of this id (not looking at this node's)."""
    found = await jobs.store.elsewhere(job_id)
    if len(found) > 1:
        names = [held.node for held in found]
        raise AmbiguousJobId(
            f"No job {job_id!r} is here, and nodes {', '.join(names)} each hold one of "
            "that id: ask the node it was submitted to (GET /gpus/ lists every node's "
            "advertise_url).", extra={"job_id": job_id, "nodes": names})
    if not found:
        raise not_found(job_id, advice)
    return found[0]


async def other_holder(jobs: JobLookup, job_id: str) -> HeldElsewhere | None:
    """The one other node's job of this id when this node holds none; None when this
    node holds it or no node does. Several other nodes: AmbiguousJobId (409)."""
    if await jobs.lookup(job_id, foresee=False) is not None:
        return None
    try:
        return await held_elsewhere(jobs, job_id, "")
    except JobNotFound:
        return None


async def id_holder(jobs: JobLookup, job_id: str) -> Job:
    """The job of this id another node wrote first (ids are unique across the nodes)."""
    found = await jobs.store.elsewhere(job_id)
    if not found:  # it went again meanwhile (pruned): say what happened
        raise JobTakenElsewhere(job_id)
    return found[0].job


def require_alive(held: HeldElsewhere, action: str) -> HeldElsewhere:
    """`held`, when its node is alive to be passed the `action` (a cancel, a retry);
    else NodeNotAlive (409), with the job as it stands."""
    if not held.node_alive:
        raise NodeNotAlive(
            held, f"Job {held.job.job_id!r} is held by node {held.node}, which is not "
            f"alive (stopped, or no heartbeat within its grace period), so the {action} "
            "cannot be passed to it. Start that node again, then retry; GET /gpus/ shows "
            "which nodes are alive.", held.node)
    return held


def lose_on_dead_node(job: Job, node: str, silent_since: datetime, now: datetime) -> bool:
    """Settle a job of node `node`, which stopped answering at `silent_since` and whose
    session is gone, as lost: the same move a host makes when ComfyUI forgot a job
    (`Registry.lose`), on a registry of its own that holds this job alone. False when
    the job had ended already (nothing changed)."""
    registry = Registry(clock=lambda: now)
    registry.restore([job])
    since = isoformat(silent_since)
    retry = (f"Run it again with POST /retryjob/{job.job_id}/ on node {node} once it is "
             "back (only the node that holds a job runs it again).")
    if job.held:
        detail = (f"Node {node} stopped answering at {since} while this job waited there "
                  f"for a GPU: it never ran. {retry}")
    else:
        detail = (f"Node {node} stopped answering at {since} while this job was "
                  f"{job.state.value} there: its outcome is unknown. {retry}")
    return registry.lose(job, detail)



def requeue_from_dead_node(job: Job, now: datetime) -> None:
    """A job `lose_on_dead_node` settled, run again when CYLINDRIA_RETRY_LOST allows:
    its next attempt, an automatic retry, put in the nodes' one line (its GPU went with
    its node), where the first GPU of any node that frees takes it."""
    registry = Registry(clock=lambda: now)
    registry.restore([job])
    seq, lost = job.seq, job.detail
    registry.retry(job, None, str(uuid.uuid4()), job.nodes, automatic=True)
    job.seq = seq  # its number is its node's, not this scratch registry's
    job.auto = True
    job.detail = (f"Attempt {job.attempt}, an automatic retry, waits in the nodes' shared "
                  f"line for the first GPU of any node that frees. {lost}")
