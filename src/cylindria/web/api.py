"""The JSON API's job routes: health, server status, submit, status, list, cancel, retry."""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractContextManager, nullcontext

from aiohttp import web

from ..appkeys import CLUSTER, GPUS, INPUTS, JOBS, JOURNAL, PEERS, SETTINGS, WAITERS
from ..core import cancels, elsewhere, listing
from ..core.outcomes import Outcome, Verdict
from ..core.ports import HeldElsewhere
from ..errors import ApiError, JobFinished, NodeNotAlive, UnknownGpu
from ..jsonio import json_response
from ..upstream.peers import FORWARDED, holder_url
from . import intake, params, render
from .auth import Access, access
from .clients import client_address
from .waiters import Waiter

routes = web.RouteTableDef()

DEFAULT_PAGE = 50
MAX_PAGE = 500


@routes.get("/healthz", name="healthz")
@access(Access.OPEN)
async def get_healthz(request: web.Request) -> web.Response:
    gpus = request.app[GPUS]
    return json_response({
        "status": "ok",
        "gpus": len(gpus),
        "listeners_connected": sum(g.listener_connected for g in gpus),
    })


@routes.get("/readyz", name="readyz")
@access(Access.OPEN)
async def get_readyz(request: web.Request) -> web.Response:
    gpus = request.app[GPUS]
    probes = await asyncio.gather(*(gpu.probe() for gpu in gpus))
    cluster = request.app[CLUSTER]
    elsewhere = None
    if cluster.enabled:  # the shared queue takes this node's auto jobs to them too
        now = time.monotonic()
        elsewhere = sum(1 for other in cluster.others if other.alive(now)
                        for entry in other.gpus
                        if entry.get("reachable") and not entry.get("drained"))
    body = render.readiness(gpus, probes, request.app[JOURNAL].writable, elsewhere)
    return json_response(body, status=200 if body["status"] == "ready" else 503)


@routes.get("/serverstatus", name="serverstatus")
async def get_serverstatus(request: web.Request) -> web.Response:
    raw = request.query.get("GpuId", "0")
    cluster = request.app[CLUSTER]
    if cluster.enabled and ":" in raw:  # any node's GPU, as its last heartbeat showed it
        node, index = params.node_gpu(request, raw, cluster.node.name, "GpuId")
        if node != cluster.node.name:
            now = time.monotonic()
            for other in cluster.others:
                entry = next((g for g in other.gpus if g.get("gpu_id") == index), None)
                if other.name == node and entry is not None:
                    return json_response(render.seen_gpu_status(
                        entry, node, other.alive(now), other.last_seen(now)))
            raise UnknownGpu(f"No heartbeat names a GPU {node}:{index}; GET /gpus/ lists "
                             "every node's GPUs.")
        raw = str(index)
    gpu = params.gpu(request, raw)
    return json_response(render.gpu_status(gpu, await gpu.probe()))


@routes.get("/jobstatus/{job_id}/", name="jobstatus")
async def get_jobstatus(request: web.Request) -> web.Response:
    job_id = params.job_id(request)
    if "?" not in request.raw_path:
        # The usual poll, with no query (so no ?wait=), of a job in memory: what
        # find_anywhere looks at first, answered without awaiting anything.
        app = request.app
        jobs = app[JOBS]
        job = jobs.registry.get(job_id)
        if job is not None:
            return render.status_response(jobs.foresee(job), app.router)
    seconds = params.wait(request.query, request.app[SETTINGS].max_wait)
    hint = f" Submit it with PUT /startjob/{job_id}/ first."
    job = await elsewhere.find_anywhere(request.app[JOBS], job_id, hint)
    if isinstance(job, HeldElsewhere):  # another node's: answered at once, ?wait= or not
        return json_response(render.elsewhere_body(job, request.app.router))
    if seconds is not None and not job.terminal:
        with waiting(request, seconds) as waiter:
            await request.app[WAITERS].until_finished(waiter, job, seconds)
        # Another node may have taken it from the shared line meanwhile.
        job = await elsewhere.find_anywhere(request.app[JOBS], job_id, hint)
        if isinstance(job, HeldElsewhere):
            return json_response(render.elsewhere_body(job, request.app.router))
    return render.status_response(job, request.app.router)


def waiting(request: web.Request, seconds: int | None) -> AbstractContextManager[Waiter | None]:
    """With ?wait=, a waiter's slot (429 when there is none); else no slot."""
    if seconds is None:
        return nullcontext()
    return request.app[WAITERS].slot(request, client_address(request))


async def started(request: web.Request, outcome: Outcome, waiter: Waiter | None,
                  seconds: int | None) -> web.Response:
    """The answer to a submission or a retry; with ?wait=, the job's status (200) once
    it is finished within the wait, else the usual reply with its state then."""
    if waiter is not None and seconds is not None and outcome.verdict is not Verdict.REFUSED:
        await request.app[WAITERS].until_finished(waiter, outcome.job, seconds)
        if outcome.job.terminal:
            return render.status_response(outcome.job, request.app.router)
    return render.startjob_reply(outcome)


# What a PUT passed to another node keeps of the client's headers (the body's kind and
# encoding, its callback), besides the key and X-Cylindria-Forwarded the node adds.
PASSED_HEADERS = frozenset({"content-type", "content-encoding", "x-callback-url"})


