"""The JSON API: server status, job submission and job status."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ujson
from aiohttp import web

from .comfy import sorted_queue
from .errors import (
    ApiError,
    BackendError,
    BackendTimeout,
    BadRequest,
    InvalidWorkflow,
    JobIdConflict,
    JobNotFound,
    json_response,
)
from .gpus import Gpu, gpu_by_number
from .keys import GPUS, REGISTRY, SETTINGS, SUBMISSIONS
from .placement import GpuDrained, choose_gpu
from .registry import Job, JobConflict, JobState
from .webhooks import check_callback_url

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

JOB_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


# -- request parsing ---------------------------------------------------------

def gpu_from_query(request: web.Request, raw: str | None = None,
                   name: str = "GpuId") -> Gpu:
    if raw is None:
        raw = request.query.get("GpuId", "0")
    return gpu_by_number(request.app[GPUS], raw, name)


def job_id_from_path(request: web.Request) -> str:
    job_id = request.match_info["job_id"]
    if not JOB_ID_RE.match(job_id):
        raise BadRequest("job_id must be 1 to 128 characters of letters, digits, '.', '_' "
                         f"or '-' (got {job_id[:140]!r}).")
    return job_id


def split_workflow(body: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(prompt, extra_data) from a bare API-format graph or ComfyUI's envelope."""
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object: an API-format workflow "
                         f"(got a JSON {type(body).__name__}).")
    if _looks_like_ui_export(body) or _looks_like_ui_export(body.get("prompt")):
        raise InvalidWorkflow(
            "This is a UI-format workflow (it has 'nodes' and 'links'). ComfyUI cannot run "
            "it as is: in ComfyUI, use Workflow > Export (API) and send that file.")
    if "prompt" in body:
        prompt = body["prompt"]
        extra = body.get("extra_data", {})
        if extra is None:
            extra = {}
        if not isinstance(extra, dict):
            raise BadRequest("'extra_data' must be a JSON object.")
    else:
        prompt, extra = body, {}
    if not isinstance(prompt, dict):
        raise BadRequest("'prompt' must be a JSON object mapping node ids to nodes.")
    if not prompt:
        raise InvalidWorkflow("The workflow has no nodes. Send an API-format workflow "
                              "with at least one output node (e.g. SaveImage).")
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise InvalidWorkflow(
                f"Node {node_id!r} is not an API-format node: each node must be an object "
                "with a 'class_type' string and an 'inputs' object. Export the workflow "
                "with Workflow > Export (API).", extra={"node_id": node_id})
        if not isinstance(node.get("inputs", {}), dict):
            raise InvalidWorkflow(f"Node {node_id!r} ({node['class_type']}): 'inputs' must "
                                  "be an object.", extra={"node_id": node_id})
    extra = {k: v for k, v in extra.items() if k != "client_id"}
    return prompt, extra


def _looks_like_ui_export(value: Any) -> bool:
    return isinstance(value, dict) and "nodes" in value and "links" in value


