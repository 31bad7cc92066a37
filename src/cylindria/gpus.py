"""One record per GPU: its ComfyUI, its listener's view of it, and a shared status probe."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .comfy import ComfyClient
from .errors import BackendError, UnknownGpu

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Probe:
    """The outcome of one `/system_stats` call."""

    reachable: bool
    checked_at: float
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(slots=True, eq=False)
class Gpu:
    index: int
    url: str
    client_id: str
    comfy: ComfyClient | None = None
    listener_connected: bool = False
    queue_remaining: int | None = None
    drained: bool = False
    last_probe: Probe | None = None
    _probe_task: asyncio.Task[Probe] | None = None

    async def probe(self, timeout: float, max_age: float) -> Probe:
        """A recent probe of ComfyUI, sharing one call among concurrent askers.

        A burst of status requests costs at most one upstream request per `max_age`;
        a hung ComfyUI costs the caller at most `timeout`.
        """
        last = self.last_probe
        if last is not None and time.monotonic() - last.checked_at < max_age:
            return last
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.create_task(self._run_probe(timeout),
                                                   name=f"probe-gpu{self.index}")
        # shield: one caller giving up must not cancel the probe the others wait on.
        return await asyncio.shield(self._probe_task)

    async def _run_probe(self, timeout: float) -> Probe:
        assert self.comfy is not None
        try:
            stats = await self.comfy.system_stats(timeout=timeout)
            probe = Probe(reachable=True, checked_at=time.monotonic(), stats=stats)
        except BackendError as exc:
            probe = Probe(reachable=False, checked_at=time.monotonic(), error=exc.message)
        self.last_probe = probe
        return probe

    async def close(self) -> None:
        task = self._probe_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def status(self, probe: Probe) -> dict[str, Any]:
        """The `/serverstatus` body for this GPU."""
        reachable = probe.reachable
        body: dict[str, Any] = {
            "status": "ok" if self.healthy(probe) else "degraded",
            "comfy_url": self.url,
            "reachable": reachable,
            "gpu_id": self.index,
            "listener_connected": self.listener_connected,
            "queue_remaining": self.queue_remaining,
        }
        system = probe.stats.get("system") if reachable else None
        if isinstance(system, dict) and system.get("comfyui_version"):
            body["comfyui_version"] = system["comfyui_version"]
        devices = probe.stats.get("devices") if reachable else None
        if isinstance(devices, list):
            body["devices"] = [
                {"name": d.get("name"), "vram_total": d.get("vram_total"),
                 "vram_free": d.get("vram_free")}
                for d in devices if isinstance(d, dict)
            ]
        if probe.error:
            body["detail"] = probe.error
        return body

    def healthy(self, probe: Probe) -> bool:
        return probe.reachable and self.listener_connected


def gpu_by_number(gpus: list[Gpu], raw: str, name: str = "GpuId") -> Gpu:
    """The GPU numbered `raw`; a clear 400 naming `name` and the range otherwise."""
    try:
        gpu_id = int(raw)
    except ValueError:
        raise UnknownGpu(f"{name} must be a whole number from 0 to {len(gpus) - 1} "
                         f"(got {raw!r}).") from None
    if not 0 <= gpu_id < len(gpus):
        raise UnknownGpu(f"{name} {gpu_id} does not exist: this server has {len(gpus)} "
                         f"GPU(s), numbered 0 to {len(gpus) - 1}.")
    return gpus[gpu_id]
