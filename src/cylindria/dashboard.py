"""The operator's dashboard: GPU cards, recent jobs and job details, live in the browser."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
import ujson
from aiohttp import web

from . import auth
from .api import describe_node_errors, status_body
from .errors import JobNotFound, json_response
from .gpus import Gpu
from .keys import GPUS, REGISTRY, SESSIONS, SETTINGS
from .registry import IN_FLIGHT, Job, JobState, isoformat
from .sessions import Sessions

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

RECENT_JOBS = 50
# How often the pages ask for fresh state; the probe behind it is cached for about as
# long (Timing.status_cache_seconds), so faster polling would show nothing new.
POLL_MILLISECONDS = 1000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")

STATE_LABELS = {state: state.value.capitalize() for state in JobState}

# Every asset is served by Cylindria itself; no inline script or style is needed, so
# nothing injected into a page could run even if escaping were ever missed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def pretty_json(value: Any) -> str:
    return ujson.dumps(value, indent=2, ensure_ascii=False, escape_forward_slashes=False)


def templates_dir() -> Path:
    """The templates: inside the installed package, or at the top of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parents[1] / "templates"):
        if (candidate / "index.html").is_file():
            return candidate
    raise FileNotFoundError(f"Cylindria's templates are missing (looked beside {here})")


# -- what the pages show -----------------------------------------------------------

