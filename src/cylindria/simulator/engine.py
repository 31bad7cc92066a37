"""The worker of one simulated GPU: its queue, prompt execution, cache and history."""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import struct
import time
import traceback
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from ..jsonio import dumps
from .faults import Pauses
from .files import Folders
from .graph import is_link, plan, signatures
from .inputs import InputFiles, Source
from .nodes import NodeSpec, SimImage
from .png import write_pngs
from .settings import SimSettings
from .sockets import Sockets
from .validation import full_type_name
from .vram import Vram, model_size

log = logging.getLogger(__name__)

# ComfyUI drops the oldest entry once the history holds more than this many.
MAXIMUM_HISTORY_SIZE = 10000
# The tEXt key of saved PNGs listing the SHA-256 of the input files behind the image.
SOURCE_KEY = "source_sha256"

# (number, prompt_id, prompt, extra_data, outputs_to_execute, sensitive): heap-ordered
# as a plain tuple, exactly like ComfyUI's queue, quirks included.
QueueItem = tuple[Any, str, dict[str, Any], dict[str, Any], list[str], dict[str, Any]]


def now_ms() -> int:
    return int(time.time() * 1000)


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
class RunningPrompt:
    """The queue item the worker is executing, and what its execution has produced."""

    item: QueueItem
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    messages: list[list[Any]] = field(default_factory=list)
    ui: dict[str, dict[str, Any]] = field(default_factory=dict)
    current_node: str | None = None
    succeeded: bool = False
    interrupted: bool = False

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


class NodeRun:
    """What one executing node sees of the simulator (nodes.NodeContext)."""

    __slots__ = ("_engine", "_job", "_node_id", "extra_data", "prompt")

    def __init__(self, engine: Engine, job: RunningPrompt, node_id: str) -> None:
        self._engine = engine
        self._job = job
        self._node_id = node_id
        self.prompt = job.prompt
        self.extra_data = job.extra_data

    async def work(self, cost: float) -> None:
        delay = cost * self._engine.settings.step_seconds
        await asyncio.sleep(delay if delay > 0 else 0)

    async def tick(self, value: int, total: int, preview: bytes | None = None) -> None:
        await self._engine._tick(self._job, self._node_id, value, total, preview)

    async def load(self, kind: str, name: str) -> None:
        await self._engine._load(self._job, kind, name)

    async def save(self, images: SimImage, prefix: str, kind: str) -> list[dict[str, str]]:
        folders = self._engine.folders
        base = folders.output if kind == "output" else folders.temp
        assert base is not None
        text = {"prompt": json.dumps(self.prompt)}
        pnginfo = self.extra_data.get("extra_pnginfo")
        if isinstance(pnginfo, dict):
            text.update({key: json.dumps(value) for key, value in pnginfo.items()})
        if images.sources:
            # Not ComfyUI's: tells tests which input files the image was made from.
            text[SOURCE_KEY] = ",".join(sorted(images.sources))
        if images.width * images.height > 1_000_000:
            # Big images take a while to deflate; keep the event loop responsive.
            return await asyncio.to_thread(write_pngs, images, prefix, base, kind, text)
        return write_pngs(images, prefix, base, kind, text)

    async def read_input(self, name: str) -> Source:
        return await self._engine.inputs.read(name)


def _format_input(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value)


