"""`/joboutput/{job_id}/{index}`: a job's files, streamed from its GPU's ComfyUI."""

from __future__ import annotations

import logging

from aiohttp import web

from ..appkeys import GPUS, JOBS, SETTINGS
from ..core.numbers import canonical_int
from ..errors import BackendError, BackendUnavailable, BadRequest, OutputNotFound
from .auth import Access, access
from .middlewares import answer_headers

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

CHUNK = 256 * 1024
# Headers of ComfyUI's answer that describe the file; passed on as they are.
PASSED_HEADERS = ("Content-Type", "Content-Length", "Content-Disposition", "Content-Range",
                  "Accept-Ranges", "Last-Modified", "ETag")
# Headers of the client's request that make ComfyUI answer with part of a file, or none.
CONDITIONAL_HEADERS = ("Range", "If-Range", "If-None-Match", "If-Modified-Since")


@routes.get("/joboutput/{job_id}/{index}", name="joboutput")
@access(Access.READ)
async def get_joboutput(request: web.Request) -> web.StreamResponse:
    job_id = request.match_info["job_id"]
    job = await request.app[JOBS].find(job_id)
    entries = job.output_entries()
    raw = request.match_info["index"]
    index = canonical_int(raw)
    if index is None:
        raise BadRequest(f"The output index must be a whole number in plain digits (got "
                         f"{raw[:40]!r}); the URLs are listed in GET /jobstatus/{job_id}/.")
    if index >= len(entries):
        raise OutputNotFound(
            f"Job {job_id!r} has no output {index}: it has {len(entries)} output(s), "
            "listed with their URLs in GET /jobstatus/{job_id}/.")
    entry = entries[index]
    if entry["kind"] == "text":
        # The whole text, however long (status bodies carry only its head).
        return web.Response(body=entry["text"].encode("utf-8", "replace"),
                            content_type="text/plain", charset="utf-8")

    gpu = request.app[GPUS][job.gpu_id]
    params = {"filename": entry["filename"], "subfolder": entry["subfolder"],
              "type": entry["type"]}
    headers = {name: request.headers[name] for name in CONDITIONAL_HEADERS
               if name in request.headers}
    resp: web.StreamResponse | None = None
    try:
        async with gpu.comfy.view(params, headers,
                                  request.app[SETTINGS].timing.request_timeout) as upstream:
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
            answer_headers(request, resp)
            await resp.prepare(request)
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await resp.write(chunk)
            await resp.write_eof()
            return resp
    except BackendError as exc:
        if resp is None or not resp.prepared:
            raise
        # Headers are gone already: all that can be done is to cut the body short.
        log.warning("job %s output %s: ComfyUI stopped mid-file (%s)", job_id, raw,
                    exc.message)
        return resp