def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_moment(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "—"
    if moment.date() == now.date():
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def format_bytes(count: float) -> str:
    return f"{count / 2**30:.1f} GiB"


def duration_of(job: Job, now: datetime) -> tuple[float | None, str]:
    """(seconds, label): run time once started, waiting time while queued."""
    if job.started_at is not None:
        end = job.finished_at or now
        seconds = (end - job.started_at).total_seconds()
        return seconds, format_duration(seconds)
    if job.state is JobState.QUEUED:
        seconds = (now - job.submitted_at).total_seconds()
        return None, f"waiting {format_duration(seconds)}"
    return None, "—"


def node_label(job: Job) -> str:
    if job.current_node is None:
        return ""
    label = f"node {job.current_node}"
    np = job.node_progress
    if np and np.get("max") and np.get("node") in (None, job.current_node):
        label += f" · step {_number(np.get('value'))}/{_number(np.get('max'))}"
    return label


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def job_row(request: web.Request, job: Job, now: datetime) -> dict[str, Any]:
    """One job as the pages show it: raw values plus ready-made labels, so the
    server's first paint and the browser's updates read exactly the same."""
    seconds, duration = duration_of(job, now)
    return {
        "job_id": job.job_id,
        "url": str(request.app.router["dashboard_job"].url_for(job_id=job.job_id)),
        "gpu_id": job.gpu_id,
        "state": job.state.value,
        "state_label": STATE_LABELS[job.state],
        "terminal": job.terminal,
        "progress": job.progress,
        "progress_label": f"{int(job.progress * 100)}%",
        "current_node": job.current_node,
        "node_label": node_label(job),
        "submitted_at": isoformat(job.submitted_at),
        "submitted_label": format_moment(job.submitted_at, now),
        "duration_seconds": seconds,
        "duration_label": duration,
        "detail": job.detail,
    }


def gpu_card(request: web.Request, gpu: Gpu, status: dict[str, Any],
             running: Job | None, now: datetime) -> dict[str, Any]:
    devices = status.get("devices") or []
    device = devices[0] if devices else {}
    total, free = device.get("vram_total"), device.get("vram_free")
    has_vram = isinstance(total, int | float) and isinstance(free, int | float) and total > 0
    used = total - free if has_vram else None
    return {
        "gpu_id": gpu.index,
        "comfy_url": gpu.url,
        "status": status["status"],
        "status_label": "OK" if status["status"] == "ok" else "Degraded",
        "drained": gpu.drained,
        "reachable": status["reachable"],
        "listener_connected": status["listener_connected"],
        "queue_remaining": status["queue_remaining"],
        "queue_label": ("unknown" if status["queue_remaining"] is None
                        else str(status["queue_remaining"])),
        "problem": status.get("detail") or "",
        "comfyui_version": status.get("comfyui_version") or "",
        "device_name": device.get("name") or "",
        "vram_used": used,
        "vram_total": total if has_vram else None,
        "vram_fraction": round(used / total, 4) if has_vram else None,
        "vram_label": (f"{format_bytes(used)} / {format_bytes(total)}" if has_vram
                       else "not reported"),
        "running": job_row(request, running, now) if running is not None else None,
    }


def in_flight_scan(jobs: dict[str, Job]) -> tuple[dict[int, Job], int]:
    """(the running job of each GPU, how many jobs are in flight) in one pass over the
    jobs, which the page asks for every second."""
    running: dict[int, Job] = {}
    count = 0
    for job in jobs.values():
        if job.state in IN_FLIGHT:
            count += 1
            if job.state is JobState.RUNNING:
                # The first one, as Registry.running_on answers.
                running.setdefault(job.gpu_id, job)
    return running, count


async def gpu_cards(request: web.Request, now: datetime,
                    running: dict[int, Job]) -> list[dict[str, Any]]:
    timing = request.app[SETTINGS].timing
    gpus = request.app[GPUS]
    # Probes are cached and shared with /serverstatus, so a poll costs at most one
    # upstream call per GPU per cache period, and they run side by side.
    probes = await asyncio.gather(*(
        gpu.probe(timeout=timing.status_timeout, max_age=timing.status_cache_seconds)
        for gpu in gpus))
    return [gpu_card(request, gpu, gpu.status(probe), running.get(gpu.index), now)
            for gpu, probe in zip(gpus, probes, strict=True)]


def recent_jobs(request: web.Request, now: datetime) -> list[dict[str, Any]]:
    jobs = request.app[REGISTRY].jobs
    # Newest first without walking every job: dicts iterate in insertion order, and a
    # resubmitted rejected job keeps its old slot, hence the sort of the window.
    window = list(itertools.islice(reversed(jobs.values()), RECENT_JOBS))
    window.sort(key=lambda j: j.submitted_at, reverse=True)
    return [job_row(request, job, now) for job in window]


async def dashboard_state(request: web.Request) -> dict[str, Any]:
    now = datetime.now(UTC)
    jobs = request.app[REGISTRY].jobs
    running, in_flight = in_flight_scan(jobs)
    gpus = await gpu_cards(request, now, running)
    return {
        "generated_at": isoformat(now),
        "generated_label": now.strftime("%H:%M:%S UTC"),
        "summary": (f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''} · {in_flight} in "
                    f"flight · {len(jobs)} job{'s' if len(jobs) != 1 else ''} known"),
        "recent_limit": RECENT_JOBS,
        "gpus": gpus,
        "jobs": recent_jobs(request, now),
    }


def output_entries(outputs: Any) -> list[dict[str, Any]]:
    """Job outputs as one flat list, from either shape a job may carry.

    Normalised: `[{node_id, kind, filename, subfolder, type, url}]`. ComfyUI's own:
    `{node_id: {kind: [{filename, subfolder, type}, ...]}}`, which has no URL yet.
    """
    entries: list[dict[str, Any]] = []
    if isinstance(outputs, list):
        for item in outputs:
            if isinstance(item, dict) and item.get("kind") == "text":
                entries.append(text_entry(item.get("node_id"), item.get("text")))
            elif isinstance(item, dict):
                entries.append(output_entry(item.get("node_id"), item.get("kind"), item,
                                            item.get("url")))
    elif isinstance(outputs, dict):
        for node_id, output in outputs.items():
            if not isinstance(output, dict):
                continue
            for kind, items in output.items():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and item.get("filename"):
                        entries.append(output_entry(node_id, kind, item, None))
                    elif kind == "text":
                        entries.append(text_entry(node_id, item))
    return entries


