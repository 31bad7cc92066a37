"""The failures page: failed, rejected and cancelled jobs, filtered, paged and counted."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from ..appkeys import GPUS, JOBS, REGISTRY
from ..core.jobs import JobsService
from ..core.numbers import canonical_int
from ..core.records import JobState, isoformat
from ..web.auth import Access, access
from . import present, views

routes = web.RouteTableDef()

FAILURES = (JobState.FAILED, JobState.REJECTED, JobState.CANCELLED)
FAILURE_VALUES = tuple(state.value for state in FAILURES)
PAGE_SIZE = 50
WINDOW = timedelta(hours=1)
# The counts walk the last hour's failures newest first, this many at a time, and stop
# at this many (the counts then say "or more").
COUNT_BATCH = 500
COUNT_LIMIT = 10_000

Tally = Counter[tuple[str, int | None]]


@dataclass(slots=True, frozen=True)
class Filter:
    """What the page shows: some failure states, one GPU or all, and where a page
    starts (the `before` cursor of GET /jobs/)."""

    states: tuple[str, ...] = FAILURE_VALUES
    gpu: int | None = None
    before: int | None = None

    def query(self) -> dict[str, str]:
        query: dict[str, str] = {}
        if self.states != FAILURE_VALUES:
            query["state"] = ",".join(self.states)
        if self.gpu is not None:
            query["gpu"] = str(self.gpu)
        if self.before is not None:
            query["before"] = str(self.before)
        return query


def read_filter(request: web.Request) -> Filter:
    """The filter a page's query asks for. A person typed or followed it: what is not
    understood is left out rather than refused."""
    asked = {part.strip() for value in request.query.getall("state", [])
             for part in value.split(",")}
    states = tuple(s for s in FAILURE_VALUES if s in asked) or FAILURE_VALUES
    gpu = canonical_int(request.query.get("gpu") or "")
    if gpu is not None and gpu >= len(request.app[GPUS]):
        gpu = None
    before = canonical_int(request.query.get("before") or "")
    return Filter(states, gpu, before if before else None)


async def hour_tally(jobs: JobsService, now: datetime) -> tuple[Tally, bool]:
    """The last hour's failures by state and GPU: jobs whose latest attempt was
    submitted within the hour and ended so. Jobs come newest first (the order of the
    list), so the walk stops at the first one submitted before the hour began; the
    flag says it stopped at COUNT_LIMIT instead."""
    cutoff = now - WINDOW
    tally: Tally = Counter()
    before = None
    walked = 0
    while walked < COUNT_LIMIT:
        batch = await jobs.page(FAILURE_VALUES, None, before, COUNT_BATCH)
        for job in batch:
            if job.submitted_at < cutoff:
                return tally, False
            tally[(job.state.value, job.gpu_id)] += 1
        walked += len(batch)
        if len(batch) < COUNT_BATCH:
            return tally, False
        before = batch[-1].seq
    return tally, True


def count(tally: Tally, states: tuple[str, ...], gpu: int | None) -> int:
    return sum(n for (state, on), n in tally.items()
               if state in states and (gpu is None or on == gpu))


def chips(request: web.Request, chosen: Filter, tally: Tally,
          capped: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The filter's choices, each a link with its count in the last hour: states under
    the chosen GPU, GPUs under the chosen states. A choice starts at the newest page."""
    page_url = request.app.router["dashboard_failures"].url_for()
    more = "+" if capped else ""

    def chip(key: str, label: str, choice: Filter) -> dict[str, Any]:
        n = count(tally, choice.states, choice.gpu)
        return {"key": key, "label": label, "count": n, "count_label": f"{n}{more}",
                "url": str(page_url.with_query(choice.query())),
                "active": (choice.states, choice.gpu) == (chosen.states, chosen.gpu)}

    top = replace(chosen, before=None)
    state_chips = [chip("state:all", "All", replace(top, states=FAILURE_VALUES))]
    state_chips += [chip(f"state:{s}", present.STATE_LABELS[JobState(s)],
                         replace(top, states=(s,))) for s in FAILURE_VALUES]
    gpu_chips = [chip("gpu:all", "All GPUs", replace(top, gpu=None))]
    gpu_chips += [chip(f"gpu:{n}", f"GPU {n}", replace(top, gpu=n))
                  for n in range(len(request.app[GPUS]))]
    return state_chips, gpu_chips


async def failures_state(request: web.Request) -> dict[str, Any]:
    now = request.app[REGISTRY].now()
    chosen = read_filter(request)
    jobs = request.app[JOBS]
    found = await jobs.page(chosen.states, chosen.gpu, chosen.before, PAGE_SIZE + 1)
    shown = found[:PAGE_SIZE]
    tally, capped = await hour_tally(jobs, now)
    state_chips, gpu_chips = chips(request, chosen, tally, capped)
    total = count(tally, chosen.states, chosen.gpu)
    since = (now - WINDOW).strftime("%H:%M UTC")
    router = request.app.router
    page_url = router["dashboard_failures"].url_for()
    older = (replace(chosen, before=shown[-1].seq)
             if len(found) > PAGE_SIZE and shown else None)
    return {
        "generated_at": isoformat(now),
        "generated_label": now.strftime("%H:%M:%S UTC"),
        "summary": (f"{total}{'+' if capped else ''} in the last hour (submitted since "
                    f"{since}) · newest first, {PAGE_SIZE} a page"),
        "since_label": since,
        "filter": {"states": list(chosen.states), "gpu": chosen.gpu,
                   "before": chosen.before},
        "state_chips": state_chips,
        "gpu_chips": gpu_chips,
        "jobs": [present.job_row(router, job, now, views.node_name(request.app))
                 for job in shown],
        "older_url": None if older is None else str(page_url.with_query(older.query())),
        "newest_url": (None if chosen.before is None
                       else str(page_url.with_query(replace(chosen, before=None).query()))),
        "feed_url": str(router["dashboard_failures_state"].url_for().with_query(
            chosen.query())),
    }


@routes.get("/dashboard/failures", name="dashboard_failures")
@access(Access.PAGE)
async def get_failures(request: web.Request) -> web.Response:
    state = await failures_state(request)
    return views.page("failures.html", request,
                      views.page_context(request, state=state,
                                         signin_url=views.signin_url(request)))


@routes.get("/dashboard/failures/state", name="dashboard_failures_state")
@access(Access.FEED)
async def get_failures_state(request: web.Request) -> web.Response:
    return views.feed(await failures_state(request))
