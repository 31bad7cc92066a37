"""`create_app(settings)`: wiring only; all I/O starts in the cleanup contexts."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator

import aiohttp
import ujson
from aiohttp import web

from . import api, dashboard, events, outputs, placement
from .auth import make_auth_middleware
from .comfy import ComfyClient
from .config import Settings
from .errors import error_middleware
from .gpus import Gpu
from .hub import EventHub
from .keys import EVENTS, GPUS, REGISTRY, SESSION, SETTINGS, SUBMISSIONS, TASKS, WEBHOOKS
from .listeners import cancel_and_wait, listen, poll
from .registry import Registry
from .webhooks import WebhookSender

log = logging.getLogger(__name__)

# Workflows can embed images as base64; ComfyUI itself takes up to 100 MB.
MAX_BODY_BYTES = 32 * 1024 * 1024
# REST connections allowed per ComfyUI, on top of its one long-lived websocket.
REST_CONNECTIONS_PER_GPU = 32


def create_app(settings: Settings) -> web.Application:
    middlewares = [error_middleware]
    if settings.api_key:
        middlewares.append(make_auth_middleware(settings.api_key))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    registry = Registry()
    app[REGISTRY] = registry
    app[EVENTS] = EventHub(settings.event_buffer, api.status_body)
    app[WEBHOOKS] = WebhookSender(registry, settings.webhook_secret, settings.timing,
                                  api.status_body)
    registry.subscribe(app[EVENTS].publish)
    registry.subscribe(app[WEBHOOKS].on_change)
    # A fresh suffix per process: two Cylindrias on one ComfyUI must never share a
    # clientId (ComfyUI would mute one of them); stable across reconnects.
    instance = secrets.token_hex(4)
    app[GPUS] = [Gpu(index=n, url=settings.gpu_url(n), client_id=f"cylindria-{instance}-gpu{n}")
                 for n in range(settings.num_gpus)]
    app[SESSION] = []
    app[TASKS] = {}
    app[SUBMISSIONS] = {}

    dashboard.setup(app)
    app.add_routes(api.routes)
    app.add_routes(outputs.routes)
    app.add_routes(placement.routes)
    app.add_routes(events.routes)
    # Open event streams end at shutdown, so the server does not wait on them.
    app.on_shutdown.append(close_event_streams)

    # Order matters: teardown runs in reverse, so listeners stop before the
    # session they use is closed.
    app.cleanup_ctx.append(client_session_ctx)
    app.cleanup_ctx.append(webhooks_ctx)
    app.cleanup_ctx.append(listeners_ctx)
    return app


async def close_event_streams(app: web.Application) -> None:
    app[EVENTS].close()


async def webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    sender = app[WEBHOOKS]
    sender.session = app[SESSION][0]
    if not app[SETTINGS].webhook_secret:
        log.info("CYLINDRIA_WEBHOOK_SECRET is not set: webhooks are sent unsigned")
    try:
        yield
    finally:
        await sender.close()
        sender.session = None


async def client_session_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    timing = settings.timing
    per_gpu = REST_CONNECTIONS_PER_GPU + 1
    connector = aiohttp.TCPConnector(limit=per_gpu * settings.num_gpus,
                                     limit_per_host=per_gpu)
    session = aiohttp.ClientSession(
        connector=connector, json_serialize=ujson.dumps,
        timeout=aiohttp.ClientTimeout(total=None, connect=timing.connect_timeout,
                                      sock_connect=timing.connect_timeout))
    app[SESSION].append(session)
    for gpu in app[GPUS]:
        gpu.comfy = ComfyClient(session, gpu.url, timing.request_timeout)
    try:
        yield
    finally:
        for gpu in app[GPUS]:
            await gpu.close()
        await session.close()
        app[SESSION].clear()


async def listeners_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    registry = app[REGISTRY]
    session = app[SESSION][0]
    tasks = app[TASKS]
    for gpu in app[GPUS]:
        wake = asyncio.Event()
        tasks[f"listener-gpu{gpu.index}"] = asyncio.create_task(
            listen(gpu, registry, session, settings.timing, wake),
            name=f"listener-gpu{gpu.index}")
        tasks[f"poller-gpu{gpu.index}"] = asyncio.create_task(
            poll(gpu, registry, settings.timing, wake), name=f"poller-gpu{gpu.index}")
    try:
        yield
    finally:
        await cancel_and_wait(list(tasks.values()))
        tasks.clear()
