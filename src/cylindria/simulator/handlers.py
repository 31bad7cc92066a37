"""ComfyUI's own HTTP endpoints: prompts, queue, interrupt, free, history and information."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..jsonio import json_response
from .engine import Engine, now_ms
from .inputs import InputFiles, content_type
from .nodes import NodeSpec
from .settings import COMFYUI_VERSION, SimSettings, server_features
from .validation import prompt_error, validate_prompt

log = logging.getLogger(__name__)

SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


def _flag(body: Any, key: str) -> bool:
    """`key in body and body[key]`, which also works when the body is not an object."""
    return key in body and bool(body[key])


async def _clear_or_delete(request: web.Request, clear: Callable[[], None],
                           delete: Callable[[Any], None]) -> web.Response:
    """POST /queue and POST /history: {"clear": true} empties, {"delete": [ids]} removes."""
    body = await request.json()
    if _flag(body, "clear"):
        clear()
    if "delete" in body:
        for prompt_id in body["delete"]:
            delete(prompt_id)
    return web.Response()


class ComfyHandlers:
    """Parse the request as ComfyUI does, act on the engine, answer as ComfyUI does."""

    def __init__(self, engine: Engine, catalogue: dict[str, NodeSpec], settings: SimSettings,
                 gpu_index: int, inputs: InputFiles) -> None:
        self._engine = engine
        self._catalogue = catalogue
        self._settings = settings
        self._gpu_index = gpu_index
        self._inputs = inputs
        # Loaders' entries list the input folder, so they are made per request.
        self._object_info = {name: spec.object_info() for name, spec in catalogue.items()
                             if spec.input_file is None}

    # --- POST /prompt and the queue ------------------------------------------------------

    async def post_prompt(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "number" in body:
            number = float(body["number"])
        else:
            front = _flag(body, "front")
            number = self._engine.take_number()
            if front:
                number = -number
        if "prompt" not in body:
            error = prompt_error("no_prompt", "No prompt provided", "No prompt provided")
            return json_response({"error": error, "node_errors": {}}, status=400)
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        targets = body.get("partial_execution_targets")
        ok, error, outputs, node_errors = validate_prompt(self._catalogue, prompt, targets,
                                                          self._inputs.exists)
        extra_data = body.get("extra_data", {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not ok:
            log.debug("prompt %s refused: %s", prompt_id, error["type"])
            return json_response({"error": error, "node_errors": node_errors}, status=400)
        sensitive = {key: extra_data.pop(key) for key in SENSITIVE_EXTRA_DATA_KEYS
                     if key in extra_data}
        extra_data["create_time"] = now_ms()
        self._engine.put((number, prompt_id, prompt, extra_data, outputs, sensitive))
        return json_response({"prompt_id": prompt_id, "number": number,
                              "node_errors": node_errors})

    async def get_prompt(self, request: web.Request) -> web.Response:
        return json_response({"exec_info": {"queue_remaining": self._engine.queue_remaining}})

    async def get_queue(self, request: web.Request) -> web.Response:
        running = self._engine.running
        queue_running = [list(running.item[:5])] if running is not None else []
        # The raw heap array, not sorted: clients must sort by number themselves.
        pending = [list(item[:5]) for item in self._engine.pending]
        return json_response({"queue_running": queue_running, "queue_pending": pending})

    async def post_queue(self, request: web.Request) -> web.Response:
        return await _clear_or_delete(request, self._engine.clear_pending,
                                      self._engine.delete_pending)

    async def post_interrupt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = {}
        self._engine.interrupt(body.get("prompt_id"))
        return web.Response()

    async def post_free(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._engine.free(unload_models=body.get("unload_models", False),
                          free_memory=body.get("free_memory", False))
        return web.Response()

    # --- history -------------------------------------------------------------------------

    async def get_history(self, request: web.Request) -> web.Response:
        history = self._engine.history
        max_items_text = request.query.get("max_items")
        max_items = int(max_items_text) if max_items_text is not None else None
        offset = int(request.query.get("offset", -1))
        if offset < 0 and max_items is not None:
            offset = len(history) - max_items
        out: dict[str, Any] = {}
        for index, (prompt_id, entry) in enumerate(history.items()):
            if index < offset:
                continue
            out[prompt_id] = entry
            if max_items is not None and len(out) >= max_items:
                break
        return json_response(out)

    async def get_history_item(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self._engine.history.get(prompt_id)
        return json_response({prompt_id: entry} if entry is not None else {})

    async def post_history(self, request: web.Request) -> web.Response:
        return await _clear_or_delete(request, self._engine.clear_history,
                                      self._engine.delete_history)

    # --- information ---------------------------------------------------------------------

    async def get_system_stats(self, request: web.Request) -> web.Response:
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            ram_total = os.sysconf("SC_PHYS_PAGES") * page
            ram_free = os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError, AttributeError):
            ram_total, ram_free = 64 * 1024**3, 48 * 1024**3
        total = self._settings.vram_total
        used = min(self._engine.vram_used(), total)
        torch_total = used + 256 * 1024**2
        return json_response({
            "system": {
                "os": os.name,
                "ram_total": ram_total,
                "ram_free": ram_free,
                "comfyui_version": COMFYUI_VERSION,
                "required_frontend_version": "1.35.9",
                "installed_templates_version": "0.7.59",
                "required_templates_version": "0.7.59",
                "python_version": sys.version,
                "pytorch_version": "2.9.1+cu128",
                "embedded_python": False,
                "argv": ["main.py", "--simulated", "--gpu", str(self._gpu_index)],
            },
            "devices": [{
                "name": f"cuda:{self._gpu_index} Simulated GPU",
                "type": "cuda",
                "index": self._gpu_index,
                "vram_total": total,
                "vram_free": total - used,
                "torch_vram_total": torch_total,
                "torch_vram_free": torch_total - used,
            }],
        })

    async def _info(self, names: list[str]) -> dict[str, Any]:
        """/object_info entries; a loader's options are the files at the top of the input
        folder (not those in subfolders) of the content types it takes."""
        files: list[str] | None = None
        out: dict[str, Any] = {}
        for name in names:
            spec = self._catalogue[name]
            declared = spec.input_file
            if declared is None:
                out[name] = self._object_info[name]
                continue
            if files is None:
                files = await asyncio.to_thread(self._inputs.top_files)
            options = sorted(f for f in files
                             if declared.listed is None or content_type(f) in declared.listed)
            out[name] = spec.object_info(options)
        return out

    async def get_object_info(self, request: web.Request) -> web.Response:
        return json_response(await self._info(list(self._catalogue)))

    async def get_object_info_class(self, request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        if name not in self._catalogue:
            return json_response({})
        return json_response(await self._info([name]))

    async def get_features(self, request: web.Request) -> web.Response:
        return json_response(server_features(self._settings))

    async def get_embeddings(self, request: web.Request) -> web.Response:
        return json_response([])

    async def get_model_folders(self, request: web.Request) -> web.Response:
        return json_response(["checkpoints", "loras", "vae", "embeddings", "upscale_models"])

    async def get_models(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder == "checkpoints":
            return json_response(list(self._settings.models))
        if folder in ("loras", "vae", "embeddings", "upscale_models"):
            return json_response([])
        return web.Response(status=404)
