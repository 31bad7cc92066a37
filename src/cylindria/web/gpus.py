"""`/gpus/`: every GPU's status and load, and draining a GPU of new jobs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from ..appkeys import CLUSTER, GPUS, JOBS
from ..jsonio import json_response
from ..nodes import gpu_name
from ..upstream.gpus import Gpu
from ..upstream.heartbeat import gpu_summary
from . import params, render

routes = web.RouteTableDef()


async def overview(app: web.Application, gpu: Gpu) -> dict[str, Any]:
    jobs = app[JOBS]
    body = render.gpu_overview(gpu, await gpu.probe(), jobs.registry.running_on(gpu.index),
                               jobs.registry.queued_count(gpu.index), jobs.load(gpu))
    body["expected_seconds_to_finish"] = jobs.gpu_eta(gpu)
    return body


@routes.get("/gpus/", name="gpus")
async def get_gpus(request: web.Request) -> web.Response:
    app = request.app
    bodies = await asyncio.gather(*(overview(app, g) for g in app[GPUS]))
    cluster = app[CLUSTER]
    if not cluster.enabled:
        return json_response({"gpus": list(bodies)})
    # With PostgreSQL: each GPU named across the nodes, and every node with its GPUs
    # (this one's live, the others' from their last heartbeat).
    node = cluster.node.name
    for gpu, body in zip(app[GPUS], bodies, strict=True):
        body["name"], body["node"] = gpu_name(node, gpu.index), node
    own = [gpu_summary(node, gpu, await gpu.probe(), app[JOBS]) for gpu in app[GPUS]]
    return json_response({"gpus": list(bodies),
                          "nodes": render.cluster_nodes(cluster, own, time.monotonic())})


@routes.post("/gpus/{gpu_id}/drain", name="gpu_drain")
async def post_gpu_drain(request: web.Request) -> web.Response:
    return await set_drained(request, True)


@routes.post("/gpus/{gpu_id}/undrain", name="gpu_undrain")
async def post_gpu_undrain(request: web.Request) -> web.Response:
    return await set_drained(request, False)


async def set_drained(request: web.Request, drained: bool) -> web.Response:
    gpu = params.gpu(request, request.match_info["gpu_id"], "GPU")
    request.app[JOBS].drain(gpu, drained)
    return json_response(await overview(request.app, gpu))
