"""Per GPU: a self-healing websocket listener, and the queue/history poller behind it."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import aiohttp

from ..config import Timing
from ..core.answers import parse_frame
from ..core.jobs import JobsService
from ..core.reading import WorkflowReader
from ..core.registry import Registry
from ..errors import BackendError
from .gpus import Gpu

log = logging.getLogger(__name__)

# Seconds of pause between reconciliations per job in flight on the GPU.
QUEUE_READ_COST = 0.005


def backoff_delays(initial: float, cap: float) -> Any:
    """Capped exponential backoff with full jitter: 0..min(cap, initial * 2**n)."""
    n = 0
    while True:
        yield random.uniform(initial / 2, min(cap, initial * 2 ** n))
        n = min(n + 1, 30)


class Dispatcher:
    """Turns ComfyUI websocket messages of one GPU into registry updates."""

    def __init__(self, gpu: Gpu, registry: Registry, wake_poller: asyncio.Event,
                 reader: WorkflowReader, wake_dispatch: asyncio.Event | None = None) -> None:
        self.gpu = gpu
        self.registry = registry
        self.wake_poller = wake_poller
        self.reader = reader
        # Set when ComfyUI's queue shrinks: the GPU may have room for a held job.
        self.wake_dispatch = wake_dispatch

    async def handle_text(self, raw: bytes | str) -> None:
        try:
            # A frame can hold megabytes (a node's text output): decoded off the loop.
            kind, data = await self.reader.decode(parse_frame, raw)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("gpu %d: skipping malformed frame (%s): %.200r",
                        self.gpu.index, exc, raw)
            return
        self.gpu.messages[kind if isinstance(kind, str) else "?"] += 1
        try:
            self.dispatch(kind, data)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("gpu %d: skipping %s frame with unexpected content (%s): %.200r",
                        self.gpu.index, kind, exc, raw)

    def dispatch(self, kind: str, data: dict[str, Any]) -> None:
        reg = self.registry
        pid = data.get("prompt_id")
        if kind == "status":
            remaining = int(data["status"]["exec_info"]["queue_remaining"])
            before = self.gpu.queue_remaining
            self.gpu.queue_remaining = remaining
            self.wake_poller.set()
            if self.wake_dispatch is not None and (before is None or remaining < before):
                self.wake_dispatch.set()
        elif kind == "execution_start":
            reg.on_start(pid)
        elif kind == "execution_cached":
            reg.on_cached(pid, data.get("nodes") or [])
        elif kind == "executing":
            node = data.get("node")
            if node is None:
                # The job's last message: history is written. Settle it now, unless
                # the events already did.
                job = reg.by_prompt(pid)
                if job is not None and not job.terminal:
                    self.wake_poller.set()
            else:
                reg.on_executing(pid, str(node), gpu_id=self.gpu.index)
        elif kind == "progress":
            reg.on_progress(pid, _str_or_none(data.get("node")), data["value"], data["max"])
        elif kind == "executed":
            reg.on_executed(pid, str(data["node"]), data.get("output"))
        elif kind == "execution_success":
            reg.on_success(pid)
        elif kind == "execution_error":
            if data.get("exception_type") == "ExecutionBlocked":
                # Mid-run flow-control notice; the job carries on.
                log.info("gpu %d: job %s blocked at node %s: %s", self.gpu.index, pid,
                         data.get("node_id"), data.get("exception_message"))
                return
            reg.on_error(pid, data)
        elif kind == "execution_interrupted":
            reg.on_interrupted(pid, data)
        # progress_state, feature_flags, logs and unknown types carry nothing we need.


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


async def listen(gpu: Gpu, jobs: JobsService, timing: Timing,
                 wake_poller: asyncio.Event) -> None:
    """Keep one websocket open to this GPU's ComfyUI for the life of the process."""
    dispatcher = Dispatcher(gpu, jobs.registry, wake_poller, jobs.reader, jobs.wake)
    delays = backoff_delays(timing.reconnect_initial, timing.reconnect_max)
    failures = 0
    ever_connected = False
    while True:
        try:
            # `async with` closes the old socket before the loop opens a new one:
            # ComfyUI mutes a newer socket when an older one with the same
            # clientId closes after it.
            async with gpu.comfy.websocket(gpu.client_id, heartbeat=timing.ws_heartbeat,
                                           close_timeout=timing.connect_timeout) as ws:
                gpu.listener_connected = True
                log.info("gpu %d: listener %s to %s", gpu.index,
                         "reconnected" if ever_connected else "connected", gpu.url)
                gpu.reconnects += ever_connected
                ever_connected = True
                failures = 0
                delays = backoff_delays(timing.reconnect_initial, timing.reconnect_max)
                # Events sent while we were away are gone: reconcile by polling. Its
                # ComfyUI may have restarted, perhaps without the input files it had.
                gpu.reconcile_due = True
                wake_poller.set()
                jobs.inputs.forget(gpu.index)
                jobs.registry.missed_events(gpu.index)
                async for msg in ws:
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        await dispatcher.handle_text(msg.data)
                    elif msg.type is aiohttp.WSMsgType.BINARY:
                        continue  # previews; nothing to keep
                    elif msg.type is aiohttp.WSMsgType.ERROR:
                        log.warning("gpu %d: websocket error: %s", gpu.index, ws.exception())
                        break
                log.warning("gpu %d: websocket closed by ComfyUI (code %s)", gpu.index,
                            ws.close_code)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            failures += 1
            # Quiet while ComfyUI is still starting; loud once it stays away.
            if failures == 1 and not ever_connected:
                level = logging.INFO
            elif failures in (1, 10) or failures % 100 == 0:
                level = logging.WARNING
            else:
                level = logging.DEBUG
            log.log(level, "gpu %d: cannot reach %s yet (%s); retrying with backoff",
                    gpu.index, gpu.url, exc.__class__.__name__)
        finally:
            gpu.listener_connected = False
            # ComfyUI's count of queued work is stale from here on.
            gpu.queue_remaining = None
        await asyncio.sleep(next(delays))


