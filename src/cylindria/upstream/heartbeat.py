"""Nodes sharing one PostgreSQL database: this node's heartbeat (its row, with its GPUs'
state, written every few seconds) and what it last read of the other nodes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..core.jobs import JobsService
from ..nodes import GRACE_BEATS, NodeInfo, gpu_name
from .gpus import Gpu, Probe

log = logging.getLogger(__name__)

# Writes this node's heartbeat with its GPUs; answers the other nodes' rows, or None.
Beat = Callable[[list[dict[str, Any]]], Awaitable[Sequence[tuple[Any, ...]] | None]]


@dataclass(slots=True)
class NodeSeen:
    """Another node as its last heartbeat showed it, read at `read_at` (monotonic)."""

    name: str
    advertise_url: str
    started_at: datetime
    heartbeat_seconds: float
    stopped: bool
    age: float
    gpus: list[dict[str, Any]]
    read_at: float

    def last_seen(self, now: float) -> float:
        """Seconds since its last heartbeat (by the database's clock, then this one's)."""
        return max(0.0, self.age + now - self.read_at)

    def alive(self, now: float) -> bool:
        return not self.stopped and self.last_seen(now) < GRACE_BEATS * self.heartbeat_seconds


@dataclass(slots=True)
class Cluster:
    """This node, and the others as the last heartbeat read them. `enabled` only with
    PostgreSQL; without it there are no nodes and `/gpus/` is one host's."""

    node: NodeInfo
    enabled: bool
    others: list[NodeSeen] = field(default_factory=list)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def seen(self, rows: Sequence[tuple[Any, ...]], now: float) -> None:
        self.others = [NodeSeen(name, url, started, float(seconds), bool(stopped),
                                float(age), list(gpus or ()), now)
                       for name, url, started, seconds, stopped, age, gpus in rows]


def gpu_summary(node: str, gpu: Gpu, probe: Probe, jobs: JobsService) -> dict[str, Any]:
    """One GPU as a heartbeat carries it, and as `/gpus/` shows it under `nodes`."""
    reachable = probe.reachable
    running = jobs.registry.running_on(gpu.index)
    body: dict[str, Any] = {
        "name": gpu_name(node, gpu.index), "node": node, "gpu_id": gpu.index,
        "status": "ok" if gpu.healthy(probe) else "degraded", "reachable": reachable,
        "drained": gpu.drained, "queue_depth": jobs.registry.queued_count(gpu.index),
        "queue_remaining": gpu.queue_remaining if reachable else None,
        "running_job": None if running is None else running.job_id,
        "load": jobs.load(gpu), "models": jobs.models.of(gpu.index)}
    devices = probe.stats.get("devices") if reachable else None
    if isinstance(devices, list):
        body["devices"] = [{"name": d.get("name"), "vram_total": d.get("vram_total"),
                            "vram_free": d.get("vram_free")}
                           for d in devices if isinstance(d, dict)]
    return body


async def own_gpus(node: str, gpus: Sequence[Gpu], jobs: JobsService) -> list[dict[str, Any]]:
    probes = await asyncio.gather(*(gpu.probe() for gpu in gpus))
    return [gpu_summary(node, gpu, probe, jobs)
            for gpu, probe in zip(gpus, probes, strict=True)]


async def heartbeat(cluster: Cluster, beat: Beat, gpus: Sequence[Gpu],
                    jobs: JobsService) -> None:
    """Every heartbeat interval: write this node's row with its GPUs, and keep what it
    read of the others. The write runs on the journal's thread, never on the loop."""
    while True:
        rows = await beat(await own_gpus(cluster.node.name, gpus, jobs))
        if rows is not None:
            cluster.seen(rows, time.monotonic())
        await asyncio.sleep(cluster.node.heartbeat_seconds)


# Settles the jobs of dead nodes as lost; answers what it rescued (see store/rescue.py).
Rescue = Callable[[], Awaitable[Sequence[Any]]]


async def rescuer(rescue: Rescue, interval: float) -> None:
    """Every `interval`: settle the jobs in flight of nodes that died (their heartbeat
    past the grace period, their session gone) as lost. Every node runs one; they take
    turns in the database. One line per node rescued."""
    while True:
        for rescued in await rescue():
            log.warning("node %s stopped answering at %s: %d job(s) it held in flight "
                        "settled as lost, %d of them put back in the shared line to run "
                        "again", rescued.node,
                        rescued.silent_since.isoformat(timespec="seconds"), rescued.jobs,
                        rescued.requeued)
        await asyncio.sleep(interval)
