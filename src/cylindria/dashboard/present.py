"""What the dashboard shows: GPU cards, job rows and job details, with ready-made labels."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

from aiohttp import web

from ..core.records import IN_FLIGHT, RETRYABLE, Job, JobState, isoformat
from ..core.workflow import node_error_lines
from ..jsonio import dumps, pretty
from ..upstream.gpus import Gpu
from ..upstream.heartbeat import NodeSeen
from ..web import render

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})
STATE_LABELS = {state: state.value.capitalize() for state in JobState}


def pretty_json(value: Any) -> str:
    # Through the one encoder: the page embeds it, and its feed carries it as text.
    return pretty(value)


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


# A completed job whose outputs ComfyUI served from its cache and that took less than
# this ran nothing worth timing: it says "from cache" rather than "0.0 s".
CACHED_RUN_SECONDS = 1.0
CACHED_TITLE = ("ComfyUI served the outputs from its cache: an identical workflow ran "
                "before, so the files are the earlier run's.")


def from_cache(job: Job) -> bool:
    return job.state is JobState.COMPLETED and job.outputs_reused


def duration_of(job: Job, now: datetime) -> tuple[float | None, str]:
    """(seconds, label): run time once started, waiting time while queued."""
    if job.started_at is not None:
        end = job.finished_at or now
        seconds = (end - job.started_at).total_seconds()
        if from_cache(job):
            if seconds < CACHED_RUN_SECONDS:
                return seconds, "from cache"
            return seconds, f"{format_duration(seconds)} · from cache"
        return seconds, format_duration(seconds)
    if from_cache(job):
        return None, "from cache"
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


def action_urls(router: web.UrlDispatcher, job: Job) -> tuple[str | None, str | None]:
    """(cancel, retry): the API routes a button may call for this job now, or None."""
    if job.state in IN_FLIGHT:
        return str(router["canceljob"].url_for(job_id=job.job_id)), None
    if job.state in RETRYABLE:
        return None, str(router["retryjob"].url_for(job_id=job.job_id))
    return None, None


def job_row(router: web.UrlDispatcher, job: Job, now: datetime,
            node: str | None = None) -> dict[str, Any]:
    """One job as the pages show it: raw values plus ready-made labels, so the
    server's first paint and the browser's updates read exactly the same. `node`, the
    node that ran it, only where nodes share a database."""
    seconds, duration = duration_of(job, now)
    cancel_url, retry_url = action_urls(router, job)
    row = {
        "job_id": job.job_id,
        "url": str(router["dashboard_job"].url_for(job_id=job.job_id)),
        "gpu_id": job.gpu_id,
        "state": job.state.value,
        "state_label": STATE_LABELS[job.state],
        "terminal": job.terminal,
        "attempt": job.attempt,
        "attempt_label": f"attempt {job.attempt}" if job.attempt > 1 else "",
        "cached": from_cache(job),
        "cancel_url": cancel_url,
        "retry_url": retry_url,
        "progress": job.progress,
        "progress_label": f"{int(job.progress * 100)}%",
        "current_node": job.current_node,
        "node_label": " · ".join(part for part in (node_label(job), *line_labels(job))
                                 if part),
        "submitted_at": isoformat(job.submitted_at),
        "submitted_label": format_moment(job.submitted_at, now),
        "duration_seconds": seconds,
        "duration_label": duration,
        "detail": job.detail,
    }
    if node is not None:
        row["node"] = node
    return row


def line_labels(job: Job) -> list[str]:
    """A waiting or running job's priority (when it has one) and its ETA."""
    labels = []
    if job.held or (job.priority and not job.terminal):
        labels.append(f"priority {job.priority}")
    if not job.terminal and job.eta_seconds is not None:
        labels.append(f"{time_left(job.eta_seconds)} left")
    return labels


def time_left(seconds: float) -> str:
    """A job's forecast in words: every place that shows one says it this way, so one
    forecast never reads as two."""
    whole = round(seconds)
    if seconds < 1:
        return "under a second"
    if whole < 60:
        return f"about {whole} s"
    return f"about {format_duration(whole)}"