class Engine:
    """The state a ComfyUI process keeps in memory, and the task that runs the queue."""

    def __init__(self, settings: SimSettings, catalogue: dict[str, NodeSpec],
                 sockets: Sockets, pauses: Pauses, folders: Folders,
                 inputs: InputFiles) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.folders = folders
        self.inputs = inputs
        self._sockets = sockets
        self._pauses = pauses
        self._ticks = 0
        self._wake = asyncio.Event()
        # Every prompt this simulated GPU began to run, kept across restarts (unlike
        # its history): runs, outcome ("success", "error", "interrupted", or None
        # while running or when a restart cut it short), and the wall-clock times the
        # last run began and ended, and the model files it loaded. What really ran, for
        # tests.
        self.ledger: dict[str, dict[str, Any]] = {}
        self.vram = Vram(settings.vram_budget_gib)
        self.reset()

    def reset(self) -> None:
        """Forget the queue, the running job, history, the counter, the cache and the
        models in VRAM."""
        self.number = 0
        self.pending: list[QueueItem] = []
        self.running: RunningPrompt | None = None
        self.history: dict[str, dict[str, Any]] = {}
        self.cache: dict[Hashable, CacheEntry] = {}
        self._interrupt = False
        self._free_after_job = False
        self._unload_after_job = False
        self.vram.clear()

    @property
    def queue_remaining(self) -> int:
        return len(self.pending) + (1 if self.running is not None else 0)

    def wake(self) -> None:
        self._wake.set()

    # --- what the HTTP handlers do to the queue, the cache and the history -----------------

    def take_number(self) -> int:
        number = self.number
        self.number += 1
        return number

    def put(self, item: QueueItem) -> None:
        # A duplicate (number, prompt_id) makes the heap compare prompt dicts and raise
        # after the item is already in the list: ComfyUI answers 500 and runs it anyway.
        heapq.heappush(self.pending, item)
        self._queue_updated()
        self._wake.set()

    def clear_pending(self) -> None:
        self.pending = []
        self._queue_updated()

    def delete_pending(self, prompt_id: Any) -> None:
        for index, item in enumerate(self.pending):
            if item[1] == prompt_id:
                self.pending.pop(index)
                heapq.heapify(self.pending)
                self._queue_updated()
                break

    def interrupt(self, prompt_id: Any) -> None:
        """Interrupt the running job: any job when prompt_id is empty, else only that one."""
        if prompt_id:
            if self.running is not None and self.running.prompt_id == prompt_id:
                log.info("interrupting prompt %s", prompt_id)
                self._interrupt = True
            else:
                log.info("prompt %s is not currently running, skipping interrupt", prompt_id)
        else:
            self._interrupt = True

    def free(self, unload_models: Any, free_memory: Any) -> None:
        # ComfyUI's worker acts on these flags between jobs, and free_memory also unloads
        # the models.
        unload = bool(unload_models or free_memory)
        if self.running is None:
            if unload:
                self.vram.clear()
            if free_memory:
                self.cache.clear()
        else:
            self._unload_after_job |= unload
            self._free_after_job |= bool(free_memory)

    def clear_history(self) -> None:
        self.history = {}

    def delete_history(self, prompt_id: Any) -> None:
        self.history.pop(prompt_id, None)

    def vram_used(self) -> int:
        used = 600 * 1024**2 + self.vram.used
        if self.running is not None:
            # Activations come and go with the work, so the figure moves while a job runs.
            used += 1200 * 1024**2 + (self._ticks % 8) * 24 * 1024**2
        return used

    def _queue_updated(self) -> None:
        self._sockets.send("status", {"status": {"exec_info": {
            "queue_remaining": self.queue_remaining}}}, None)

    # --- the worker ----------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            while not self.pending or not self._pauses.may_start():
                self._wake.clear()
                await self._wake.wait()
            self._pauses.started()
            job = RunningPrompt(heapq.heappop(self.pending))
            entry = self.ledger.setdefault(job.prompt_id, {"runs": 0})
            entry.update(runs=entry["runs"] + 1, outcome=None, began=time.time(), ended=None,
                         loads=[])
            self.running = job
            self._queue_updated()
            try:
                await self._execute(job)
            except Exception:
                # Only a simulator defect lands here; the job is recorded as failed.
                log.exception("simulated job %s crashed", job.prompt_id)
            self._finish(job)

    def _finish(self, job: RunningPrompt) -> None:
        entry = self.ledger.get(job.prompt_id)
        outputs = job.ui
        if entry is not None:
            entry["outcome"] = ("success" if job.succeeded else
                                "interrupted" if job.interrupted else "error")
            entry["ended"] = time.time()
            # The files each run reported, kept when the history is gone (a restart).
            entry["files"] = sorted(item["filename"] for ui in outputs.values()
                                    for items in ui.values() if isinstance(items, list)
                                    for item in items
                                    if isinstance(item, dict) and "filename" in item)
        entry = {
            "prompt": list(job.item[:5]),
            "outputs": outputs,
            "status": {"status_str": "success" if job.succeeded else "error",
                       "completed": job.succeeded, "messages": job.messages},
            "meta": {node_id: {"node_id": node_id, "display_node": node_id,
                               "parent_node": None, "real_node_id": node_id}
                     for node_id in outputs},
        }
        if len(self.history) > MAXIMUM_HISTORY_SIZE:
            self.history.pop(next(iter(self.history)))
        self.history[job.prompt_id] = entry
        self.running = None
        self._queue_updated()
        if job.client_id is not None:
            self._sockets.send("executing", {"node": None, "prompt_id": job.prompt_id},
                               job.client_id)
        if self._unload_after_job:
            self._unload_after_job = False
            self.vram.clear()
        if self._free_after_job:
            self._free_after_job = False
            self.cache.clear()
        log.debug("prompt %s finished: %s", job.prompt_id,
                  "success" if job.succeeded else "error")

    def _record(self, job: RunningPrompt, event: str, data: dict[str, Any],
                broadcast: bool = False) -> None:
        """A job event that is also kept in history; targeted, or broadcast if allowed
        when the job has no client."""
        job.messages.append([event, data])
        if job.client_id is not None:
            self._sockets.send(event, data, job.client_id)
        elif broadcast:
            self._sockets.send(event, data, None)

    def _set_progress(self, job: RunningPrompt, node_id: str, value: float, maximum: float,
                      state: str) -> None:
        job.progress[node_id] = {
            "value": value, "max": maximum, "state": state, "node_id": node_id,
            "prompt_id": job.prompt_id, "display_node_id": node_id, "parent_node_id": None,
            "real_node_id": node_id}
        # Serialized now, so each message is the snapshot of this moment.
        self._sockets.send("progress_state", {"prompt_id": job.prompt_id,
                                              "nodes": job.progress}, job.client_id)

    def _finish_progress(self, job: RunningPrompt, node_id: str) -> None:
        entry = job.progress.get(node_id)
        maximum = entry["max"] if entry is not None else 1
        self._set_progress(job, node_id, maximum, maximum, "finished")

    def _executed(self, job: RunningPrompt, node_id: str, ui: dict[str, Any] | None) -> None:
        if job.client_id is not None:
            self._sockets.send("executed", {"node": node_id, "display_node": node_id,
                                            "output": ui, "prompt_id": job.prompt_id},
                               job.client_id)

    def _check_interrupt(self, node_id: str) -> None:
        if self._interrupt:
            # Reading the flag clears it.
            self._interrupt = False
            raise Interrupted(node_id)

    async def _tick(self, job: RunningPrompt, node_id: str, value: int, total: int,
                    preview: bytes | None) -> None:
        self._check_interrupt(node_id)
        self._ticks += 1
        self._set_progress(job, node_id, value, total, "running")
        progress = {"value": value, "max": total, "prompt_id": job.prompt_id, "node": node_id}
        sid = job.client_id
        if preview is not None and sid is not None and self._sockets.wants_preview_metadata(
                sid):
            meta = dumps({"node_id": node_id, "prompt_id": job.prompt_id,
                          "display_node_id": node_id, "parent_node_id": None,
                          "real_node_id": node_id, "image_type": "image/png"}).encode()
            self._sockets.send_bytes(struct.pack(">II", 4, len(meta)) + meta + preview, sid)
            self._sockets.send("progress", progress, sid)
        else:
            self._sockets.send("progress", progress, sid)
            if preview is not None:
                # Event 1 (PREVIEW_IMAGE), format 2 (PNG).
                self._sockets.send_bytes(struct.pack(">II", 1, 2) + preview, sid)
        await self._pauses.point("tick", node_id)

    async def _load(self, job: RunningPrompt, kind: str, name: str) -> None:
        """A loader node's model file: free if in VRAM, else the load time is spent."""
        if self.vram.use(name):
            return
        # Like ComfyUI, which reads the file without looking at the interrupt flag, a
        # load runs to its end: an interrupt is seen at the next node or tick. A
        # restart cancels the sleep, and the load never happened.
        seconds = max(self.settings.model_load_seconds, 0.0)
        self.vram.loading = name
        try:
            await asyncio.sleep(seconds)
        finally:
            self.vram.loading = None
        evicted = self.vram.add(name, model_size(kind, name), seconds)
        self.ledger[job.prompt_id]["loads"].append(name)
        log.debug("prompt %s loaded %s (%s)%s", job.prompt_id, name, kind,
                  f", unloading {', '.join(evicted)}" if evicted else "")

    async def _execute(self, job: RunningPrompt) -> None:
        self._interrupt = False
        prompt_id = job.prompt_id
        self._record(job, "execution_start", {"prompt_id": prompt_id, "timestamp": now_ms()})
        keys = signatures(self.catalogue, job.prompt, object(),
                          await self._fingerprints(job.prompt))
        live = set(keys.values())
        for key in [key for key in self.cache if key not in live]:
            del self.cache[key]
        cached = [node_id for node_id in job.prompt if keys[node_id] in self.cache]
        self._record(job, "execution_cached",
                     {"nodes": cached, "prompt_id": prompt_id, "timestamp": now_ms()})
        results: dict[str, tuple[Any, ...]] = {}
        try:
            for node_id in plan(self.catalogue, job.prompt, job.item[4], set(cached)):
                entry = self.cache.get(keys[node_id])
                if entry is not None:
                    # A cached output node re-announces its old UI, and nothing runs.
                    results[node_id] = entry.outputs
                    if entry.ui is not None:
                        job.ui[node_id] = entry.ui
                    self._executed(job, node_id, entry.ui)
                    self._finish_progress(job, node_id)
                    continue
                await self._run_node(job, node_id, keys, results)
        except Interrupted as exc:
            job.interrupted = True
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

    async def _fingerprints(self, prompt: dict[str, Any]) -> dict[str, Hashable]:
        """The version of each loader's file, read (off the loop) as the job starts, as
        ComfyUI evaluates IS_CHANGED before it looks at its cache."""
        found: dict[str, Hashable] = {}
        for node_id, node in prompt.items():
            declared = self.catalogue[node["class_type"]].input_file
            if declared is not None:
                found[node_id] = await self.inputs.fingerprint(
                    node["inputs"].get(declared.input), declared.by_mtime)
        return found

    async def _run_node(self, job: RunningPrompt, node_id: str, keys: dict[str, Hashable],
                        results: dict[str, tuple[Any, ...]]) -> None:
        node = job.prompt[node_id]
        spec = self.catalogue[node["class_type"]]
        self._set_progress(job, node_id, 0.0, 1.0, "running")
        job.current_node = node_id
        if job.client_id is not None:
            self._sockets.send("executing", {"node": node_id, "display_node": node_id,
                                             "prompt_id": job.prompt_id}, job.client_id)
        await self._pauses.point("node", node_id)
        self._check_interrupt(node_id)
        self._ticks += 1
        inputs: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            if is_link(value):
                source, slot = value
                outputs = (results[source] if source in results
                           else self.cache[keys[source]].outputs)
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
            raise NodeFailed(node_id, _failure(job, node_id, spec, inputs, exc)) from exc
        results[node_id] = result.outputs
        if not spec.always_run:
            self.cache[keys[node_id]] = CacheEntry(result.outputs, result.ui)
        if result.ui is not None:
            job.ui[node_id] = result.ui
            self._executed(job, node_id, result.ui)
        self._finish_progress(job, node_id)
        job.executed.append(node_id)


def _failure(job: RunningPrompt, node_id: str, spec: NodeSpec, inputs: dict[str, Any],
             exc: Exception) -> dict[str, Any]:
    """The execution_error payload for a node that raised."""
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
        "exception_type": full_type_name(exc),
        "traceback": traceback.format_tb(exc.__traceback__),
        "current_inputs": current_inputs,
        "current_outputs": list(job.prompt),
    }