def text_entry(node_id: Any, text: Any) -> dict[str, Any]:
    node = "" if node_id is None else str(node_id)
    return {"node_id": node, "kind": "text", "text": "" if text is None else str(text),
            "filename": "", "subfolder": "", "type": "", "url": None, "thumbnail": False,
            "caption": f"node {node} · text" if node else "text"}


def output_entry(node_id: Any, kind: Any, item: dict[str, Any], url: Any) -> dict[str, Any]:
    filename = str(item.get("filename") or "")
    # Only links back into this service; anything else is shown as a name.
    link = url if isinstance(url, str) and url.startswith("/") and not url.startswith("//") \
        else None
    subfolder = str(item.get("subfolder") or "")
    where = f"{subfolder}/{filename}" if subfolder else filename
    node = "" if node_id is None else str(node_id)
    return {
        "node_id": node,
        "kind": "" if kind is None else str(kind),
        "filename": filename,
        "subfolder": subfolder,
        "type": str(item.get("type") or ""),
        "url": link,
        "thumbnail": link is not None and (kind in ("image", "images")
                                           or filename.lower().endswith(IMAGE_SUFFIXES)),
        "text": None,
        "caption": " · ".join(part for part in (f"node {node}" if node else "",
                                                 str(item.get("type") or ""), where) if part),
    }


def job_details(request: web.Request, job: Job) -> dict[str, Any]:
    now = datetime.now(UTC)
    error = job.error or None
    node_errors = job.node_errors or None
    row = job_row(request, job, now)
    position = job.queue_position
    body = status_body(job)
    # The status body carries the outputs in whichever shape the API publishes.
    outputs = output_entries(body.get("outputs"))
    return {
        **row,
        "generated_label": now.strftime("%H:%M:%S UTC"),
        "status": body,
        "status_json": pretty_json(body),
        # Plain text fields by the name of the element that shows them.
        "text": {
            "state": row["state_label"],
            "percent": row["progress_label"],
            "detail": job.detail,
            "gpu": f"GPU {job.gpu_id}",
            "queue": ("—" if position is None else "running" if position == 0
                      else str(position)),
            "node": row["node_label"] or "—",
            "duration": row["duration_label"],
            "prompt": job.prompt_id,
            "at-submitted": isoformat(job.submitted_at) or "—",
            "at-started": isoformat(job.started_at) or "—",
            "at-finished": isoformat(job.finished_at) or "—",
            "at-updated": isoformat(job.updated_at) or "—",
            "outputs-empty": "No outputs." if job.terminal else "No outputs yet.",
        },
        "error": None if error is None else {
            "kind": str(error.get("type") or error.get("code") or "error"),
            "message": str(error.get("message") or ""),
            "node": _node_of(error),
            "traceback": "\n".join(str(line).rstrip("\n")
                                   for line in error.get("traceback") or []),
        },
        "node_errors": None if node_errors is None else {
            "summary": "\n".join(node_error_lines(node_errors)),
            "raw": pretty_json(node_errors),
        },
        "outputs": outputs,
        # Lets the page tell whether the outputs changed without comparing them.
        "outputs_key": hashlib.sha256(ujson.dumps(outputs, sort_keys=True).encode())
        .hexdigest()[:16],
    }


def node_error_lines(node_errors: dict[str, Any]) -> list[str]:
    """One line per failing input, with ComfyUI's details (which name the bad value)."""
    lines: list[str] = []
    for node_id, info in node_errors.items():
        if not isinstance(info, dict):
            continue
        for err in info.get("errors") or []:
            if not isinstance(err, dict):
                continue
            extra = err.get("extra_info") if isinstance(err.get("extra_info"), dict) else {}
            line = f"Node {node_id} ({info.get('class_type', '?')})"
            if extra.get("input_name"):
                line += f", input '{extra['input_name']}'"
            line += f": {err.get('message') or 'invalid'}"
            if err.get("details"):
                line += f" ({err['details']})"
            lines.append(line)
    return lines or [describe_node_errors(node_errors)]


def _node_of(error: dict[str, Any]) -> str:
    if error.get("node_id") is None:
        return ""
    kind = error.get("node_type")
    return f"{error['node_id']} ({kind})" if kind else str(error["node_id"])