@routes.put("/startjob/{job_id}/", name="startjob")
async def put_startjob(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    settings = request.app[SETTINGS]
    try:
        job_id = params.job_id(request)
        seconds = params.wait(request.query, settings.max_wait)
        gpu_choice = request.query.get("GpuId")
        cluster = request.app[CLUSTER]
        if cluster.enabled and gpu_choice and ":" in gpu_choice:
            # Nodes sharing a database: a GPU by its name across the nodes, NODE:N.
            node, index = params.node_gpu(request, gpu_choice, cluster.node.name, "GpuId")
            if node != cluster.node.name:
                return await pinned_elsewhere(request, node, index, seconds or 0)
            gpu_choice = str(index)
        # The slot is taken before the job is: a 429 then leaves nothing submitted.
        with waiting(request, seconds) as waiter:
            callback = await params.callback_url(request)
            priority = params.priority(request.query)
            jobs = request.app[JOBS]
            if intake.is_multipart(request):
                form = await intake.job_form(request, request.app[INPUTS],
                                             settings.input_max,
                                             settings.timing.body_idle_timeout)
                raw, attached = form.workflow or [], form.files
            else:
                raw, attached = await params.body(request), {}
            workflow = await jobs.read(job_id, raw, attached)
            outcome = await jobs.start(job_id, gpu_choice, workflow, callback, priority,
                                       attached)
            return await started(request, outcome, waiter, seconds)
    except ApiError as exc:
        raise render.startjob_refusal(job_id, exc) from None


@routes.get("/jobs/", name="jobs")
async def get_jobs(request: web.Request) -> web.Response:
    query = request.query
    states = params.states(query)
    cluster = request.app[CLUSTER]
    if cluster.enabled:  # every node's jobs, paged by their order across the nodes
        node = cluster.node.name
        gpu = params.node_gpu(request, query["gpu"], node) if query.get("gpu") else None
        limit = params.whole_number(query, "limit", 1, MAX_PAGE) or DEFAULT_PAGE
        before = params.whole_number(query, "before", 1, None)
        page = await listing.page_anywhere(request.app[JOBS], states, gpu, before, limit)
        return render.cluster_jobs_page(page, node, request.app.router)
    gpu_id = params.gpu(request, query["gpu"], "gpu").index if query.get("gpu") else None
    limit = params.whole_number(query, "limit", 1, MAX_PAGE) or DEFAULT_PAGE
    before = params.whole_number(query, "before", 1, None)
    jobs = await request.app[JOBS].page(states, gpu_id, before, limit + 1)
    return render.jobs_page(jobs[:limit], len(jobs) > limit, request.app.router)


@routes.post("/canceljob/{job_id}/", name="canceljob")
async def post_canceljob(request: web.Request) -> web.Response:
    try:
        job = await cancels.cancel_anywhere(request.app[JOBS], params.job_id(request))
    except (JobFinished, NodeNotAlive) as exc:  # with the job as it stands
        exc.reply = render.finished_body(exc.job, request.app.router)
        raise
    if isinstance(job, HeldElsewhere):  # passed to the node that holds it
        return json_response(render.cancel_passed(job, request.app.router), status=202)
    return render.status_response(job, request.app.router, status=202)


@routes.post("/retryjob/{job_id}/", name="retryjob")
async def post_retryjob(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    try:
        job_id = params.job_id(request)
        seconds = params.wait(request.query, request.app[SETTINGS].max_wait)
        # Another node's job is retried by that node; a request passed on is not again.
        held = None if FORWARDED in request.headers else (
            await elsewhere.other_holder(request.app[JOBS], job_id))
        if held is not None:
            return await passed_on(request, held, "retry", seconds or 0)
        with waiting(request, seconds) as waiter:
            outcome = await request.app[JOBS].retry(job_id, request.query.get("GpuId"))
            return await started(request, outcome, waiter, seconds)
    except ApiError as exc:
        raise render.startjob_refusal(job_id, exc) from None


async def pinned_elsewhere(request: web.Request, node: str, index: int,
                           seconds: float) -> web.Response:
    """A PUT pinned to another node's GPU (GpuId=NODE:N), passed to that node as it came
    with GpuId=N, and that node's answer passed back. A node unknown or not alive: 409
    `node_not_alive`, and nothing is recorded anywhere."""
    if FORWARDED in request.headers:  # passed on once at most
        raise UnknownGpu(f"GpuId {node}:{index} is not a GPU of this node.")
    cluster = request.app[CLUSTER]
    seen = next((other for other in cluster.others if other.name == node), None)
    if seen is None or not seen.alive(time.monotonic()):
        raise NodeNotAlive(None, f"GPU {node}:{index} is a GPU of node {node}, which "
                           f"{'no heartbeat names' if seen is None else 'is not alive'}; "
                           "pick another GPU (GET /gpus/ lists every node's), or "
                           "GpuId=auto.", node)
    query = request.rel_url.query.copy()
    query["GpuId"] = str(index)
    body = await request.read() if request.can_read_body else None
    headers = {name: value for name, value in request.headers.items()
               if name.lower() in PASSED_HEADERS}
    answer = await request.app[PEERS].call(
        "PUT", node, seen.advertise_url, request.rel_url.with_query(query).raw_path_qs,
        headers, body, wait=seconds)
    return render.passed_back(answer)


async def passed_on(request: web.Request, held: HeldElsewhere, action: str,
                    seconds: float) -> web.Response:
    """A request about another node's job passed to that node as it came (method, query,
    body), and that node's answer passed back (status, JSON body, Retry-After). A node
    not alive: 409 `node_not_alive`, with the node and the job's state."""
    try:
        elsewhere.require_alive(held, action)
    except NodeNotAlive as exc:
        exc.reply = {"gpu_id": held.job.gpu_id, "state": held.job.state.value,
                     "node": held.node}
        raise
    body = await request.read() if request.can_read_body else None
    headers = {"Content-Type": request.content_type} if body else {}
    answer = await request.app[PEERS].call(
        request.method, held.node, holder_url(held), request.rel_url.raw_path_qs, headers,
        body, wait=seconds)
    return render.passed_back(answer)
