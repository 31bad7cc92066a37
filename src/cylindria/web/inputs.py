"""The input store's routes: upload files, read one back, delete one."""

from __future__ import annotations

from aiohttp import web

from ..appkeys import INPUTS, SETTINGS
from ..jsonio import json_response
from . import intake, render
from .auth import Access, access

routes = web.RouteTableDef()


@routes.post("/inputs/", name="inputs")
async def post_inputs(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    received = await intake.files(request, request.app[INPUTS], settings.input_max,
                                  settings.timing.body_idle_timeout)
    body = {"inputs": [render.input_body(entry, request.app.router, name)
                       for name, entry in received.files.items()]}
    return json_response(body, status=201 if any(received.created) else 200)


@routes.get("/inputs/{input_id}", name="input")
@access(Access.READ)
async def get_input(request: web.Request) -> web.StreamResponse:
    store = request.app[INPUTS]
    ident = request.match_info["input_id"]
    # With nodes sharing a database, a file this node's disk lacks is read from there.
    entry = await store.obtain(ident) or store.find(ident)
    return web.FileResponse(store.path(entry.id), headers=render.input_headers(entry))


@routes.delete("/inputs/{input_id}", name="input_delete")
async def delete_input(request: web.Request) -> web.Response:
    await request.app[INPUTS].delete(request.match_info["input_id"])
    return web.Response(status=204)