def find_job(request: web.Request) -> Job:
    # A plain lookup: ids that the API would refuse simply are not found.
    job_id = request.match_info["job_id"]
    job = request.app[REGISTRY].get(job_id)
    if job is None:
        raise JobNotFound(f"No job {job_id!r} is known here.", extra={"job_id": job_id})
    return job


def page_context(request: web.Request, **values: Any) -> dict[str, Any]:
    settings = request.app[SETTINGS]
    return {"keyed": bool(settings.api_key), "signout": True, "poll_ms": POLL_MILLISECONDS,
            **values}


def render(template: str, request: web.Request, context: dict[str, Any],
           status: int = 200) -> web.Response:
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def see_other(location: str) -> web.Response:
    # A plain response rather than a raised HTTPSeeOther, so it can carry cookies.
    return web.Response(status=303, headers={"Location": location, **SECURITY_HEADERS})


def feed(data: Any, status: int = 200) -> web.Response:
    return json_response(data, status=status, headers={"Cache-Control": "no-store"})


# -- handlers --------------------------------------------------------------------------

@routes.get("/", name="index")
async def get_index(request: web.Request) -> web.Response:
    state = await dashboard_state(request)
    return render("index.html", request, page_context(request, state=state))


@routes.get("/dashboard/state", name="dashboard_state")
async def get_dashboard_state(request: web.Request) -> web.Response:
    return feed(await dashboard_state(request))


@routes.get("/dashboard/job/{job_id}", name="dashboard_job")
async def get_dashboard_job(request: web.Request) -> web.Response:
    try:
        job = find_job(request)
    except JobNotFound:
        context = page_context(request, job=None, job_id=request.match_info["job_id"])
        return render("job.html", request, context, status=404)
    return render("job.html", request, page_context(request, job=job_details(request, job)))


@routes.get("/dashboard/job/{job_id}/state", name="dashboard_job_state")
async def get_dashboard_job_state(request: web.Request) -> web.Response:
    return feed(job_details(request, find_job(request)))


@routes.get("/dashboard/login", name="dashboard_login")
async def get_login(request: web.Request) -> web.Response:
    target = auth.safe_next(request.query.get("next"))
    if not request.app[SETTINGS].api_key or auth.signed_in(request):
        return see_other(target or str(request.app.router["index"].url_for()))
    return render("login.html", request, page_context(request, next=target or "",
                                                      message="", signout=False))


@routes.post("/dashboard/login", name="dashboard_login")
async def post_login(request: web.Request) -> web.Response:
    form = await request.post()
    target = auth.safe_next(str(form.get("next") or "")) or str(
        request.app.router["index"].url_for())
    api_key = request.app[SETTINGS].api_key
    if not api_key:
        return see_other(target)
    given = str(form.get("key") or "")
    if not given:
        return render("login.html", request, page_context(
            request, next=target, signout=False,
            message="Enter the key this server was started with."),
            status=400)
    if not auth.key_matches(given, api_key):
        log.warning("dashboard sign-in with a wrong key from %s", request.remote)
        return render("login.html", request, page_context(
            request, next=target, signout=False,
            message="That key is wrong. Try again."), status=401)
    response = see_other(target)
    auth.start_session(request, response)
    log.info("dashboard sign-in from %s", request.remote)
    return response


@routes.post("/dashboard/logout", name="dashboard_logout")
async def post_logout(request: web.Request) -> web.Response:
    response = see_other(str(request.app.router["dashboard_login"].url_for()))
    if request.app[SETTINGS].api_key:
        auth.end_session(request, response)
    return response


def setup(app: web.Application) -> None:
    """Templates, static assets, sign-in sessions and the dashboard's routes."""
    aiohttp_jinja2.setup(
        app, loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=jinja2.select_autoescape(["html", "xml"], default=True))
    app[SESSIONS] = Sessions()
    app.add_routes(routes)
    app.router.add_static("/dashboard/static", templates_dir() / "static",
                          name="dashboard_static", append_version=True)
