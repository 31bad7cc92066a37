"""Which GPU takes a job, draining GPUs, and every GPU's status in one call."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from aiohttp import web

from .errors import ApiError, json_response
from .gpus import Gpu, gpu_by_number
from .keys import GPUS, REGISTRY, SETTINGS
from .registry import Registry

routes = web.RouteTableDef()

_tiebreak = itertools.count()


class NoGpuAvailable(ApiError):
    status = 503
    code = "no_gpu_available"


class GpuDrained(ApiError):
    status = 409
    code = "gpu_drained"


def load(gpu: Gpu, registry: Registry) -> int:
    """Running plus queued work: the jobs Cylindria knows, or ComfyUI's own count when
    it is higher (jobs submitted to ComfyUI by someone else)."""
    return max(registry.load(gpu.index), gpu.queue_remaining or 0)


async def choose_gpu(app: web.Application) -> Gpu:
    """The healthy, undrained GPU with the least work; ties rotate."""
    gpus = app[GPUS]
    registry = app[REGISTRY]
    timing = app[SETTINGS].timing
    candidates = [g for g in gpus if not g.drained]
    probes = await asyncio.gather(*(g.probe(timeout=timing.status_timeout,
                                            max_age=timing.status_cache_seconds)
                                    for g in candidates))
    healthy = [g for g, p in zip(candidates, probes, strict=True) if g.healthy(p)]
    if not healthy:
        drained = len(gpus) - len(candidates)
        raise NoGpuAvailable(
            "No GPU can take a job now: none is reachable with its listener connected"
            + (f" ({drained} drained)" if drained else "") + ". Retry shortly.",
            headers={"Retry-After": "5"})
    least = min(load(g, registry) for g in healthy)
    tied = [g for g in healthy if load(g, registry) == least]
    return tied[next(_tiebreak) % len(tied)]


async def gpu_overview(app: web.Application, gpu: Gpu) -> dict[str, Any]:
    timing = app[SETTINGS].timing
    registry = app[REGISTRY]
    probe = await gpu.probe(timeout=timing.status_timeout, max_age=timing.status_cache_seconds)
    body = gpu.status(probe)
    running = registry.running_on(gpu.index)
    body["running_job"] = None if running is None else {
        "job_id": running.job_id, "progress": running.progress,
        "current_node": running.current_node}
    body["queue_depth"] = sum(1 for j in registry.in_flight(gpu.index)
                              if j.state.value == "queued")
    body["load"] = load(gpu, registry)
    body["drained"] = gpu.drained
    return body


@routes.get("/gpus/", name="gpus")
async def get_gpus(request: web.Request) -> web.Response:
    gpus = request.app[GPUS]
    bodies = await asyncio.gather(*(gpu_overview(request.app, g) for g in gpus))
    return json_response({"gpus": list(bodies)})


@routes.post("/gpus/{gpu_id}/drain", name="gpu_drain")
async def post_gpu_drain(request: web.Request) -> web.Response:
    gpu = gpu_by_number(request.app[GPUS], request.match_info["gpu_id"], "GPU")
    gpu.drained = True
    return json_response(await gpu_overview(request.app, gpu))


@routes.post("/gpus/{gpu_id}/undrain", name="gpu_undrain")
async def post_gpu_undrain(request: web.Request) -> web.Response:
    gpu = gpu_by_number(request.app[GPUS], request.match_info["gpu_id"], "GPU")
    gpu.drained = False
    return json_response(await gpu_overview(request.app, gpu))
