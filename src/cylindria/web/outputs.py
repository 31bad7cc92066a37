"""`/joboutput/{job_id}/{index}`: a job's files, streamed from its GPU's ComfyUI; with
nodes sharing a database, another node's job's files, streamed from that node."""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from ..appkeys import GPUS, JOBS, PEERS, SETTINGS
from ..core import elsewhere
from ..core.numbers import canonical_int
from ..core.ports import HeldElsewhere
from ..errors import BackendError, BackendUnavailable, BadRequest, OutputNotFound
from ..upstream.peers import FORWARDED, holder_url
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
# And of another node's answer, which may be an error in JSON, or a file.
PEER_HEADERS = (*PASSED_HEADERS, "Cache-Control", "Expires")


@routes.get("/joboutput/{job_id}/{index}", name="joboutput")
@access(Access.READ)
async def get_joboutput(request: web.Request) -> web.StreamResponse:
    job_id = request.match_info["job_id"]
    forwarded = request.headers.get(FORWARDED)
    if forwarded is None:
        found = await elsewhere.find_anywhere(request.app[JOBS], job_id)
        if isinstance(found, HeldElsewhere):
            return await from_peer(request, found)
        job = found
    else:  # passed on by another node: this node's jobs only, never passed on again
        job = await request.app[JOBS].find(
            job_id, f" (Asked by node {forwarded[:63]!r}: a request one node passed on "
                    "is not passed on again.)")
    entries = job.output_entries()
    raw = request.match_info["index"]
    index = canonical_int(raw)
    if index is None:
        raise BadRequest(f"The output index must be a whole number in plain digits (got "
                         f"{raw[:40]!r}); the URLs are listed in GET /jobstatus/{job_id}/.")
    if index >= len(entries):
        raise OutputNotFound(
            f"Job {job_id!r} has no output {index}: it has {len(entries)} output(s), "
            f"listed with their URLs in GET /jobstatus/{job_id}/.")
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
            return await relay(request, upstream, resp, PASSED_HEADERS)
    except BackendError as exc:
        if resp is None or not resp.prepared:
            raise
        # Headers are gone already: all that can be done is to cut the body short.
        log.warning("job %s output %s: ComfyUI stopped mid-file (%s)", job_id, raw,
                    exc.message)
        return resp


async def from_peer(request: web.Request, held: HeldElsewhere) -> web.StreamResponse:
    """Another node's job's file, streamed from that node as it answers (status, the
    file's and caching headers, its body; its error answers too)."""
    job_id = held.job.job_id
    base_url = holder_url(held)
    headers = {name: request.headers[name] for name in CONDITIONAL_HEADERS
               if name in request.headers}
    resp: web.StreamResponse | None = None
    try:
        async with request.app[PEERS].get(held.node, base_url,
                                          request.rel_url.raw_path_qs, headers) as upstream:
            resp = web.StreamResponse(status=upstream.status)
            return await relay(request, upstream, resp, PEER_HEADERS)
    except BackendError as exc:
        if resp is None or not resp.prepared:
            raise
        log.warning("job %s output %s: node %s stopped mid-file (%s)", job_id,
                    request.match_info["index"], held.node, exc.message)
        return resp


async def relay(request: web.Request, upstream: aiohttp.ClientResponse,
                resp: web.StreamResponse, passed: tuple[str, ...]) -> web.StreamResponse:
    for name in passed:
        if name in upstream.headers:
            resp.headers[name] = upstream.headers[name]
    answer_headers(request, resp)
    await resp.prepare(request)
    async for chunk in upstream.content.iter_chunked(CHUNK):
        await resp.write(chunk)
    await resp.write_eof()
    return resp