def fingerprint(prompt: dict[str, Any], extra: dict[str, Any]) -> str:
    canonical = ujson.dumps({"prompt": prompt, "extra_data": extra}, sort_keys=True,
                            ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def describe_node_errors(node_errors: dict[str, Any]) -> str:
    """One readable line per failing input, from ComfyUI's node_errors."""
    parts: list[str] = []
    for node_id, info in node_errors.items():
        if not isinstance(info, dict):
            continue
        class_type = info.get("class_type", "?")
        for err in info.get("errors", []) or []:
            if not isinstance(err, dict):
                continue
            extra = err.get("extra_info") or {}
            input_name = extra.get("input_name") or err.get("details") or "?"
            parts.append(f"node {node_id} ({class_type}) input '{input_name}': "
                         f"{err.get('message', 'invalid')}")
    return "; ".join(parts)


def rejection_detail(body: dict[str, Any]) -> str:
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    node_errors = body.get("node_errors") if isinstance(body.get("node_errors"), dict) else {}
    described = describe_node_errors(node_errors)
    if described:
        return f"ComfyUI rejected the workflow: {described}."
    message = str(error.get("message") or "validation failed")
    details = str(error.get("details") or "")
    return f"ComfyUI rejected the workflow: {message}" + (f" ({details})." if details else "")


# -- handlers -------------------------------------------------------------------

@routes.get("/healthz", name="healthz")
async def get_healthz(request: web.Request) -> web.Response:
    gpus = request.app[GPUS]
    return json_response({
        "status": "ok",
        "gpus": len(gpus),
        "listeners_connected": sum(g.listener_connected for g in gpus),
    })


@routes.get("/serverstatus", name="serverstatus")
async def get_serverstatus(request: web.Request) -> web.Response:
    gpu = gpu_from_query(request)
    timing = request.app[SETTINGS].timing
    probe = await gpu.probe(timeout=timing.status_timeout,
                            max_age=timing.status_cache_seconds)
    return json_response(gpu.status(probe))


@routes.get("/jobstatus/{job_id}/", name="jobstatus")
async def get_jobstatus(request: web.Request) -> web.Response:
    job_id = job_id_from_path(request)
    job = request.app[REGISTRY].get(job_id)
    if job is None:
        raise JobNotFound(f"No job {job_id!r} is known here. Submit it with "
                          f"PUT /startjob/{job_id}/ first.", extra={"job_id": job_id})
    return json_response(status_body(job))


def status_body(job: Job) -> dict[str, Any]:
    body = job.to_status()
    if job.node_errors:
        body["node_errors"] = job.node_errors
    return body


@routes.put("/startjob/{job_id}/", name="startjob")
async def put_startjob(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    gpu_id: int | None = None
    try:
        job_id = job_id_from_path(request)
        callback = request.headers.get("X-Callback-Url")
        if callback is not None:
            callback = check_callback_url(callback)
        try:
            body = ujson.loads(await request.read())
        except ValueError:
            raise BadRequest("The body is not valid JSON. Send an API-format workflow as "
                             "a JSON object.") from None
        prompt, extra = split_workflow(body)
        existing = request.app[REGISTRY].get(job_id)
        if existing is not None and existing.state is not JobState.REJECTED:
            # A repeat is answered from the record, wherever the job was placed.
            gpu = request.app[GPUS][existing.gpu_id]
        else:
            gpu = await gpu_for_new_job(request)
        gpu_id = gpu.index
        return await start_job(request.app, job_id, gpu, prompt, extra, callback)
    except ApiError as exc:
        return startjob_error(job_id, gpu_id, exc)


def startjob_error(job_id: str, gpu_id: int | None, exc: ApiError,
                   **more: Any) -> web.Response:
    body = {"job_id": job_id, "accepted": False, "detail": exc.message, "gpu_id": gpu_id,
            "error": {"code": exc.code, "message": exc.message, **exc.extra}, **more}
    return json_response(body, status=exc.status, headers=exc.headers)


def accepted_body(job: Job, detail: str) -> dict[str, Any]:
    return {"job_id": job.job_id, "accepted": True, "detail": detail,
            "gpu_id": job.gpu_id, "prompt_id": job.prompt_id, "state": job.state.value}


async def gpu_for_new_job(request: web.Request) -> Gpu:
    raw = request.query.get("GpuId")
    default = request.app[SETTINGS].default_gpu
    if raw is None:
        raw = str(default)
    if raw.strip().lower() == "auto":
        return await choose_gpu(request.app)
    gpu = gpu_from_query(request, raw)
    if gpu.drained:
        raise GpuDrained(f"GPU {gpu.index} is drained and takes no new jobs; use another "
                         "GpuId, GpuId=auto, or POST /gpus/{n}/undrain.")
    return gpu


async def start_job(app: web.Application, job_id: str, gpu: Gpu, prompt: dict[str, Any],
                    extra: dict[str, Any], callback: str | None = None) -> web.Response:
    registry = app[REGISTRY]
    submissions = app[SUBMISSIONS]
    digest = fingerprint(prompt, extra)

    existing = registry.get(job_id)
    if existing is not None and existing.state is not JobState.REJECTED:
        if existing.fingerprint != digest:
            return conflict_response(existing)
        pending = submissions.get(job_id)
        if pending is not None:
            # The same PUT is in flight: answer with its outcome, never submit twice.
            await asyncio.shield(pending)
            return repeat_response(registry.get(job_id) or existing)
        return repeat_response(existing)

    if existing is not None and (existing.error or {}).get("code") == "backend_timeout":
        adopted = await adopt_uncertain(app, existing, digest, prompt, callback)
        if adopted is not None:
            return adopted

    prompt_id = str(uuid.uuid4())
    try:
        job = registry.begin(job_id, gpu.index, prompt_id, digest, prompt.keys(),
                             callback_url=callback)
    except JobConflict as exc:
        # Another PUT of this job_id got in while we were asking ComfyUI.
        if exc.job.fingerprint != digest:
            return conflict_response(exc.job)
        return repeat_response(exc.job)
    done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    submissions[job_id] = done
    try:
        settings = app[SETTINGS]
        if settings.dev_mode:
            await save_dev_copy(settings.dev_save_dir, job_id, prompt, extra)
        return await submit(app, job, gpu, prompt, extra)
    finally:
        submissions.pop(job_id, None)
        done.set_result(None)


def conflict_response(job: Job) -> web.Response:
    return startjob_error(job.job_id, job.gpu_id, JobIdConflict(
        f"Job {job.job_id!r} already exists with a different workflow (state "
        f"{job.state.value}). Use a new job_id for a new workflow."), state=job.state.value)


def repeat_response(job: Job) -> web.Response:
    if job.state is JobState.REJECTED:
        return json_response({"job_id": job.job_id, "accepted": False, "detail": job.detail,
                              "gpu_id": job.gpu_id, "state": job.state.value}, status=422)
    return json_response(accepted_body(
        job, f"Job {job.job_id!r} was already accepted with this workflow; nothing was "
             f"submitted again. It is {job.state.value}."), status=200)


async def submit(app: web.Application, job: Job, gpu: Gpu, prompt: dict[str, Any],
                 extra: dict[str, Any]) -> web.Response:
    registry = app[REGISTRY]
    timing = app[SETTINGS].timing
    assert gpu.comfy is not None
    try:
        answer = await gpu.comfy.submit(prompt, extra, gpu.client_id, job.prompt_id,
                                        timeout=timing.submit_timeout)
    except BackendTimeout as exc:
        return await reconcile_timeout(app, job, gpu, exc)
    except BackendError as exc:
        registry.reject(job, exc.message, error={"code": exc.code, "message": exc.message})
        return startjob_error(job.job_id, gpu.index, exc)

    if answer.accepted:
        registry.confirm(job, answer.body.get("node_errors") or None)
        if job.cancel_requested_at is not None:
            # Cancelled while ComfyUI was still answering the submission.
            await cancel_on_comfy(app, job)
        log.info("job %s accepted on gpu %d as prompt %s", job.job_id, gpu.index,
                 job.prompt_id)
        body = accepted_body(job, job.detail)
        if job.node_errors:
            body["node_errors"] = job.node_errors
        return json_response(body, status=202)

    detail = rejection_detail(answer.body)
    node_errors = answer.body.get("node_errors") or {}
    comfy_error = answer.body.get("error") if isinstance(answer.body.get("error"), dict) else {}
    registry.reject(job, detail, node_errors=node_errors or None,
                    error={"code": "validation_failed", **comfy_error})
    return json_response({
        "job_id": job.job_id, "accepted": False, "detail": detail, "gpu_id": gpu.index,
        "node_errors": node_errors, "comfy_error": comfy_error,
        "error": {"code": "validation_failed", "message": detail},
    }, status=422)


async def reconcile_timeout(app: web.Application, job: Job, gpu: Gpu,
                            exc: BackendTimeout) -> web.Response:
    """POST /prompt timed out: ComfyUI may have queued the job before it stalled.
    Ask it, so the job is neither lost (queued but unknown to us) nor run twice."""
    registry = app[REGISTRY]
    assert gpu.comfy is not None
    try:
        queued = await gpu.comfy.is_queued(job.prompt_id)
    except BackendError as again:
        log.warning("job %s: submission timed out and ComfyUI cannot be asked (%s)",
                    job.job_id, again.message)
        queued = None
    if queued:
        registry.confirm(job)
        log.info("job %s: submission timed out but ComfyUI had queued prompt %s",
                 job.job_id, job.prompt_id)
        return json_response(accepted_body(
            job, "ComfyUI was slow to answer, but it had queued the job."), status=202)
    detail = exc.message
    if queued is None:
        detail += (" Cylindria could not check whether ComfyUI queued it; a PUT of the "
                   "same job_id later will check again before submitting anything.")
    registry.reject(job, detail, error={"code": exc.code, "message": detail})
    return startjob_error(job.job_id, gpu.index, BackendTimeout(detail))


async def adopt_uncertain(app: web.Application, old: Job, digest: str,
                          prompt: dict[str, Any], callback: str | None
                          ) -> web.Response | None:
    """A PUT again after a timed-out submission: if ComfyUI did queue that attempt
    after all, track it (on the GPU it went to) instead of submitting a second copy."""
    gpu = app[GPUS][old.gpu_id]
    if old.fingerprint != digest or gpu.comfy is None:
        return None
    try:
        queued = await gpu.comfy.is_queued(old.prompt_id)
    except BackendError:
        return None
    if not queued:
        return None
    registry = app[REGISTRY]
    job = registry.begin(old.job_id, gpu.index, old.prompt_id, digest, prompt.keys(),
                         callback_url=callback)
    registry.confirm(job)
    return json_response(accepted_body(
        job, "The earlier attempt reached ComfyUI after all; tracking it instead of "
             "submitting again."), status=202)


async def save_dev_copy(directory: Path, job_id: str, prompt: dict[str, Any],
                        extra: dict[str, Any]) -> None:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    path = directory / f"{stamp}_{job_id}.json"
    document = {"prompt": prompt, "extra_data": extra} if extra else prompt
    text = ujson.dumps(document, indent=2, ensure_ascii=False, escape_forward_slashes=False)

    def write() -> None:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")

    try:
        await asyncio.to_thread(write)
        log.info("dev mode: saved the workflow of job %s to %s", job_id, path)
    except OSError as exc:
        log.error("dev mode: could not save the workflow of job %s to %s: %s", job_id, path,
                  exc)


# -- listing and cancellation ------------------------------------------------------

MAX_PAGE = 500


@routes.get("/jobs/", name="jobs")
async def get_jobs(request: web.Request) -> web.Response:
    query = request.query
    states: set[str] | None = None
    if query.get("state"):
        states = {s.strip() for s in query["state"].split(",") if s.strip()}
        unknown = states - {s.value for s in JobState}
        if unknown:
            raise BadRequest(f"Unknown state(s) {', '.join(sorted(unknown))}; use "
                             + ", ".join(s.value for s in JobState) + ".")
    gpu_id = None
    if query.get("gpu"):
        gpu_id = gpu_from_query(request, query["gpu"], "gpu").index
    limit = _int_param(query, "limit", 50, 1, MAX_PAGE)
    before = _int_param(query, "before", None, 1, None)
    jobs = request.app[REGISTRY].page(states=states, gpu_id=gpu_id, before=before,
                                      limit=limit + 1)
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return json_response({
        "jobs": [status_body(j) for j in jobs],
        "next_before": jobs[-1].seq if more and jobs else None,
    })


def _int_param(query: Any, name: str, default: int | None, low: int,
               high: int | None) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of {low} or more"
        raise BadRequest(f"{name} must be a whole number {bound} (got {raw!r}).")
    return value


@routes.post("/canceljob/{job_id}/", name="canceljob")
async def post_canceljob(request: web.Request) -> web.Response:
    job_id = job_id_from_path(request)
    registry = request.app[REGISTRY]
    job = registry.get(job_id)
    if job is None:
        raise JobNotFound(f"No job {job_id!r} is known here.", extra={"job_id": job_id})
    if job.terminal:
        body = status_body(job)
        body["error"] = {"code": "job_finished",
                         "message": f"Job {job_id!r} is already {job.state.value}; there is "
                                    "nothing to cancel."}
        return json_response(body, status=409)
    registry.request_cancel(job)
    if job.confirmed:
        await cancel_on_comfy(request.app, job)
    return json_response(status_body(job), status=202)


async def cancel_on_comfy(app: web.Application, job: Job) -> None:
    """Ask ComfyUI to drop or stop this one job, then read back what it did.

    Deleting from the queue is harmless if the job already runs, and the interrupt
    names the prompt, so no other job is ever touched. The job's state changes only
    on ComfyUI's word: gone from its queue without a history entry, or reported
    interrupted (or finished, if the cancel came too late).
    """
    gpu = app[GPUS][job.gpu_id]
    registry = app[REGISTRY]
    assert gpu.comfy is not None
    try:
        await gpu.comfy.delete_pending(job.prompt_id)
        running, pending, _ = sorted_queue(await gpu.comfy.queue())
        if job.prompt_id in running:
            await gpu.comfy.interrupt(job.prompt_id)
            return
        if job.prompt_id in pending:
            return
        entry = await gpu.comfy.history(job.prompt_id)
        if entry is not None:
            registry.settle_from_history(job.prompt_id, entry)
        else:
            registry.confirm_removed(job)
    except BackendError as exc:
        # The poller keeps trying to settle the job; the cancel stays requested.
        log.warning("cancel of job %s: ComfyUI did not answer (%s)", job.job_id, exc.message)