async def poll(gpu: Gpu, jobs: JobsService, timing: Timing, wake: asyncio.Event) -> None:
    """The safety net under the websocket: while this GPU has jobs in flight, reconcile
    them with ComfyUI's queue and history, and settle at once the jobs whose end needs
    their history when the listener says one ended.

    A reading of `/queue` costs ComfyUI and Cylindria in proportion to the queue. While
    the listener is connected its events tell what changes, so the whole queue is read
    at most once per `QUEUE_READ_COST` seconds per job on the GPU (at least
    `poll_min_gap` apart); while it is not, polling is all there is, and the queue is
    read every `poll_interval`."""
    loop = asyncio.get_running_loop()
    last = -float("inf")
    while True:
        # asyncio.timeout rather than wait_for: on Python 3.11, wait_for can swallow
        # a cancellation that races with the event, and teardown would hang.
        try:
            async with asyncio.timeout(timing.poll_interval):
                await wake.wait()
        except TimeoutError:
            pass
        wake.clear()
        load = jobs.registry.load(gpu.index)
        if not load:
            continue
        gap = max(timing.poll_min_gap, QUEUE_READ_COST * load)
        if not gpu.listener_connected:
            gap = min(gap, timing.poll_interval)
        try:
            if gpu.reconcile_due or loop.time() - last >= gap:
                gpu.reconcile_due = False
                last = loop.time()
                await jobs.reconcile(gpu)
            else:
                await jobs.settle_awaiting(gpu)
        except BackendError as exc:
            log.debug("gpu %d: poll failed: %s", gpu.index, exc.message)
            jobs.unreachable(gpu)
        await asyncio.sleep(min(gap, timing.poll_min_gap))


async def dispatch_held(jobs: JobsService, timing: Timing) -> None:
    """Hand jobs held for GpuId=auto to GPUs as they free: at once when a job on a GPU
    starts or ends, and at least once per poll interval (health and aging change)."""
    while True:
        try:
            async with asyncio.timeout(timing.poll_interval):
                await jobs.wake.wait()
        except TimeoutError:
            pass
        jobs.wake.clear()
        # With nodes sharing a database, any node's held job may come to this node.
        if len(jobs.registry.held) or jobs.store.clustered:
            await jobs.dispatch()


async def retry_owed(jobs: JobsService, timing: Timing) -> None:
    """Automatic retries of lost jobs that found no GPU ready (a ComfyUI restart takes
    them all down at once) are made once one is, whatever the restart left."""
    while True:
        await asyncio.sleep(timing.poll_interval)
        if jobs.registry.retries_owed():
            await jobs.retry_owed()


async def cancel_and_wait(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
