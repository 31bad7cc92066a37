"""Every JSON body the API sends: job status, /startjob replies, GPU status, listings."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC
from typing import Any, TypeVar
from urllib.parse import quote

from aiohttp import hdrs, web
from multidict import CIMultiDict

from ..core.inputs import REF_PREFIX
from ..core.jobs import Outcome, Verdict
from ..core.listing import ClusterPage
from ..core.ports import HeldElsewhere
from ..core.records import Job, isoformat
from ..errors import ApiError
from ..jsonio import dumps, json_response
from ..store.inputs import StoredInput
from ..upstream.gpus import Gpu, Probe
from ..upstream.heartbeat import Cluster
from ..upstream.peers import PeerAnswer

T = TypeVar("T")


def output_url(router: web.UrlDispatcher, job_id: str, index: int) -> str:
    return str(router["joboutput"].url_for(job_id=job_id, index=str(index)))


# Longer text outputs are cut in status bodies (and so in events, lists and webhooks);
# their URL serves the whole text.
TEXT_INLINE_BYTES = 64 * 1024
# A page of GET /jobs/ stops growing past this many bytes; `next_before` goes on.
PAGE_BYTES = 4 * 1024 * 1024


def outputs(job: Job, router: web.UrlDispatcher) -> list[dict[str, Any]]:
    """The job's outputs; each file with the URL that serves it, and each text that is
    too long to inline cut short, with the URL of the whole."""
    entries = job.output_entries()
    for index, entry in enumerate(entries):
        if entry["kind"] != "text":
            entry["url"] = output_url(router, job.job_id, index)
        else:
            head = text_head(entry["text"], TEXT_INLINE_BYTES)
            if head is not None:
                entry.update(text=head, truncated=True,
                             url=output_url(router, job.job_id, index))
    return entries


def input_url(router: web.UrlDispatcher, ident: str) -> str:
    return str(router["input"].url_for(input_id=ident))


def input_body(entry: StoredInput, router: web.UrlDispatcher, name: str) -> dict[str, Any]:
    """One stored input as POST /inputs/ answers it: `ref` goes into a workflow."""
    return {"id": entry.id, "size": entry.size, "media_type": entry.media_type,
            "name": name, "url": input_url(router, entry.id), "ref": REF_PREFIX + entry.id}


def input_headers(entry: StoredInput) -> dict[str, str]:
    """Headers for serving a stored input: pictures, video and sound inline (the
    dashboard shows them), anything else as a download; never run as a page."""
    kind = entry.media_type.split("/")[0]
    inline = kind in ("video", "audio") or (kind == "image" and "svg" not in entry.media_type)
    plain = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_"
                    for c in entry.name)
    disposition = (f'{"inline" if inline else "attachment"}; filename="{plain}"; '
                   f"filename*=UTF-8''{quote(entry.name, safe='')}")
    return {"Content-Type": entry.media_type, "Content-Disposition": disposition,
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": "private, max-age=31536000, immutable"}


def job_inputs(job: Job, router: web.UrlDispatcher) -> list[dict[str, Any]]:
    return [{"id": item["id"], "name": item["name"], "size": item["size"],
             "media_type": item["media_type"], "url": input_url(router, item["id"])}
            for item in job.inputs or ()]


def text_head(text: str, limit: int) -> str | None:
    """The longest prefix of `text` within `limit` UTF-8 bytes, or None if the whole
    text fits."""
    if len(text) * 4 <= limit:
        return None
    head = text[:limit].encode("utf-8", "surrogatepass")
    if len(head) <= limit and len(text) <= limit:
        return None
    return head[:limit].decode("utf-8", "ignore")


def status_body(job: Job, router: web.UrlDispatcher) -> dict[str, Any]:
    """The `/jobstatus` body, also sent by events and webhooks."""
    body = {
        "job_id": job.job_id,
        "state": job.state.value,
        "gpu_id": job.gpu_id,
        "submitted_at": isoformat(job.submitted_at),
        "updated_at": isoformat(job.updated_at),
        "progress": job.progress,
        "detail": job.detail,
        "prompt_id": job.prompt_id,
        "queue_position": job.queue_position,
        "current_node": job.current_node,
        "node_progress": job.node_progress,
        "started_at": isoformat(job.started_at),
        "finished_at": isoformat(job.finished_at),
        "error": job.error,
        "outputs": outputs(job, router),
        "outputs_reused": job.outputs_reused,
        "inputs": job_inputs(job, router),
        "cancel_requested": job.cancel_requested_at is not None and not job.terminal,
        "webhook": job.webhook,
        "attempt": job.attempt,
        # The last attempts only, and how many there were in all.
        "attempts": job.attempts(),
        "attempts_total": job.attempt,
        "priority": job.priority,
        "placement": job.placement,
        "eta_seconds": None if job.terminal else job.eta_seconds,
        "expected_finish_at": None if job.terminal else isoformat(job.expected_finish_at),
    }
    if job.node_errors:
        body["node_errors"] = job.node_errors
    return body


def elsewhere_body(held: HeldElsewhere, router: web.UrlDispatcher) -> dict[str, Any]:
    """Another node's job (nodes sharing a database), as that node last wrote it: the
    status body with `node`, `node_alive` and `as_of` (the time of the last change the
    node wrote; progress in between is not written). Its outputs and inputs are served
    by that node only: their URLs are on the URL it advertises, and left out when it
    has none on record."""
    body = status_body(held.job, router)
    base = None if held.advertise_url is None else held.advertise_url.rstrip("/")
    for entry in (*body["outputs"], *body["inputs"]):
        if "url" in entry:
            if base is None:
                del entry["url"]
            else:
                entry["url"] = base + entry["url"]
    body.update(node=held.node, node_alive=held.node_alive, as_of=body["updated_at"])
    return body


def finished_body(job: Job | HeldElsewhere, router: web.UrlDispatcher) -> dict[str, Any]:
    """The job beside a `job_finished` error: this node's, or another node's."""
    if isinstance(job, HeldElsewhere):
        return elsewhere_body(job, router)
    return status_body(job, router)


def cancel_passed(held: HeldElsewhere, router: web.UrlDispatcher) -> dict[str, Any]:
    """Another node's job, as it stands, with the cancel passed to that node."""
    body = elsewhere_body(held, router)
    body["message"] = (f"The cancel was passed to node {held.node}, which holds the job; "
                       f"follow it with GET /jobstatus/{held.job.job_id}/ (the state "
                       "becomes cancelled once that node has cancelled it).")
    return body


