"""A stand-in for ComfyUI 0.8.0, one aiohttp application per simulated GPU."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import heapq
import ipaddress
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ujson
from aiohttp import WSCloseCode, WSMsgType, hdrs, web

from .simnodes import NodeSpec, SimImage, build_catalogue, write_pngs

log = logging.getLogger(__name__)

DEFAULT_MODELS: tuple[str, ...] = (
    "v1-5-pruned-emaonly.safetensors",
    "sd_xl_base_1.0.safetensors",
    "sd_xl_refiner_1.0.safetensors",
)
COMFYUI_VERSION = "0.8.0"
# ComfyUI drops the oldest entry once the history holds more than this many.
MAXIMUM_HISTORY_SIZE = 10000
SERVER_FEATURES: dict[str, Any] = {
    "supports_preview_metadata": True,
    "max_upload_size": 100 * 1024 * 1024,
    "extension": {"manager": {"supports_v4": True}},
}
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
INTERNAL_ERROR_TEXT = "500 Internal Server Error\n\nServer got itself in trouble"
JOB_STATUSES = ("pending", "in_progress", "completed", "failed")
PAUSE_POINTS = ("dequeue", "node", "tick")

_ujson_dumps = functools.partial(ujson.dumps, escape_forward_slashes=False)


def _dumps(data: Any) -> str:
    try:
        return _ujson_dumps(data)
    except OverflowError:
        # ujson stops at 64-bit integers and refuses NaN; Python's json, which ComfyUI
        # uses, writes both.
        return json.dumps(data)

# (number, prompt_id, prompt, extra_data, outputs_to_execute, sensitive): heap-ordered
# as a plain tuple, exactly like ComfyUI's queue, quirks included.
QueueItem = tuple[Any, str, dict[str, Any], dict[str, Any], list[str], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class SimSettings:
    # Simulated time per progress tick (sampler step, streamed frame); 0 runs flat out.
    step_seconds: float = 0.25
    models: tuple[str, ...] = DEFAULT_MODELS
    # Where SaveImage writes; None means a private directory removed on cleanup.
    output_dir: Path | None = None
    vram_total: int = 24 * 1024**3


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps)


def now_ms() -> int:
    return int(time.time() * 1000)


def _full_type_name(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int))


def _flag(body: Any, key: str) -> bool:
    """`key in body and body[key]`, which also works when the body is not an object."""
    return key in body and bool(body[key])


def _error(kind: str, message: str, details: str) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


# --- prompt validation (the rules and messages of ComfyUI's validate_prompt) -------------

def _types_match(received: str, expected: str) -> bool:
    if received == "*" or expected == "*" or received == expected:
        return True
    return bool({t.strip() for t in received.split(",")}
                & {t.strip() for t in expected.split(",")})


def _validate_node(catalogue: dict[str, NodeSpec], prompt: dict[str, Any], node_id: str,
                   validated: dict[str, tuple[bool, list[dict[str, Any]]]],
                   visiting: set[str]) -> tuple[bool, list[dict[str, Any]]]:
    """Check one node's inputs, following links upstream; coerces literal values in place.

    Lookup failures (a link to a missing node, a node without "inputs") raise, and the
    caller turns them into exception_during_(inner_)validation as ComfyUI does.
    """
    if node_id in validated:
        return validated[node_id]
    if node_id in visiting:
        # ComfyUI recurses until Python gives up on a cycle; the outcome is the same error.
        raise RecursionError("maximum recursion depth exceeded")
    visiting.add(node_id)
    inputs = prompt[node_id]["inputs"]
    spec = catalogue[prompt[node_id]["class_type"]]
    errors: list[dict[str, Any]] = []
    valid = True
    for name in (*spec.required, *spec.optional):
        config, category = spec.input_spec(name)
        assert config is not None
        input_type, extra = config[0], config[1]
        type_name = "COMBO" if isinstance(input_type, list) else input_type
        if name not in inputs:
            if category == "required":
                errors.append({"type": "required_input_missing",
                               "message": "Required input is missing",
                               "details": f"{name}", "extra_info": {"input_name": name}})
            continue
        value = inputs[name]
        if isinstance(value, list):
            if len(value) != 2:
                errors.append({
                    "type": "bad_linked_input",
                    "message": "Bad linked input, must be a length-2 list of "
                               "[node_id, slot_index]",
                    "details": f"{name}",
                    "extra_info": {"input_name": name, "input_config": config,
                                   "received_value": value}})
                continue
            source_id = value[0]
            received = catalogue[prompt[source_id]["class_type"]].outputs[value[1]]
            if not _types_match(received, type_name):
                errors.append({
                    "type": "return_type_mismatch",
                    "message": "Return type mismatch between linked nodes",
                    "details": f"{name}, received_type({received}) mismatch "
                               f"input_type({input_type})",
                    "extra_info": {"input_name": name, "input_config": config,
                                   "received_type": received, "linked_node": value}})
                continue
            try:
                upstream_ok, _ = _validate_node(catalogue, prompt, source_id, validated,
                                                visiting)
            except Exception as exc:
                valid = False
                validated[source_id] = (False, [{
                    "type": "exception_during_inner_validation",
                    "message": "Exception when validating inner node",
                    "details": str(exc),
                    "extra_info": {"input_name": name, "input_config": config,
                                   "exception_message": str(exc),
                                   "exception_type": _full_type_name(exc),
                                   "traceback": traceback.format_tb(exc.__traceback__),
                                   "linked_node": value}}])
                continue
            if not upstream_ok:
                valid = False
            continue
        try:
            if isinstance(value, dict) and "__value__" in value:
                value = value["__value__"]
                inputs[name] = value
            if type_name == "INT":
                value = int(value)
            elif type_name == "FLOAT":
                value = float(value)
            elif type_name == "STRING":
                value = str(value)
            elif type_name == "BOOLEAN":
                value = bool(value)
            inputs[name] = value
        except Exception as exc:
            errors.append({
                "type": "invalid_input_type",
                "message": f"Failed to convert an input value to a {type_name} value",
                "details": f"{name}, {value}, {exc}",
                "extra_info": {"input_name": name, "input_config": config,
                               "received_value": value, "exception_message": str(exc)}})
            continue
        if "min" in extra and value < extra["min"]:
            errors.append({
                "type": "value_smaller_than_min",
                "message": f"Value {value} smaller than min of {extra['min']}",
                "details": f"{name}",
                "extra_info": {"input_name": name, "input_config": config,
                               "received_value": value}})
            continue
        if "max" in extra and value > extra["max"]:
            errors.append({
                "type": "value_bigger_than_max",
                "message": f"Value {value} bigger than max of {extra['max']}",
                "details": f"{name}",
                "extra_info": {"input_name": name, "input_config": config,
                               "received_value": value}})
            continue
        if type_name == "COMBO" and value not in input_type:
            # Long option lists (model folders) are not echoed back.
            if len(input_type) > 20:
                listing, shown = f"(list of length {len(input_type)})", None
            else:
                listing, shown = str(input_type), config
            errors.append({
                "type": "value_not_in_list", "message": "Value not in list",
                "details": f"{name}: '{value}' not in {listing}",
                "extra_info": {"input_name": name, "input_config": shown,
                               "received_value": value}})
            continue
    visiting.discard(node_id)
    result = (valid and not errors, errors)
    validated[node_id] = result
    return result


def validate_prompt(catalogue: dict[str, NodeSpec], prompt: Any,
                    targets: Any = None) -> tuple[bool, Any, list[str], dict[str, Any]]:
    """(ok, error, outputs to execute, node_errors), as POST /prompt reports them.

    Malformed prompts (a list, a node that is a number) raise TypeError, which the
    server turns into its plain-text 500, like ComfyUI.
    """
    outputs: list[str] = []
    for node_id in prompt:
        node = prompt[node_id]
        if "class_type" not in node:
            return False, _error(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'"), [], {}
        class_type = node["class_type"]
        spec = catalogue.get(class_type)
        if spec is None:
            return False, _error(
                "invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                f"Node ID '#{node_id}'"), [], {}
        if spec.output_node and (targets is None or node_id in targets):
            outputs.append(node_id)
    if not outputs:
        return False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}

    good: list[str] = []
    failed: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
    for output_id in outputs:
        try:
            ok, reasons = _validate_node(catalogue, prompt, output_id, validated, set())
        except Exception as exc:
            ok = False
            reasons = [{"type": "exception_during_validation",
                        "message": "Exception when validating node",
                        "details": str(exc),
                        "extra_info": {"exception_type": _full_type_name(exc),
                                       "traceback": traceback.format_tb(exc.__traceback__)}}]
            validated[output_id] = (False, reasons)
        if ok:
            good.append(output_id)
            continue
        if reasons:
            failed.append((output_id, reasons))
        for node_id, (node_ok, node_reasons) in validated.items():
            if node_ok or not node_reasons:
                continue
            if node_id not in node_errors:
                node_errors[node_id] = {"errors": node_reasons, "dependent_outputs": [],
                                        "class_type": prompt[node_id]["class_type"]}
            node_errors[node_id]["dependent_outputs"].append(output_id)
    if not good:
        # Only the output nodes' own errors make it into details: an upstream fault
        # leaves it empty and shows up in node_errors alone.
        details = "\n".join(f"{reason['message']}: {reason['details']}"
                            for _, reasons in failed for reason in reasons)
        return False, _error("prompt_outputs_failed_validation",
                             "Prompt outputs failed validation", details), [], node_errors
    return True, None, good, node_errors


# --- execution state ---------------------------------------------------------------------

class Interrupted(Exception):
    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


class NodeFailed(Exception):
    def __init__(self, node_id: str, payload: dict[str, Any]) -> None:
        super().__init__(node_id)
        self.node_id = node_id
        self.payload = payload


@dataclass(slots=True)
class CacheEntry:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None


@dataclass(slots=True)
class Job:
    """The job the worker is executing."""

    item: QueueItem
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    messages: list[list[Any]] = field(default_factory=list)
    ui: dict[str, dict[str, Any]] = field(default_factory=dict)
    current_node: str | None = None
    succeeded: bool = False

    @property
    def prompt_id(self) -> str:
        return self.item[1]

    @property
    def prompt(self) -> dict[str, Any]:
        return self.item[2]

    @property
    def extra_data(self) -> dict[str, Any]:
        return self.item[3]

    @property
    def client_id(self) -> str | None:
        return self.item[3].get("client_id")


@dataclass(slots=True)
class FaultRule:
    count: int
    path: str | None

    def matches(self, path: str) -> bool:
        if self.path is None:
            return True
        # Either spelling of a route counts: "/prompt" also catches "/api/prompt".
        return path.startswith(self.path) or (
            path.startswith("/api/") and path[4:].startswith(self.path))


class NodeRun:
    """What one executing node sees of the simulator (simnodes.NodeContext)."""

    __slots__ = ("_job", "_node_id", "_sim", "extra_data", "prompt")

    def __init__(self, sim: ComfySimulator, job: Job, node_id: str) -> None:
        self._sim = sim
        self._job = job
        self._node_id = node_id
        self.prompt = job.prompt
        self.extra_data = job.extra_data

    async def work(self, cost: float) -> None:
        delay = cost * self._sim.settings.step_seconds
        await asyncio.sleep(delay if delay > 0 else 0)

    async def tick(self, value: int, total: int, preview: bytes | None = None) -> None:
        await self._sim._tick(self._job, self._node_id, value, total, preview)

    async def save(self, images: SimImage, prefix: str, kind: str) -> list[dict[str, str]]:
        base = self._sim.output_dir if kind == "output" else self._sim.temp_dir
        assert base is not None
        text = {"prompt": json.dumps(self.prompt)}
        pnginfo = self.extra_data.get("extra_pnginfo")
        if isinstance(pnginfo, dict):
            text.update({key: json.dumps(value) for key, value in pnginfo.items()})
        if images.width * images.height > 1_000_000:
            # Big images take a while to deflate; keep the event loop responsive.
            return await asyncio.to_thread(write_pngs, images, prefix, base, kind, text)
        return write_pngs(images, prefix, base, kind, text)


def _format_input(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value)


# --- the server --------------------------------------------------------------------------

class ComfySimulator:
    """One simulated ComfyUI process serving one GPU."""

    def __init__(self, settings: SimSettings, gpu_index: int = 0) -> None:
        self.settings = settings
        self.gpu_index = gpu_index
        self.catalogue = build_catalogue(settings.models)
        self._object_info = {name: spec.object_info() for name, spec in self.catalogue.items()}
        self.output_dir: Path | None = None
        self.temp_dir: Path | None = None
        self.input_dir: Path | None = None
        self._private_root: Path | None = None
        # Process state, all forgotten by restart().
        self._number = 0
        self._pending: list[QueueItem] = []
        self._running: Job | None = None
        self._history: dict[str, dict[str, Any]] = {}
        self._cache: dict[Hashable, CacheEntry] = {}
        self._interrupt = False
        self._free_after_job = False
        self._model_bytes = 0
        self._ticks = 0
        self._outbox: asyncio.Queue[tuple[str | None, str | bytes]] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Sockets: the registry maps clientId to the socket events go to, as ComfyUI's
        # dict does; _sockets holds every open socket, registered or muted.
        self._registry: dict[str, web.WebSocketResponse] = {}
        self._client_flags: dict[str, dict[str, Any]] = {}
        self._sockets: set[web.WebSocketResponse] = set()
        # Fault injection.
        self._refuse_ws = False
        self._hang_rules: list[FaultRule] = []
        self._fail_rules: list[FaultRule] = []
        self._hang_gate = asyncio.Event()
        self._held = 0
        self._pause_at: str | None = None
        # How many jobs may still start while paused at "tick" or "node".
        self._start_budget = 0
        self._resume_gate = asyncio.Event()
        self._resume_gate.set()
        self._blocked = asyncio.Event()
        self._blocked_at: str | None = None

    # --- read-only views for tests -------------------------------------------------------

    @property
    def queue_remaining(self) -> int:
        return len(self._pending) + (1 if self._running is not None else 0)

    @property
    def history(self) -> dict[str, dict[str, Any]]:
        return self._history

    @property
    def number(self) -> int:
        return self._number

    @property
    def running_prompt_id(self) -> str | None:
        return self._running.prompt_id if self._running is not None else None

    @property
    def pending_prompt_ids(self) -> list[str]:
        return [item[1] for item in sorted(self._pending, key=lambda i: (i[0], i[1]))]

    @property
    def open_sockets(self) -> int:
        return len(self._sockets)

    @property
    def registered_clients(self) -> list[str]:
        return list(self._registry)

    @property
    def held_requests(self) -> int:
        """Requests currently held by hang_next()."""
        return self._held

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    @property
    def blocked_at(self) -> str | None:
        """"node:<id>" or "tick:<id>" while the running job sits at a pause point."""
        return self._blocked_at

    async def until_blocked(self) -> str:
        """Wait until the running job reaches a pause point; returns blocked_at."""
        await self._blocked.wait()
        assert self._blocked_at is not None
        return self._blocked_at

    # --- fault injection -----------------------------------------------------------------

    async def drop_sockets(self) -> None:
        await self._close_sockets()

    async def restart(self) -> None:
        running = bool(self._tasks)
        await self._stop_tasks()
        self._number = 0
        self._pending = []
        self._running = None
        self._history = {}
        self._cache = {}
        self._interrupt = False
        self._free_after_job = False
        self._model_bytes = 0
        self._outbox = asyncio.Queue()
        self._blocked.clear()
        self._blocked_at = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir.mkdir(parents=True, exist_ok=True)
        await self._close_sockets()
        self._registry.clear()
        self._client_flags.clear()
        # Once the application is shut down, a restart must not bring the worker back.
        if running:
            self._start_tasks()
        log.info("simulated GPU %d restarted", self.gpu_index)

    def refuse_websockets(self, refuse: bool) -> None:
        self._refuse_ws = refuse

    def hang_next(self, count: int = 1, path: str | None = None) -> None:
        self._hang_rules.append(FaultRule(count, path))

    def fail_next(self, count: int = 1, path: str | None = None) -> None:
        self._fail_rules.append(FaultRule(count, path))

    def release_hangs(self) -> None:
        """Answer every hung request, and forget hang rules not used up yet."""
        self._hang_rules.clear()
        self._hang_gate.set()
        # Later hangs wait on a fresh gate; the released requests already hold the old one.
        self._hang_gate = asyncio.Event()

    def pause(self, at: str = "dequeue") -> None:
        """Hold the worker until resume().

        "dequeue": no pending job is taken. "tick": a job blocks right after sending its
        next progress tick; "node": right after announcing its next node (executing
        sent). In those two modes the job already running, or else the next one taken,
        is the only one that starts while paused.
        """
        if at not in PAUSE_POINTS:
            raise ValueError(f"pause point must be one of {PAUSE_POINTS}, not {at!r}")
        self._pause_at = at
        self._start_budget = 1 if at != "dequeue" and self._running is None else 0
        if self._resume_gate.is_set():
            self._resume_gate = asyncio.Event()

    def resume(self) -> None:
        self._pause_at = None
        self._resume_gate.set()
        self._blocked.clear()
        self._blocked_at = None
        self._wake.set()

    # --- application ---------------------------------------------------------------------

    def create_app(self) -> web.Application:
        app = web.Application(client_max_size=100 * 1024 * 1024,
                              middlewares=[self._fault_middleware, self._origin_middleware])
        routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]],
                           str]] = [
            ("GET", "/ws", self.get_ws, "ws"),
            ("POST", "/prompt", self.post_prompt, "post_prompt"),
            ("GET", "/prompt", self.get_prompt, "get_prompt"),
            ("GET", "/queue", self.get_queue, "get_queue"),
            ("POST", "/queue", self.post_queue, "post_queue"),
            ("POST", "/interrupt", self.post_interrupt, "post_interrupt"),
            ("POST", "/free", self.post_free, "post_free"),
            ("GET", "/history", self.get_history, "get_history"),
            ("GET", "/history/{prompt_id}", self.get_history_item, "get_history_item"),
            ("POST", "/history", self.post_history, "post_history"),
            ("GET", "/api/jobs", self.get_jobs, "get_jobs"),
            ("GET", "/api/jobs/{job_id}", self.get_job, "get_job"),
            ("GET", "/view", self.get_view, "view"),
            ("GET", "/system_stats", self.get_system_stats, "system_stats"),
            ("GET", "/object_info", self.get_object_info, "object_info"),
            ("GET", "/object_info/{node_class}", self.get_object_info_class,
             "object_info_class"),
            ("GET", "/features", self.get_features, "features"),
            ("GET", "/embeddings", self.get_embeddings, "embeddings"),
            ("GET", "/models", self.get_model_folders, "models"),
            ("GET", "/models/{folder}", self.get_models, "models_folder"),
        ]
        for method, path, handler, name in routes:
            app.router.add_route(method, path, handler, name=name)
            # ComfyUI serves every route a second time under /api.
            app.router.add_route(method, "/api" + path, handler, name="api_" + name)
        controls: list[tuple[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
            ("drop_sockets", self.sim_drop_sockets),
            ("restart", self.sim_restart),
            ("refuse_websockets", self.sim_refuse_websockets),
            ("hang", self.sim_hang),
            ("fail", self.sim_fail),
            ("release", self.sim_release),
            ("pause", self.sim_pause),
            ("resume", self.sim_resume),
        ]
        for name, handler in controls:
            app.router.add_post(f"/_sim/{name}", handler, name=f"sim_{name}")
        app.router.add_get("/_sim/state", self.sim_state, name="sim_state")
        app.cleanup_ctx.append(self._lifetime)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        self._make_dirs()
        self._start_tasks()
        log.debug("simulated GPU %d started, output in %s", self.gpu_index, self.output_dir)
        yield
        await self._stop_tasks()
        if self._private_root is not None:
            shutil.rmtree(self._private_root, ignore_errors=True)
            self._private_root = None

    async def _on_shutdown(self, app: web.Application) -> None:
        self._hang_gate.set()
        await self._close_sockets()

    def _make_dirs(self) -> None:
        root = Path(tempfile.mkdtemp(prefix=f"cylindria-sim-gpu{self.gpu_index}-"))
        self._private_root = root
        if self.settings.output_dir is not None:
            self.output_dir = Path(os.path.abspath(self.settings.output_dir))
        else:
            self.output_dir = root / "output"
        self.input_dir = root / "input"
        self.temp_dir = root / "temp"
        for directory in (self.output_dir, self.input_dir, self.temp_dir):
            directory.mkdir(parents=True, exist_ok=True)

    def _start_tasks(self) -> None:
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"sim-gpu{self.gpu_index}-worker"),
            asyncio.create_task(self._publisher(), name=f"sim-gpu{self.gpu_index}-publisher"),
        ]

    async def _stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close_sockets(self) -> None:
        sockets = list(self._sockets)
        await asyncio.gather(
            *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"Server shutdown")
              for ws in sockets),
            return_exceptions=True)

    # --- middlewares ---------------------------------------------------------------------

    @web.middleware
    async def _fault_middleware(
            self, request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if request.path.startswith("/_sim/"):
            return await handler(request)
        if self._take(self._hang_rules, request.path):
            log.debug("holding %s %s until released", request.method, request.path)
            self._held += 1
            try:
                await self._hang_gate.wait()
            finally:
                self._held -= 1
        if self._take(self._fail_rules, request.path):
            return web.Response(status=500, text=INTERNAL_ERROR_TEXT, content_type="text/plain")
        return await handler(request)

    @staticmethod
    def _take(rules: list[FaultRule], path: str) -> bool:
        for rule in rules:
            if rule.matches(path):
                rule.count -= 1
                if rule.count <= 0:
                    rules.remove(rule)
                return True
        return False

    @web.middleware
    async def _origin_middleware(
            self, request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        # ComfyUI's default guard against cross-site requests to a loopback server:
        # a browser Origin that differs from Host is refused with an empty 403.
        host = request.headers.get(hdrs.HOST)
        origin = request.headers.get(hdrs.ORIGIN)
        if host and origin and not request.path.startswith("/_sim/"):
            host = host.lower()
            if _is_loopback(urlsplit("//" + host).hostname) and (
                    urlsplit(origin).netloc.lower() != host):
                return web.Response(status=403)
        return await handler(request)

    # --- outbound messages ---------------------------------------------------------------

    def _send(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        """Queue a text message: to the socket registered as `sid` at send time, or to
        every registered socket when sid is None."""
        self._outbox.put_nowait((sid, _dumps({"type": event, "data": data})))

    def _send_bytes(self, payload: bytes, sid: str | None) -> None:
        self._outbox.put_nowait((sid, payload))

    def _queue_updated(self) -> None:
        self._send("status", {"status": {"exec_info": {"queue_remaining":
                                                      self.queue_remaining}}}, None)

    async def _publisher(self) -> None:
        # One sender for everything, in order: a slow socket delays every other one,
        # exactly the trade-off ComfyUI makes.
        while True:
            sid, payload = await self._outbox.get()
            if sid is None:
                targets = list(self._registry.values())
            else:
                ws = self._registry.get(sid)
                targets = [ws] if ws is not None else []
            for ws in targets:
                await self._deliver(ws, payload)

    @staticmethod
    async def _deliver(ws: web.WebSocketResponse, payload: str | bytes) -> None:
        if ws.closed:
            return
        try:
            if isinstance(payload, str):
                await ws.send_str(payload)
            else:
                await ws.send_bytes(payload)
        except (ConnectionError, RuntimeError) as exc:
            log.debug("dropping a message for a closing socket: %r", exc)

    # --- websocket -----------------------------------------------------------------------

    async def get_ws(self, request: web.Request) -> web.StreamResponse:
        if self._refuse_ws:
            raise web.HTTPServiceUnavailable()
        # A short close timeout keeps shutdown quick when a client never answers the close.
        ws = web.WebSocketResponse(timeout=2.0)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        # A second socket with the same clientId takes over the registry entry; the
        # older one stays open but muted (ComfyUI behaves the same way).
        self._registry[sid] = ws
        self._client_flags[sid] = {}
        self._sockets.add(ws)
        try:
            await self._deliver(ws, _dumps({"type": "status", "data": {
                "status": {"exec_info": {"queue_remaining": self.queue_remaining}},
                "sid": sid}}))
            job = self._running
            if job is not None and job.client_id == sid and job.current_node is not None:
                await self._deliver(ws, _dumps({"type": "executing",
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
                        self._client_flags[sid] = flags if isinstance(flags, dict) else {}
                        target = self._registry.get(sid)
                        if target is not None:
                            await self._deliver(target, _dumps(
                                {"type": "feature_flags", "data": SERVER_FEATURES}))
                    first = False
                elif msg.type == WSMsgType.ERROR:
                    log.warning("websocket %s closed with exception %s", sid, ws.exception())
        finally:
            # Unconditional, as in ComfyUI: when the older of two same-id sockets closes,
            # this unregisters the newer one.
            self._registry.pop(sid, None)
            self._client_flags.pop(sid, None)
            self._sockets.discard(ws)
        return ws

    # --- POST /prompt and the queue ------------------------------------------------------

    async def post_prompt(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "number" in body:
            number = float(body["number"])
        else:
            number = self._number
            if _flag(body, "front"):
                number = -number
            self._number += 1
        if "prompt" not in body:
            error = _error("no_prompt", "No prompt provided", "No prompt provided")
            return json_response({"error": error, "node_errors": {}}, status=400)
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        targets = body.get("partial_execution_targets")
        ok, error, outputs, node_errors = validate_prompt(self.catalogue, prompt, targets)
        extra_data = body.get("extra_data", {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not ok:
            log.debug("prompt %s refused: %s", prompt_id, error["type"])
            return json_response({"error": error, "node_errors": node_errors}, status=400)
        sensitive = {key: extra_data.pop(key) for key in SENSITIVE_EXTRA_DATA_KEYS
                     if key in extra_data}
        extra_data["create_time"] = now_ms()
        self._put((number, prompt_id, prompt, extra_data, outputs, sensitive))
        return json_response({"prompt_id": prompt_id, "number": number,
                              "node_errors": node_errors})

    def _put(self, item: QueueItem) -> None:
        # A duplicate (number, prompt_id) makes the heap compare prompt dicts and raise
        # after the item is already in the list: ComfyUI answers 500 and runs it anyway.
        heapq.heappush(self._pending, item)
        self._queue_updated()
        self._wake.set()

    async def get_prompt(self, request: web.Request) -> web.Response:
        return json_response({"exec_info": {"queue_remaining": self.queue_remaining}})

    async def get_queue(self, request: web.Request) -> web.Response:
        running = [list(self._running.item[:5])] if self._running is not None else []
        # The raw heap array, not sorted: clients must sort by number themselves.
        pending = [list(item[:5]) for item in self._pending]
        return json_response({"queue_running": running, "queue_pending": pending})

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await request.json()
        if _flag(body, "clear"):
            self._pending = []
            self._queue_updated()
        if "delete" in body:
            for prompt_id in body["delete"]:
                for index, item in enumerate(self._pending):
                    if item[1] == prompt_id:
                        self._pending.pop(index)
                        heapq.heapify(self._pending)
                        self._queue_updated()
                        break
        return web.Response()

    async def post_interrupt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = {}
        prompt_id = body.get("prompt_id")
        if prompt_id:
            if self._running is not None and self._running.prompt_id == prompt_id:
                log.info("interrupting prompt %s", prompt_id)
                self._interrupt = True
            else:
                log.info("prompt %s is not currently running, skipping interrupt", prompt_id)
        else:
            self._interrupt = True
        return web.Response()

    async def post_free(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("unload_models", False):
            self._model_bytes = 0
        if body.get("free_memory", False):
            if self._running is None:
                self._cache.clear()
            else:
                self._free_after_job = True
        return web.Response()

    # --- history and jobs ----------------------------------------------------------------

    async def get_history(self, request: web.Request) -> web.Response:
        max_items_text = request.query.get("max_items")
        max_items = int(max_items_text) if max_items_text is not None else None
        offset = int(request.query.get("offset", -1))
        if offset < 0 and max_items is not None:
            offset = len(self._history) - max_items
        out: dict[str, Any] = {}
        for index, (prompt_id, entry) in enumerate(self._history.items()):
            if index < offset:
                continue
            out[prompt_id] = entry
            if max_items is not None and len(out) >= max_items:
                break
        return json_response(out)

    async def get_history_item(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self._history.get(prompt_id)
        return json_response({prompt_id: entry} if entry is not None else {})

    async def post_history(self, request: web.Request) -> web.Response:
        body = await request.json()
        if _flag(body, "clear"):
            self._history = {}
        if "delete" in body:
            for prompt_id in body["delete"]:
                self._history.pop(prompt_id, None)
        return web.Response()

    def _all_jobs(self) -> list[dict[str, Any]]:
        jobs = []
        if self._running is not None:
            jobs.append(_queued_job(self._running.item, "in_progress"))
        jobs.extend(_queued_job(item, "pending") for item in self._pending)
        jobs.extend(_history_job(prompt_id, entry, detail=False)
                    for prompt_id, entry in self._history.items())
        return jobs

    async def get_jobs(self, request: web.Request) -> web.Response:
        query = request.query
        statuses: list[str] | None = None
        if "status" in query:
            statuses = [s.strip() for s in query["status"].split(",") if s.strip()]
            bad = [s for s in statuses if s not in JOB_STATUSES]
            if bad:
                return json_response({"error": f"Invalid status value(s): {', '.join(bad)}. "
                                               f"Valid values: {', '.join(JOB_STATUSES)}"},
                                     status=400)
        sort_by = query.get("sort_by", "created_at")
        if sort_by not in ("created_at", "execution_duration"):
            return json_response(
                {"error": "sort_by must be 'created_at' or 'execution_duration'"}, status=400)
        sort_order = query.get("sort_order", "desc")
        if sort_order not in ("asc", "desc"):
            return json_response({"error": "sort_order must be 'asc' or 'desc'"}, status=400)
        limit: int | None = None
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                limit = 0
            if limit <= 0:
                return json_response({"error": "limit must be a positive integer"}, status=400)
        try:
            offset = max(0, int(query.get("offset", 0)))
        except ValueError:
            return json_response({"error": "offset must be an integer"}, status=400)
        jobs = self._all_jobs()
        if statuses is not None:
            jobs = [job for job in jobs if job["status"] in statuses]
        if "workflow_id" in query:
            jobs = [job for job in jobs if job.get("workflow_id") == query["workflow_id"]]
        if sort_by == "created_at":
            def key(job: dict[str, Any]) -> float:
                return job.get("create_time") or 0
        else:
            def key(job: dict[str, Any]) -> float:
                start, end = job.get("execution_start_time"), job.get("execution_end_time")
                return end - start if start is not None and end is not None else 0
        jobs.sort(key=key, reverse=sort_order == "desc")
        total = len(jobs)
        page = jobs[offset:offset + limit] if limit is not None else jobs[offset:]
        return json_response({"jobs": page, "pagination": {
            "offset": offset, "limit": limit, "total": total,
            "has_more": offset + len(page) < total}})

    async def get_job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        # Queue before history, so a job finishing in between is still found.
        if self._running is not None and self._running.prompt_id == job_id:
            return json_response(_queued_job(self._running.item, "in_progress"))
        for item in self._pending:
            if item[1] == job_id:
                return json_response(_queued_job(item, "pending"))
        entry = self._history.get(job_id)
        if entry is not None:
            return json_response(_history_job(job_id, entry, detail=True))
        return json_response({"error": "Job not found"}, status=404)

    # --- files and information -----------------------------------------------------------

    def _directory_of(self, kind: str) -> Path | None:
        return {"output": self.output_dir, "input": self.input_dir,
                "temp": self.temp_dir}.get(kind)

    def _locate(self, query: Any) -> int | tuple[str, str]:
        """The file /view should serve, or the HTTP status ComfyUI answers instead."""
        if "filename" not in query:
            return 404
        filename = query["filename"]
        directory: Path | None = None
        for kind in ("output", "input", "temp"):
            if filename.endswith(f" [{kind}]"):
                filename = filename[:-len(kind) - 3]
                directory = self._directory_of(kind)
                break
        if not filename or filename[0] == "/" or ".." in filename:
            return 400
        if directory is None:
            directory = self._directory_of(query.get("type", "output"))
            if directory is None:
                return 400
        base = os.path.abspath(directory)
        if "subfolder" in query:
            full = os.path.abspath(os.path.join(base, query["subfolder"]))
            if os.path.commonpath((full, base)) != base:
                return 403
            base = full
        filename = os.path.basename(filename)
        path = os.path.join(base, filename)
        if not os.path.isfile(path):
            return 404
        return path, filename

    async def get_view(self, request: web.Request) -> web.StreamResponse:
        found = self._locate(request.query)
        if isinstance(found, int):
            return web.Response(status=found)
        path, filename = found
        headers = {hdrs.CONTENT_DISPOSITION: f'filename="{filename}"'}
        if filename.lower().endswith((".html", ".htm", ".js", ".css")):
            headers[hdrs.CONTENT_TYPE] = "application/octet-stream"
        return web.FileResponse(path, headers=headers)

    def _vram_used(self) -> int:
        used = 600 * 1024**2 + self._model_bytes
        if self._running is not None:
            # Activations come and go with the work, so the figure moves while a job runs.
            used += 1200 * 1024**2 + (self._ticks % 8) * 24 * 1024**2
        return used

    async def get_system_stats(self, request: web.Request) -> web.Response:
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            ram_total = os.sysconf("SC_PHYS_PAGES") * page
            ram_free = os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError, AttributeError):
            ram_total, ram_free = 64 * 1024**3, 48 * 1024**3
        total = self.settings.vram_total
        used = min(self._vram_used(), total)
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
                "argv": ["main.py", "--simulated", "--gpu", str(self.gpu_index)],
            },
            "devices": [{
                "name": f"cuda:{self.gpu_index} Simulated GPU",
                "type": "cuda",
                "index": self.gpu_index,
                "vram_total": total,
                "vram_free": total - used,
                "torch_vram_total": torch_total,
                "torch_vram_free": torch_total - used,
            }],
        })

    async def get_object_info(self, request: web.Request) -> web.Response:
        return json_response(self._object_info)

    async def get_object_info_class(self, request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        info = self._object_info.get(name)
        return json_response({name: info} if info is not None else {})

    async def get_features(self, request: web.Request) -> web.Response:
        return json_response(SERVER_FEATURES)

    async def get_embeddings(self, request: web.Request) -> web.Response:
        return json_response([])

    async def get_model_folders(self, request: web.Request) -> web.Response:
        return json_response(["checkpoints", "loras", "vae", "embeddings", "upscale_models"])

    async def get_models(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder == "checkpoints":
            return json_response(list(self.settings.models))
        if folder in ("loras", "vae", "embeddings", "upscale_models"):
            return json_response([])
        return web.Response(status=404)

    # --- /_sim controls ------------------------------------------------------------------

    @staticmethod
    async def _control_body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        text = await request.text()
        if not text.strip():
            return {}
        body = json.loads(text)
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="expected a JSON object")
        return body

    async def sim_drop_sockets(self, request: web.Request) -> web.Response:
        await self.drop_sockets()
        return json_response({"ok": True})

    async def sim_restart(self, request: web.Request) -> web.Response:
        await self.restart()
        return json_response({"ok": True})

    async def sim_refuse_websockets(self, request: web.Request) -> web.Response:
        body = await self._control_body(request)
        self.refuse_websockets(bool(body.get("refuse", True)))
        return json_response({"ok": True})

    async def sim_hang(self, request: web.Request) -> web.Response:
        body = await self._control_body(request)
        self.hang_next(int(body.get("count", 1)), body.get("path"))
        return json_response({"ok": True})

    async def sim_fail(self, request: web.Request) -> web.Response:
        body = await self._control_body(request)
        self.fail_next(int(body.get("count", 1)), body.get("path"))
        return json_response({"ok": True})

    async def sim_release(self, request: web.Request) -> web.Response:
        self.release_hangs()
        return json_response({"ok": True})

    async def sim_pause(self, request: web.Request) -> web.Response:
        body = await self._control_body(request)
        try:
            self.pause(str(body.get("at", "dequeue")))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        return json_response({"ok": True})

    async def sim_resume(self, request: web.Request) -> web.Response:
        self.resume()
        return json_response({"ok": True})

    async def sim_state(self, request: web.Request) -> web.Response:
        return json_response({
            "queue_remaining": self.queue_remaining,
            "running": self.running_prompt_id,
            "pending": self.pending_prompt_ids,
            "history": len(self._history),
            "open_sockets": self.open_sockets,
            "registered_clients": self.registered_clients,
            "paused": self._pause_at,
            "blocked_at": self._blocked_at,
            "held_requests": self._held,
        })

    # --- the worker ----------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            while not self._pending or (self._pause_at is not None
                                        and self._start_budget <= 0):
                self._wake.clear()
                await self._wake.wait()
            if self._pause_at is not None:
                self._start_budget -= 1
            job = Job(heapq.heappop(self._pending))
            self._running = job
            self._queue_updated()
            try:
                await self._execute(job)
            except Exception:
                # Only a simulator defect lands here; the job is recorded as failed.
                log.exception("simulated job %s crashed", job.prompt_id)
            self._finish(job)

    def _finish(self, job: Job) -> None:
        outputs = job.ui
        entry = {
            "prompt": list(job.item[:5]),
            "outputs": outputs,
            "status": {"status_str": "success" if job.succeeded else "error",
                       "completed": job.succeeded, "messages": job.messages},
            "meta": {node_id: {"node_id": node_id, "display_node": node_id,
                               "parent_node": None, "real_node_id": node_id}
                     for node_id in outputs},
        }
        if len(self._history) > MAXIMUM_HISTORY_SIZE:
            self._history.pop(next(iter(self._history)))
        self._history[job.prompt_id] = entry
        self._running = None
        self._queue_updated()
        if job.client_id is not None:
            self._send("executing", {"node": None, "prompt_id": job.prompt_id}, job.client_id)
        if self._free_after_job:
            self._free_after_job = False
            self._cache.clear()
        log.debug("prompt %s finished: %s", job.prompt_id,
                  "success" if job.succeeded else "error")

    def _record(self, job: Job, event: str, data: dict[str, Any],
                broadcast: bool = False) -> None:
        """A job event that is also kept in history; targeted, or broadcast if allowed
        when the job has no client."""
        job.messages.append([event, data])
        if job.client_id is not None:
            self._send(event, data, job.client_id)
        elif broadcast:
            self._send(event, data, None)

    def _signatures(self, prompt: dict[str, Any], job_token: object) -> dict[str, Hashable]:
        """Cache keys: class, literal inputs and the ancestors' keys. Nodes that always
        run get this job's token, which also makes everything downstream of them miss."""
        memo: dict[str, Hashable] = {}

        def signature(node_id: str, visiting: set[str]) -> Hashable:
            if node_id in memo:
                return memo[node_id]
            node = prompt.get(node_id)
            if not isinstance(node, dict) or node_id in visiting:
                return ("unresolved", node_id, job_token)
            visiting.add(node_id)
            class_type = node.get("class_type")
            spec = self.catalogue.get(class_type) if isinstance(class_type, str) else None
            inputs = node.get("inputs")
            parts: list[Hashable] = []
            if isinstance(inputs, dict):
                for name in sorted(inputs):
                    value = inputs[name]
                    if _is_link(value):
                        parts.append((name, signature(value[0], visiting), value[1]))
                    else:
                        parts.append((name, json.dumps(value, sort_keys=True, default=repr)))
            token = job_token if spec is not None and spec.always_run else None
            result = (str(class_type), tuple(parts), token)
            visiting.discard(node_id)
            memo[node_id] = result
            return result

        return {node_id: signature(node_id, set()) for node_id in prompt}

    def _plan(self, prompt: dict[str, Any], outputs: list[str],
              cached: set[str]) -> list[str]:
        """Execution order: dependencies first; among ready nodes, output nodes and the
        nodes closest to them go first, so results show up early."""
        deps: dict[str, set[str]] = {}

        def add(node_id: str) -> None:
            if node_id in deps:
                return
            needs: set[str] = set()
            deps[node_id] = needs
            for value in prompt[node_id]["inputs"].values():
                if _is_link(value) and value[0] not in cached:
                    needs.add(value[0])
                    add(value[0])

        for output_id in outputs:
            add(output_id)
        dependents: dict[str, set[str]] = {node_id: set() for node_id in deps}
        for node_id, needs in deps.items():
            for need in needs:
                dependents[need].add(node_id)

        def is_output(node_id: str) -> bool:
            return self.catalogue[prompt[node_id]["class_type"]].output_node

        def feeds_output(node_id: str, depth: int) -> bool:
            return any(is_output(d) or (depth > 1 and feeds_output(d, depth - 1))
                       for d in dependents[node_id])

        order: list[str] = []
        done: set[str] = set()
        while len(done) < len(deps):
            ready = [n for n, needs in deps.items() if n not in done and needs <= done]
            if not ready:
                raise RuntimeError("dependency cycle in prompt")
            pick = next((n for n in ready if is_output(n)), None)
            if pick is None:
                pick = next((n for n in ready if feeds_output(n, 1)), None)
            if pick is None:
                pick = next((n for n in ready if feeds_output(n, 2)), ready[0])
            order.append(pick)
            done.add(pick)
        return order

    def _send_progress_state(self, job: Job) -> None:
        self._send("progress_state", {"prompt_id": job.prompt_id, "nodes": job.progress},
                   job.client_id)

    def _set_progress(self, job: Job, node_id: str, value: float, maximum: float,
                      state: str) -> None:
        job.progress[node_id] = {
            "value": value, "max": maximum, "state": state, "node_id": node_id,
            "prompt_id": job.prompt_id, "display_node_id": node_id, "parent_node_id": None,
            "real_node_id": node_id}
        # Serialized now, so each message is the snapshot of this moment.
        self._send_progress_state(job)

    def _finish_progress(self, job: Job, node_id: str) -> None:
        entry = job.progress.get(node_id)
        maximum = entry["max"] if entry is not None else 1
        self._set_progress(job, node_id, maximum, maximum, "finished")

    def _check_interrupt(self, node_id: str) -> None:
        if self._interrupt:
            # Reading the flag clears it.
            self._interrupt = False
            raise Interrupted(node_id)

    async def _pause_point(self, at: str, node_id: str) -> None:
        if self._pause_at != at:
            return
        gate = self._resume_gate
        self._blocked_at = f"{at}:{node_id}"
        self._blocked.set()
        try:
            await gate.wait()
        finally:
            if self._blocked_at == f"{at}:{node_id}":
                self._blocked_at = None
                self._blocked.clear()

    async def _tick(self, job: Job, node_id: str, value: int, total: int,
                    preview: bytes | None) -> None:
        self._check_interrupt(node_id)
        self._ticks += 1
        self._set_progress(job, node_id, value, total, "running")
        progress = {"value": value, "max": total, "prompt_id": job.prompt_id, "node": node_id}
        sid = job.client_id
        if preview is not None and sid is not None and self._client_flags.get(sid, {}).get(
                "supports_preview_metadata"):
            meta = _dumps({"node_id": node_id, "prompt_id": job.prompt_id,
                           "display_node_id": node_id, "parent_node_id": None,
                           "real_node_id": node_id, "image_type": "image/png"}).encode()
            self._send_bytes(struct.pack(">II", 4, len(meta)) + meta + preview, sid)
            self._send("progress", progress, sid)
        else:
            self._send("progress", progress, sid)
            if preview is not None:
                # Event 1 (PREVIEW_IMAGE), format 2 (PNG).
                self._send_bytes(struct.pack(">II", 1, 2) + preview, sid)
        await self._pause_point("tick", node_id)

    async def _execute(self, job: Job) -> None:
        self._interrupt = False
        prompt_id = job.prompt_id
        self._record(job, "execution_start", {"prompt_id": prompt_id, "timestamp": now_ms()})
        signatures = self._signatures(job.prompt, object())
        live = set(signatures.values())
        for key in [key for key in self._cache if key not in live]:
            del self._cache[key]
        cached = [node_id for node_id in job.prompt if signatures[node_id] in self._cache]
        self._record(job, "execution_cached",
                     {"nodes": cached, "prompt_id": prompt_id, "timestamp": now_ms()})
        results: dict[str, tuple[Any, ...]] = {}
        try:
            for node_id in self._plan(job.prompt, job.item[4], set(cached)):
                entry = self._cache.get(signatures[node_id])
                if entry is not None:
                    # A cached output node re-announces its old UI, and nothing runs.
                    results[node_id] = entry.outputs
                    if entry.ui is not None:
                        job.ui[node_id] = entry.ui
                    if job.client_id is not None:
                        self._send("executed", {"node": node_id, "display_node": node_id,
                                                "output": entry.ui, "prompt_id": prompt_id},
                                   job.client_id)
                    self._finish_progress(job, node_id)
                    continue
                await self._run_node(job, node_id, signatures, results)
        except Interrupted as exc:
            node_type = job.prompt[exc.node_id]["class_type"]
            self._record(job, "execution_interrupted", {
                "prompt_id": prompt_id, "node_id": exc.node_id, "node_type": node_type,
                "executed": list(job.executed), "timestamp": now_ms()}, broadcast=True)
        except NodeFailed as exc:
            exc.payload["timestamp"] = now_ms()
            self._record(job, "execution_error", exc.payload)
        else:
            job.succeeded = True
            self._record(job, "execution_success",
                         {"prompt_id": prompt_id, "timestamp": now_ms()})

    async def _run_node(self, job: Job, node_id: str, signatures: dict[str, Hashable],
                        results: dict[str, tuple[Any, ...]]) -> None:
        node = job.prompt[node_id]
        spec = self.catalogue[node["class_type"]]
        self._set_progress(job, node_id, 0.0, 1.0, "running")
        job.current_node = node_id
        if job.client_id is not None:
            self._send("executing", {"node": node_id, "display_node": node_id,
                                     "prompt_id": job.prompt_id}, job.client_id)
        await self._pause_point("node", node_id)
        self._check_interrupt(node_id)
        self._ticks += 1
        inputs: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            if _is_link(value):
                source, slot = value
                outputs = (results[source] if source in results
                           else self._cache[signatures[source]].outputs)
                inputs[name] = outputs[slot]
            else:
                inputs[name] = value
        context = NodeRun(self, job, node_id)
        try:
            await context.work(spec.cost)
            result = await spec.run(context, inputs)
        except Interrupted:
            raise
        except Exception as exc:
            raise NodeFailed(node_id, self._failure(job, node_id, spec, inputs, exc)) from exc
        if spec.name == "CheckpointLoaderSimple":
            self._model_bytes = 2_132_863_336
        results[node_id] = result.outputs
        if not spec.always_run:
            self._cache[signatures[node_id]] = CacheEntry(result.outputs, result.ui)
        if result.ui is not None:
            job.ui[node_id] = result.ui
            if job.client_id is not None:
                self._send("executed", {"node": node_id, "display_node": node_id,
                                        "output": result.ui, "prompt_id": job.prompt_id},
                           job.client_id)
        self._finish_progress(job, node_id)
        job.executed.append(node_id)

    def _failure(self, job: Job, node_id: str, spec: NodeSpec, inputs: dict[str, Any],
                 exc: Exception) -> dict[str, Any]:
        current_inputs = {name: [_format_input(value)] for name, value in inputs.items()}
        for name, kind in spec.hidden.items():
            if kind == "PROMPT":
                current_inputs[name] = [str(job.prompt)]
            elif kind == "EXTRA_PNGINFO":
                current_inputs[name] = [_format_input(job.extra_data.get("extra_pnginfo"))]
        log.info("prompt %s: node %s (%s) failed: %s", job.prompt_id, node_id, spec.name, exc)
        return {
            "prompt_id": job.prompt_id,
            "node_id": node_id,
            "node_type": spec.name,
            "executed": list(job.executed),
            # ComfyUI appends its (here empty) troubleshooting tips after a newline.
            "exception_message": f"{exc}\n",
            "exception_type": _full_type_name(exc),
            "traceback": traceback.format_tb(exc.__traceback__),
            "current_inputs": current_inputs,
            "current_outputs": list(job.prompt),
        }


