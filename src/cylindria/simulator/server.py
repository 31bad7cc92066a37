"""The simulated ComfyUI as an aiohttp application, one per GPU, and serve() to run them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, hdrs, web
from aiohttp.typedefs import Handler

from ..addresses import bracket, is_loopback
from ..jsonio import dumps
from .engine import Engine
from .faults import Controls, Faults, Pauses
from .files import Folders
from .handlers import ComfyHandlers
from .inputs import InputFiles
from .jobs_api import JobsHandlers
from .loaders import loader_specs
from .nodes import build_catalogue
from .settings import COMFYUI_VERSION, SimSettings, server_features
from .sockets import Sockets
from .uploads import Uploads

log = logging.getLogger(__name__)


@web.middleware
async def _origin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # ComfyUI's default guard against cross-site requests to a loopback server:
    # a browser Origin that differs from Host is refused with an empty 403.
    host = request.headers.get(hdrs.HOST)
    origin = request.headers.get(hdrs.ORIGIN)
    if host and origin and not request.path.startswith("/_sim/"):
        host = host.lower()
        if is_loopback(urlsplit("//" + host).hostname) and (
                urlsplit(origin).netloc.lower() != host):
            return web.Response(status=403)
    return await handler(request)


class ComfySimulator:
    """One simulated ComfyUI process serving one GPU."""

    def __init__(self, settings: SimSettings, gpu_index: int = 0) -> None:
        self.settings = settings
        self.gpu_index = gpu_index
        self.catalogue = {**build_catalogue(settings.models), **loader_specs()}
        self._folders = Folders(gpu_index, settings.output_dir)
        self._inputs = InputFiles(self._folders)
        self._uploads = Uploads(self._folders, self._inputs, settings.max_upload_size)
        self._sockets = Sockets()
        self._faults = Faults()
        self._pauses = Pauses()
        self._engine = Engine(settings, self.catalogue, self._sockets, self._pauses,
                              self._folders, self._inputs)
        self._tasks: list[asyncio.Task[None]] = []

    # --- read-only views for tests -------------------------------------------------------

    @property
    def output_dir(self) -> Path | None:
        return self._folders.output

    @property
    def input_dir(self) -> Path | None:
        return self._folders.input

    @property
    def temp_dir(self) -> Path | None:
        return self._folders.temp

    @property
    def uploads(self) -> int:
        """POST /upload/image and /upload/mask requests answered 200, since the start."""
        return self._uploads.count

    async def input_files(self) -> list[dict[str, Any]]:
        """Every file in the input folder, subfolders included:
        [{"name", "subfolder", "type", "size", "sha256"}]."""
        return await self._inputs.inventory()

    @property
    def queue_remaining(self) -> int:
        return self._engine.queue_remaining

    @property
    def history(self) -> dict[str, dict[str, Any]]:
        return self._engine.history

    @property
    def ledger(self) -> dict[str, dict[str, Any]]:
        return self._engine.ledger

    @property
    def models(self) -> dict[str, Any]:
        """Model files in VRAM, least recently used first, and the loads so far:
        {"loaded": [names], "loads": n, "load_seconds": s}."""
        return self._engine.vram.snapshot()

    @property
    def loading_model(self) -> str | None:
        """The model file the running job is loading right now."""
        return self._engine.vram.loading

    @property
    def number(self) -> int:
        return self._engine.number

    @property
    def running_prompt_id(self) -> str | None:
        running = self._engine.running
        return running.prompt_id if running is not None else None

    @property
    def pending_prompt_ids(self) -> list[str]:
        return [item[1] for item in sorted(self._engine.pending, key=lambda i: (i[0], i[1]))]

    @property
    def open_sockets(self) -> int:
        return self._sockets.open_count

    @property
    def registered_clients(self) -> list[str]:
        return self._sockets.client_ids

    @property
    def held_requests(self) -> int:
        """Requests currently held by hang_next()."""
        return self._faults.held

    @property
    def cache_size(self) -> int:
        return len(self._engine.cache)

    @property
    def paused_at(self) -> str | None:
        return self._pauses.at

    @property
    def blocked_at(self) -> str | None:
        """"node:<id>" or "tick:<id>" while the running job sits at a pause point."""
        return self._pauses.blocked_at

    async def until_blocked(self) -> str:
        """Wait until the running job reaches a pause point; returns blocked_at."""
        return await self._pauses.until_blocked()

    # --- fault injection -----------------------------------------------------------------

    async def drop_sockets(self) -> None:
        await self._sockets.close_all()

    async def restart(self, wipe_inputs: bool = False) -> None:
        """Restart as ComfyUI would: the input folder stays unless `wipe_inputs`."""
        running = bool(self._tasks)
        await self._stop_tasks()
        self._engine.reset()
        self._sockets.drop_queued()
        self._pauses.unblock()
        self._folders.clear_temp()
        if wipe_inputs:
            await self._inputs.wipe()
        await self._sockets.close_all()
        self._sockets.forget_clients()
        # Once the application is shut down, a restart must not bring the worker back.
        if running:
            self._start_tasks()
        log.info("simulated GPU %d restarted", self.gpu_index)

    def refuse_websockets(self, refuse: bool) -> None:
        self._faults.refuse_websockets = refuse

    def hang_next(self, count: int = 1, path: str | None = None) -> None:
        self._faults.hang_next(count, path)

    def fail_next(self, count: int = 1, path: str | None = None) -> None:
        self._faults.fail_next(count, path)

    def release_hangs(self) -> None:
        """Answer every hung request, and forget hang rules not used up yet."""
        self._faults.release()

    def pause(self, at: str = "dequeue") -> None:
        """Hold the worker until resume().

        "dequeue": no pending job is taken. "tick": a job blocks right after sending its
        next progress tick; "node": right after announcing its next node (executing
        sent). In those two modes the job already running, or else the next one taken,
        is the only one that starts while paused.
        """
        self._pauses.pause(at, idle=self._engine.running is None)

    def resume(self) -> None:
        self._pauses.resume()
        self._engine.wake()

    # --- application ---------------------------------------------------------------------

    def create_app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_upload_size,
                              middlewares=[self._faults.middleware, _origin_middleware])
        comfy = ComfyHandlers(self._engine, self.catalogue, self.settings, self.gpu_index,
                              self._inputs)
        uploads = self._uploads
        jobs = JobsHandlers(self._engine)
        routes: list[tuple[str, str, Handler, str]] = [
            ("GET", "/ws", self.get_ws, "ws"),
            ("POST", "/prompt", comfy.post_prompt, "post_prompt"),
            ("GET", "/prompt", comfy.get_prompt, "get_prompt"),
            ("GET", "/queue", comfy.get_queue, "get_queue"),
            ("POST", "/queue", comfy.post_queue, "post_queue"),
            ("POST", "/interrupt", comfy.post_interrupt, "post_interrupt"),
            ("POST", "/free", comfy.post_free, "post_free"),
            ("GET", "/history", comfy.get_history, "get_history"),
            ("GET", "/history/{prompt_id}", comfy.get_history_item, "get_history_item"),
            ("POST", "/history", comfy.post_history, "post_history"),
            ("GET", "/api/jobs", jobs.get_jobs, "get_jobs"),
            ("GET", "/api/jobs/{job_id}", jobs.get_job, "get_job"),
            ("GET", "/view", self._folders.get_view, "view"),
            ("POST", "/upload/image", uploads.post_upload_image, "upload_image"),
            ("POST", "/upload/mask", uploads.post_upload_mask, "upload_mask"),
            ("GET", "/system_stats", comfy.get_system_stats, "system_stats"),
            ("GET", "/object_info", comfy.get_object_info, "object_info"),
            ("GET", "/object_info/{node_class}", comfy.get_object_info_class,
             "object_info_class"),
            ("GET", "/features", comfy.get_features, "features"),
            ("GET", "/embeddings", comfy.get_embeddings, "embeddings"),
            ("GET", "/models", comfy.get_model_folders, "models"),
            ("GET", "/models/{folder}", comfy.get_models, "models_folder"),
        ]
        for method, path, handler, name in routes:
            app.router.add_route(method, path, handler, name=name)
            # ComfyUI serves every route a second time under /api.
            app.router.add_route(method, "/api" + path, handler, name="api_" + name)
        Controls(self).add_routes(app.router)
        app.cleanup_ctx.append(self._lifetime)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        self._folders.create()
        self._start_tasks()
        log.debug("simulated GPU %d started, output in %s", self.gpu_index, self.output_dir)
        yield
        await self._stop_tasks()
        self._folders.remove()

    async def _on_shutdown(self, app: web.Application) -> None:
        self._faults.shutdown()
        await self._sockets.close_all()

    def _start_tasks(self) -> None:
        self._tasks = [
            asyncio.create_task(self._engine.run(), name=f"sim-gpu{self.gpu_index}-worker"),
            asyncio.create_task(self._sockets.publish(),
                                name=f"sim-gpu{self.gpu_index}-publisher"),
        ]

    async def _stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- websocket -----------------------------------------------------------------------

    async def get_ws(self, request: web.Request) -> web.StreamResponse:
        if self._faults.refuse_websockets:
            raise web.HTTPServiceUnavailable()
        # A short close timeout keeps shutdown quick when a client never answers the close.
        ws = web.WebSocketResponse(timeout=2.0)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        sockets = self._sockets
        sockets.register(sid, ws)
        try:
            await sockets.deliver(ws, dumps({"type": "status", "data": {
                "status": {"exec_info": {"queue_remaining": self.queue_remaining}},
                "sid": sid}}))
            job = self._engine.running
            if job is not None and job.client_id == sid and job.current_node is not None:
                await sockets.deliver(ws, dumps({"type": "executing",
                                                 "data": {"node": job.current_node}}))
            first = True
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        data = json.loads(msg.data)
                    except json.JSONDecodeError:
                        log.warning("invalid JSON from websocket client %s", sid)
                        continue
                    if first and isinstance(data, dict) and data.get("type") == "feature_flags":
                        flags = data.get("data")
                        sockets.set_flags(sid, flags if isinstance(flags, dict) else {})
                        target = sockets.registered(sid)
                        if target is not None:
                            await sockets.deliver(target, dumps(
                                {"type": "feature_flags",
                                 "data": server_features(self.settings)}))
                    first = False
                elif msg.type == WSMsgType.ERROR:
                    log.warning("websocket %s closed with exception %s", sid, ws.exception())
        finally:
            sockets.unregister(sid, ws)
        return ws


async def serve(host: str, base_port: int, gpus: int, settings: SimSettings) -> None:
    """Run `gpus` simulators on consecutive ports base_port+n until cancelled; clean up
    runners on cancel."""
    runners: list[web.AppRunner] = []
    try:
        for index in range(gpus):
            gpu_settings = settings
            if settings.output_dir is not None:
                gpu_settings = dataclasses.replace(
                    settings, output_dir=Path(settings.output_dir) / f"gpu{index}")
            # No access log: Cylindria polls once a second, which would drown the output.
            runner = web.AppRunner(ComfySimulator(gpu_settings, gpu_index=index).create_app(),
                                   access_log=None)
            await runner.setup()
            runners.append(runner)
            port = base_port + index
            await web.TCPSite(runner, host, port).start()
            log.info("simulated ComfyUI %s for GPU %d listening on http://%s:%d",
                     COMFYUI_VERSION, index, bracket(host), port)
        await asyncio.Future()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