def status_bytes(job: Job, router: web.UrlDispatcher) -> bytes:
    """The status body serialized, made once per version of the job."""
    if not job.terminal:
        # Its ETA moves with time, not only with its version.
        return dumps(status_body(job, router)).encode()
    if job.body is None or job.body_version != job.version:
        job.body = dumps(status_body(job, router)).encode()
        job.body_version = job.version
    return job.body


class JsonAnswer(web.Response):
    """A JSON answer made with the headers every JSON answer carries (those
    `middlewares.answer_headers` would set), which the error middleware then leaves as
    they are: a poll of `/jobstatus/` costs no header work after it is made."""

    __slots__ = ()


# What answer_headers gives a JSON answer of any route but a job's files.
JSON_HEADERS = CIMultiDict({hdrs.CONTENT_TYPE: "application/json",
                            "X-Content-Type-Options": "nosniff",
                            hdrs.CACHE_CONTROL: "no-store"})


def status_response(job: Job, router: web.UrlDispatcher, status: int = 200) -> web.Response:
    return JsonAnswer(body=status_bytes(job, router), status=status, headers=JSON_HEADERS)


def job_reply(job_id: str, accepted: bool, detail: str, gpu_id: int | None,
              **fields: Any) -> dict[str, Any]:
    """The shape of every `/startjob` answer, accepted or not."""
    return {"job_id": job_id, "accepted": accepted, "detail": detail, "gpu_id": gpu_id,
            **fields}


def passed_back(answer: PeerAnswer) -> web.Response:
    """Another node's JSON answer, as it came: its status, body and Retry-After."""
    resp = web.Response(body=answer.body, status=answer.status,
                        content_type="application/json")
    if answer.retry_after is not None:
        resp.headers["Retry-After"] = answer.retry_after
    return resp


