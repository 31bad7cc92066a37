"""Nodes sharing a database: `GET /jobs/` over every node's jobs, newest first in the order
the database gives them across the nodes; this node's jobs as its registry has them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .ports import HeldElsewhere
from .records import Job

if TYPE_CHECKING:
    from .jobs import JobsService


@dataclass(slots=True)
class ClusterPage:
    """A page of every node's jobs: each with its key in the order across the nodes and
    the job, a Job when this node holds it (live), else as its node last wrote it;
    `next_before`, the key to page on from (None on the last page)."""

    entries: list[tuple[int, Job | HeldElsewhere]] = field(default_factory=list)
    next_before: int | None = None


async def page_anywhere(jobs: JobsService, states: Iterable[str] | None,
                        gpu: tuple[str, int] | None, before: int | None,
                        limit: int) -> ClusterPage:
    """Up to `limit` jobs of every node below `before` (None: from the newest), read from
    the database; `gpu` is (node, GPU number). A job of this node is shown as the
    registry has it, which may be a commit newer than its row: one whose state or GPU has
    moved out of the filters since is left out (the key still pages past it)."""
    wanted = None if states is None else frozenset(states)
    rows = await jobs.store.listing(wanted, gpu, before, limit + 1)
    me = jobs.settings.node_name
    page = ClusterPage(next_before=rows[limit - 1].key if len(rows) > limit else None)
    for row in rows[:limit]:
        held = row.held
        if held.node != me:
            page.entries.append((row.key, held))
            continue
        job = jobs.registry.get(held.job.job_id) or held.job
        if wanted is not None and job.state.value not in wanted:
            continue
        if gpu is not None and job.gpu_id != gpu[1]:
            continue
        page.entries.append((row.key, jobs.foresee(job)))
    return page