def _is_loopback(hostname: str | None) -> bool:
    if not hostname:
        return False
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def _drop_none(job: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in job.items() if value is not None}


def _workflow_id(extra_data: dict[str, Any]) -> Any:
    pnginfo = extra_data.get("extra_pnginfo")
    if isinstance(pnginfo, dict) and isinstance(pnginfo.get("workflow"), dict):
        return pnginfo["workflow"].get("id")
    return None


def _queued_job(item: QueueItem, status: str) -> dict[str, Any]:
    return _drop_none({"id": item[1], "status": status, "priority": item[0],
                       "create_time": item[3].get("create_time"), "outputs_count": 0,
                       "workflow_id": _workflow_id(item[3])})


def _history_job(prompt_id: str, entry: dict[str, Any], detail: bool) -> dict[str, Any]:
    number, _, prompt, extra_data, _ = entry["prompt"]
    status = entry["status"]
    start = end = error = None
    for event, data in status["messages"]:
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            if event == "execution_error":
                error = data
    count = 0
    preview = None
    for node_id, ui in entry["outputs"].items():
        for media, items in ui.items():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and "filename" in item:
                    count += 1
                    if preview is None and media in ("images", "video", "audio"):
                        preview = {**item, "nodeId": node_id, "mediaType": media}
    job = _drop_none({
        "id": prompt_id,
        "status": "completed" if status["status_str"] == "success" else "failed",
        "priority": number,
        "create_time": extra_data.get("create_time"),
        "execution_start_time": start,
        "execution_end_time": end,
        "execution_error": error,
        "outputs_count": count,
        "preview_output": preview,
        "workflow_id": _workflow_id(extra_data),
    })
    if detail:
        job["outputs"] = entry["outputs"]
        job["execution_status"] = status
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


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
            shown = f"[{host}]" if ":" in host else host
            log.info("simulated ComfyUI %s for GPU %d listening on http://%s:%d",
                     COMFYUI_VERSION, index, shown, port)
        await asyncio.Future()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