def startjob_reply(outcome: Outcome) -> web.Response:
    """The answer to PUT /startjob and POST /retryjob."""
    job = outcome.job
    if outcome.verdict is Verdict.REFUSED:
        return json_response(job_reply(job.job_id, False, outcome.detail, job.gpu_id,
                                       state=job.state.value), status=422)
    body = job_reply(job.job_id, True, outcome.detail, job.gpu_id, prompt_id=job.prompt_id,
                     state=job.state.value, attempt=job.attempt)
    if job.held:
        body["held"] = True
        body["queue_position"] = job.queue_position
        body["priority"] = job.priority
    if outcome.verdict is Verdict.ACCEPTED:
        if job.node_errors:
            body["node_errors"] = job.node_errors
        return json_response(body, status=202)
    return json_response(body, status=200)


def startjob_refusal(job_id: str, exc: ApiError) -> ApiError:
    """`exc`, carrying the fields of a `/startjob` answer beside its error object."""
    fields = dict(exc.reply)
    exc.reply = job_reply(job_id, False, exc.message, fields.pop("gpu_id", None), **fields)
    return exc


def error_body(exc: ApiError) -> dict[str, Any]:
    return {**exc.reply, "error": {"code": exc.code, "message": exc.message, **exc.extra}}


def seen_gpu_status(entry: dict[str, Any], node: str, alive: bool,
                    last_seen: float) -> dict[str, Any]:
    """`/serverstatus` of another node's GPU: as that node's last heartbeat showed it."""
    body = {key: entry[key] for key in ("status", "gpu_id", "reachable", "queue_remaining",
                                        "drained", "queue_depth", "load", "devices")
            if key in entry}
    running = entry.get("running_job")
    body.update(running_job=None if running is None else {"job_id": running},
                name=entry.get("name"), node=node, node_alive=alive,
                last_seen_seconds=round(last_seen, 3))
    return body


def gpu_status(gpu: Gpu, probe: Probe) -> dict[str, Any]:
    """The `/serverstatus` body for one GPU."""
    reachable = probe.reachable
    body: dict[str, Any] = {
        "status": "ok" if gpu.healthy(probe) else "degraded",
        "comfy_url": gpu.url,
        "reachable": reachable,
        "gpu_id": gpu.index,
        "listener_connected": gpu.listener_connected,
        "queue_remaining": gpu.queue_remaining if reachable else None,
    }
    system = probe.stats.get("system") if reachable else None
    if isinstance(system, dict) and system.get("comfyui_version"):
        body["comfyui_version"] = system["comfyui_version"]
    devices = probe.stats.get("devices") if reachable else None
    if isinstance(devices, list):
        body["devices"] = [
            {"name": d.get("name"), "vram_total": d.get("vram_total"),
             "vram_free": d.get("vram_free")}
            for d in devices if isinstance(d, dict)
        ]
    if probe.error:
        body["detail"] = probe.error
    return body


def readiness(gpus: list[Gpu], probes: list[Probe], writable: bool,
              elsewhere: int | None = None) -> dict[str, Any]:
    """The `/readyz` body: ready while some GPU can take a job and jobs can be kept.
    Open to anyone, so the reasons say what, not where. `elsewhere`: with nodes sharing
    a database, how many of the other alive nodes' GPUs take jobs (this node's
    GpuId=auto jobs go to them too), counted, not named."""
    usable: list[int] = []
    reasons: dict[str, str] = {}
    for gpu, probe in zip(gpus, probes, strict=True):
        if gpu.drained:
            reasons[str(gpu.index)] = "drained"
        elif not probe.reachable:
            reasons[str(gpu.index)] = "ComfyUI unreachable"
        elif not gpu.listener_connected:
            reasons[str(gpu.index)] = "ComfyUI's event socket not connected"
        else:
            usable.append(gpu.index)
    if not writable:
        reasons["state"] = "the job store (state file or database) cannot be written"
    ready = bool(usable or elsewhere) and writable
    if elsewhere is not None:
        return {"status": "ready" if ready else "not_ready", "usable_gpus": usable,
                "usable_elsewhere": elsewhere, "reasons": reasons}
    return {"status": "ready" if ready else "not_ready", "usable_gpus": usable,
            "reasons": reasons}