def gpu_card(router: web.UrlDispatcher, gpu: Gpu, status: dict[str, Any],
             running: Job | None, now: datetime) -> dict[str, Any]:
    return {
        "gpu_id": gpu.index,
        "comfy_url": gpu.url,
        "status": status["status"],
        "status_label": "OK" if status["status"] == "ok" else "Degraded",
        "drained": gpu.drained,
        "reachable": status["reachable"],
        "listener_connected": status["listener_connected"],
        "queue_remaining": status["queue_remaining"],
        "queue_label": queue_label(status["queue_remaining"]),
        "problem": status.get("detail") or "",
        "comfyui_version": status.get("comfyui_version") or "",
        **vram_fields(status.get("devices")),
        "running": job_row(router, running, now) if running is not None else None,
        "drain_url": str(router["gpu_drain"].url_for(gpu_id=str(gpu.index))),
        "undrain_url": str(router["gpu_undrain"].url_for(gpu_id=str(gpu.index))),
    }


def vram_fields(devices: Any) -> dict[str, Any]:
    """A GPU's first device and its memory, as a card shows them."""
    device = devices[0] if isinstance(devices, list) and devices else {}
    device = device if isinstance(device, dict) else {}
    total, free = device.get("vram_total"), device.get("vram_free")
    has_vram = isinstance(total, int | float) and isinstance(free, int | float) and total > 0
    used = total - free if has_vram else None
    return {
        "device_name": device.get("name") or "",
        "vram_used": used,
        "vram_total": total if has_vram else None,
        "vram_fraction": round(used / total, 4) if has_vram else None,
        "vram_label": (f"{format_bytes(used)} / {format_bytes(total)}" if has_vram
                       else "not reported"),
    }


def node_group(router: web.UrlDispatcher, other: NodeSeen, now: float) -> dict[str, Any]:
    """Another node sharing the database, as the overview shows it: read-only, from its
    last heartbeat. Its GPUs read "Unknown" once it is not alive, as this node's own
    cards do when no update comes."""
    alive = other.alive(now)
    # Links only to a web address: the row is the other node's word, not this one's.
    web_address = other.advertise_url.startswith(("http://", "https://"))
    base = other.advertise_url.rstrip("/") if web_address else None
    return {
        "name": other.name,
        "url": None if base is None else base + "/",
        "alive": alive,
        "stopped": other.stopped,
        "status": "ok" if alive else "degraded",
        "state_label": "Alive" if alive else "Stopped" if other.stopped else "Not alive",
        "seen_label": f"seen {format_duration(other.last_seen(now))} ago",
        "gpus": [peer_card(router, base, gpu, alive) for gpu in other.gpus
                 if isinstance(gpu, dict)],
    }


def peer_card(router: web.UrlDispatcher, base: str | None, gpu: dict[str, Any],
              alive: bool) -> dict[str, Any]:
    """One of another node's GPUs, as its heartbeat carried it (see upstream/heartbeat.py)."""
    status = "unknown" if not alive else "ok" if gpu.get("status") == "ok" else "degraded"
    running = gpu.get("running_job")
    models = gpu.get("models")
    models = [str(model) for model in models] if isinstance(models, list) else []
    remaining = gpu.get("queue_remaining")
    return {
        "gpu_id": gpu.get("gpu_id"),
        "status": status,
        "status_label": {"ok": "OK", "degraded": "Degraded"}.get(status, "Unknown"),
        "drained": bool(gpu.get("drained")),
        "queue_label": queue_label(remaining if isinstance(remaining, int) else None),
        "running": None if running is None else str(running),
        "running_url": None if running is None or base is None else base + str(
            router["dashboard_job"].url_for(job_id=str(running))),
        "models_label": ", ".join(models) or "none loaded",
        "vram_label": vram_fields(gpu.get("devices"))["vram_label"],
    }


def queue_label(remaining: int | None) -> str:
    """ComfyUI's queue as it counts it: the prompt it runs plus those waiting (it takes
    the next one as soon as one ends, so a queue that is not empty has one running)."""
    if remaining is None:
        return "unknown"
    if remaining <= 0:
        return "empty"
    return f"running 1 + waiting {remaining - 1}"


