"""One record per GPU: its ComfyUI client, its listener's view of it, and a shared probe."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..config import Timing
from ..errors import BackendError
from .comfy import ComfyClient

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
    comfy: ComfyClient
    timing: Timing
    listener_connected: bool = False
    # Its listener (re)connected: the next reconciliation reads the whole queue at once.
    reconcile_due: bool = True
    queue_remaining: int | None = None
    drained: bool = False
    unreachable_since: datetime | None = None
    last_probe: Probe | None = None
    # Counted for /metrics: websocket reconnections, and messages by type.
    reconnects: int = 0
    messages: collections.Counter[str] = field(default_factory=collections.Counter)
    _probe_task: asyncio.Task[Probe] | None = None

    async def probe(self) -> Probe:
        """A recent probe of ComfyUI, sharing one call among concurrent askers.

        A burst of status requests costs at most one upstream request per
        `status_cache_seconds`; a hung ComfyUI costs the caller at most `status_timeout`.
        """
        last = self.fresh_probe()
        if last is not None:
            return last
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.create_task(self._run_probe(),
                                                   name=f"probe-gpu{self.index}")
        # shield: one caller giving up must not cancel the probe the others wait on.
        return await asyncio.shield(self._probe_task)

    async def _run_probe(self) -> Probe:
        try:
            stats = await self.comfy.system_stats(timeout=self.timing.status_timeout)
            probe = Probe(reachable=True, checked_at=time.monotonic(), stats=stats)
        except BackendError as exc:
            probe = Probe(reachable=False, checked_at=time.monotonic(), error=exc.message)
        self.last_probe = probe
        return probe

    def healthy(self, probe: Probe) -> bool:
        return probe.reachable and self.listener_connected

    async def is_healthy(self) -> bool:
        return self.healthy(await self.probe())

    def healthy_now(self) -> bool | None:
        probe = self.fresh_probe()
        return None if probe is None else self.healthy(probe)

    def fresh_probe(self) -> Probe | None:
        """The last probe while it is recent enough to use as it is."""
        last = self.last_probe
        if (last is not None
                and time.monotonic() - last.checked_at < self.timing.status_cache_seconds):
            return last
        return None

    async def close(self) -> None:
        task = self._probe_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