def gpu_overview(gpu: Gpu, probe: Probe, running: Job | None, queued: int,
                 load: int) -> dict[str, Any]:
    """One GPU in `GET /gpus/`: its status, running job, queue and load."""
    body = gpu_status(gpu, probe)
    body["running_job"] = None if running is None else {
        "job_id": running.job_id, "progress": running.progress,
        "current_node": running.current_node}
    body["queue_depth"] = queued
    body["load"] = load
    body["drained"] = gpu.drained
    return body


def cluster_nodes(cluster: Cluster, own: list[dict[str, Any]],
                  now: float) -> list[dict[str, Any]]:
    """`nodes` in `GET /gpus/` with PostgreSQL: this node first, live, then the others
    by name as their last heartbeat showed them."""
    me = cluster.node
    nodes = [{"name": me.name, "advertise_url": me.advertise_url, "self": True,
              "alive": True, "stopped": False, "last_seen_seconds": 0.0,
              "started_at": isoformat(cluster.started_at), "gpus": own}]
    for other in cluster.others:
        nodes.append({"name": other.name, "advertise_url": other.advertise_url,
                      "self": False, "alive": other.alive(now), "stopped": other.stopped,
                      "last_seen_seconds": round(other.last_seen(now), 3),
                      "started_at": isoformat(other.started_at.astimezone(UTC)),
                      "gpus": other.gpus})
    return nodes


def event_body(job: Job, node: str, cluster: Cluster, now: float,
               router: web.UrlDispatcher) -> bytes:
    """An event of the nodes' database, as `/jobstatus/` shows the job through this
    node: its status as the row was written when it is this node's, else as another
    node's (`elsewhere_body`), that node's URL and liveness from its last heartbeat."""
    if node == cluster.node.name:
        return status_bytes(job, router)
    seen = next((other for other in cluster.others if other.name == node), None)
    held = HeldElsewhere(node, None if seen is None else seen.advertise_url,
                         seen is not None and seen.alive(now), job)
    return dumps(elsewhere_body(held, router)).encode()


def jobs_page(jobs: list[Job], more: bool, router: web.UrlDispatcher) -> web.Response:
    """A page of `GET /jobs/`, joined from each job's serialized status, cut short
    (with a cursor) once it is PAGE_BYTES long."""
    return _joined([(job.seq, job) for job in jobs],
                   lambda job: status_bytes(job, router),
                   jobs[-1].seq if more and jobs else None)


def cluster_jobs_page(page: ClusterPage, node: str,
                      router: web.UrlDispatcher) -> web.Response:
    """A page of `GET /jobs/` with nodes sharing a database: this node's jobs with
    `node` (its name), the others' as `/jobstatus/` shows them; the cursor is the key
    in the order across the nodes."""
    mine = b',"node":' + dumps(node).encode() + b"}"

    def one(entry: Job | HeldElsewhere) -> bytes:
        if isinstance(entry, HeldElsewhere):
            return dumps(elsewhere_body(entry, router)).encode()
        return status_bytes(entry, router)[:-1] + mine  # the object, with one more key

    return _joined(page.entries, one, page.next_before)


def _joined(entries: list[tuple[int, T]], serialized: Callable[[T], bytes],
            cursor: int | None) -> web.Response:
    """`{"jobs": [...], "next_before": ...}` of entries (key, item), cut short once it
    is PAGE_BYTES long, the cursor then the key of the last one in."""
    parts: list[bytes] = []
    size = 0
    for _, item in entries:
        if parts and size >= PAGE_BYTES:
            cursor = entries[len(parts) - 1][0]
            break
        part = serialized(item)
        parts.append(part)
        size += len(part)
    body = (b'{"jobs":[' + b",".join(parts) + b'],"next_before":' + dumps(cursor).encode()
            + b"}")
    return web.Response(body=body, content_type="application/json")
