"""`/joboutput/{job_id}/{index}`: a job's files, streamed from its GPU's ComfyUI."""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from .errors import ApiError, BackendTimeout, BackendUnavailable, JobNotFound
from .keys import GPUS, REGISTRY, SETTINGS

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

CHUNK = 256 * 1024
# Headers of ComfyUI's answer that describe the file; passed on as they are.
PASSED_HEADERS = ("Content-Type", "Content-Length", "Content-Disposition", "Content-Range",
                  "Accept-Ranges", "Last-Modified", "ETag")


class OutputNotFound(ApiError):
    status = 404
    code = "output_not_found"


@routes.get("/joboutput/{job_id}/{index}", name="joboutput")
async def get_joboutput(request: web.Request) -> web.StreamResponse:
    job_id = request.match_info["job_id"]
    job = request.app[REGISTRY].get(job_id)
    if job is None:
        raise JobNotFound(f"No job {job_id!r} is known here.", extra={"job_id": job_id})
    entries = job.output_entries()
    raw = request.match_info["index"]
    if not raw.isdigit() or int(raw) >= len(entries):
        raise OutputNotFound(
            f"Job {job_id!r} has no output {raw!r}: it has {len(entries)} output(s), "
            "listed with their URLs in GET /jobstatus/{job_id}/.")
    entry = entries[int(raw)]
    if entry["kind"] == "text":
        return web.Response(text=entry["text"], content_type="text/plain")

    gpu = request.app[GPUS][job.gpu_id]
    assert gpu.comfy is not None
    timing = request.app[SETTINGS].timing
    params = {"filename": entry["filename"], "subfolder": entry["subfolder"],
              "type": entry["type"]}
    headers = {}
    for name in ("Range", "If-Range", "If-None-Match", "If-Modified-Since"):
        if name in request.headers:
            headers[name] = request.headers[name]
    # No total timeout: a large file may take long; a stalled read still ends.
    timeout = aiohttp.ClientTimeout(total=None, sock_read=timing.request_timeout)
    resp: web.StreamResponse | None = None
    try:
        async with gpu.comfy.session.get(gpu.comfy.url("/view"), params=params,
                                         headers=headers, timeout=timeout) as upstream:
            if upstream.status == 404:
                raise OutputNotFound(
                    f"ComfyUI on GPU {gpu.index} no longer has {entry['filename']!r} "
                    "(deleted, or a temporary preview cleared by a restart).")
            if upstream.status not in (200, 206, 304, 416):
                raise BackendUnavailable(
                    f"ComfyUI on GPU {gpu.index} answered HTTP {upstream.status} for "
                    f"{entry['filename']!r}.")
            resp = web.StreamResponse(status=upstream.status)
            for name in PASSED_HEADERS:
                if name in upstream.headers:
                    resp.headers[name] = upstream.headers[name]
            await resp.prepare(request)
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await resp.write(chunk)
            await resp.write_eof()
            return resp
    except (TimeoutError, aiohttp.ClientError) as exc:
        if resp is not None and resp.prepared:
            # Headers are gone already: all we can do is cut the body short.
            log.warning("job %s output %s: ComfyUI stopped mid-file (%s)", job_id, raw, exc)
            return resp
        if isinstance(exc, aiohttp.ClientError):
            raise BackendUnavailable(
                f"ComfyUI on GPU {gpu.index} is unreachable ({exc}); the file cannot be "
                "fetched now.") from None
        raise BackendTimeout(f"ComfyUI on GPU {gpu.index} stalled while sending "
                             f"{entry['filename']!r}.") from None