def output_view(entry: dict[str, Any]) -> dict[str, Any]:
    """One entry of a status body's `outputs`, as the job page shows it."""
    node = str(entry.get("node_id") or "")
    if entry["kind"] == "text":
        return {"node_id": node, "kind": "text", "text": str(entry.get("text") or ""),
                "filename": "", "subfolder": "", "type": "", "url": None,
                "thumbnail": False, "caption": f"node {node} · text" if node else "text"}
    filename, subfolder, kind = entry["filename"], entry["subfolder"], entry["kind"]
    where = f"{subfolder}/{filename}" if subfolder else filename
    url = entry.get("url")
    return {
        "node_id": node,
        "kind": kind,
        "filename": filename,
        "subfolder": subfolder,
        "type": entry["type"],
        "url": url,
        "thumbnail": url is not None and (
            kind == "image" or PurePosixPath(filename).suffix.lower() in IMAGE_SUFFIXES),
        "text": None,
        "caption": " · ".join(part for part in (f"node {node}" if node else "",
                                                 entry["type"], where) if part),
    }


def input_view(entry: dict[str, Any]) -> dict[str, Any]:
    """One of a job's input files, as the job page shows it (pictures as thumbnails)."""
    media = entry["media_type"]
    return {"name": entry["name"], "url": entry["url"],
            "thumbnail": media.startswith("image/") and "svg" not in media,
            "caption": f"{entry['name']} · {size_label(entry['size'])} · {media}"}


def size_label(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def job_details(router: web.UrlDispatcher, job: Job, now: datetime,
                node: str | None = None) -> dict[str, Any]:
    error = job.error or None
    node_errors = job.node_errors or None
    row = job_row(router, job, now, node)
    body = render.status_body(job, router)
    outputs = [output_view(entry) for entry in body["outputs"]]
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
            "gpu": gpu_text(job),
            "queue": queue_text(job),
            "attempt": str(job.attempt),
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
        "inputs": [input_view(entry) for entry in body["inputs"]],
        # Lets the page tell whether the outputs changed without comparing them.
        "outputs_key": hashlib.sha256(dumps(outputs).encode()).hexdigest()[:16],
        "attempts": [attempt_row(a, now) for a in reversed(body["attempts"])],
        "extras": extras(body, now),
        "cached_title": CACHED_TITLE,
    }


def queue_text(job: Job) -> str:
    position = job.queue_position
    if job.state is JobState.QUEUED and job.gpu_id is None:
        # Held by Cylindria until a GPU can take it.
        return "held" if position is None else f"held, {position} in line"
    return ("—" if position is None else "running" if position == 0 else str(position))


def gpu_text(job: Job) -> str:
    if job.gpu_id is not None:
        return f"GPU {job.gpu_id}"
    return "not placed yet" if job.state is JobState.QUEUED else "—"


def extras(body: dict[str, Any], now: datetime) -> dict[str, str | None]:
    """Fields a status body may carry beside the usual ones, each as a label, or None
    when the body has no value for it (the page then leaves it out)."""
    priority = body.get("priority")
    eta = body.get("eta_seconds")
    finish = body.get("expected_finish_at")
    placement = body.get("placement")
    is_number = isinstance(eta, int | float) and not isinstance(eta, bool)
    return {
        "priority": None if priority is None else str(priority),
        "eta": time_left(float(eta)) if is_number else None,
        "expected-finish": _moment_label(str(finish), now) if finish else None,
        "placement": str(placement) if placement else None,
    }


def attempt_row(attempt: dict[str, Any], now: datetime) -> dict[str, Any]:
    """One attempt of a job, newest first on the page."""
    error = attempt.get("error") or {}
    state = JobState(attempt["state"])
    return {
        "attempt": str(attempt["attempt"]),
        "gpu": "—" if attempt["gpu_id"] is None else f"GPU {attempt['gpu_id']}",
        "state": state.value,
        "state_label": STATE_LABELS[state],
        "submitted": _moment_label(attempt.get("submitted_at"), now),
        "finished": _moment_label(attempt.get("finished_at"), now),
        "error": str(error.get("message") or error.get("type") or error.get("code") or ""),
        "prompt": attempt["prompt_id"],
    }


def _moment_label(text: str | None, now: datetime) -> str:
    if not text:
        return "—"
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    if moment.tzinfo is not None:
        moment = moment.astimezone(now.tzinfo)
    return format_moment(moment, now)


def _node_of(error: dict[str, Any]) -> str:
    if error.get("node_id") is None:
        return ""
    kind = error.get("node_type")
    return f"{error['node_id']} ({kind})" if kind else str(error["node_id"])
