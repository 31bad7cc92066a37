"""Shared fixtures: simulated ComfyUIs on consecutive loopback ports, and Cylindria in front."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cylindria.app import create_app
from cylindria.config import Settings, Timing
from cylindria.keys import GPUS
from cylindria.simulator import ComfySimulator, SimSettings

FAST = Timing(connect_timeout=1.0, request_timeout=2.0, submit_timeout=1.0,
              status_timeout=0.5, status_cache_seconds=0.3, poll_interval=0.05,
              lost_grace=0.3, reconnect_initial=0.02, reconnect_max=0.2, ws_heartbeat=5.0)


async def wait_until(predicate: Callable[[], Any], timeout: float = 5.0,
                     what: str = "condition") -> Any:
    """Poll `predicate` (sync or async) until truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def consecutive_free_ports(count: int, host: str = "127.0.0.1") -> int:
    """A base port such that base..base+count-1 are all free right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((host, 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        socks = []
        try:
            for n in range(count):
                s = socket.socket()
                socks.append(s)
                s.bind((host, base + n))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports found")


@dataclass
class Cluster:
    """Simulated ComfyUIs, one per GPU, and every request each received."""

    base_port: int
    sims: list[ComfySimulator]
    servers: list[TestServer]
    requests: list[list[tuple[str, str]]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.base_port}"

    def count(self, gpu: int, method: str, path: str) -> int:
        return sum(1 for m, p in self.requests[gpu] if m == method and p == path)


def request_log(entries: list[tuple[str, str]]) -> Any:
    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        entries.append((request.method, request.path))
        return await handler(request)
    return record


@pytest.fixture
async def start_sims(aiohttp_server, tmp_path: Path):
    async def start(count: int = 1, *, middlewares: tuple[Any, ...] = (),
                    **sim_options: Any) -> Cluster:
        base = consecutive_free_ports(count)
        cluster = Cluster(base, [], [])
        for n in range(count):
            options = {"step_seconds": 0.0, "output_dir": tmp_path / f"sim-gpu{n}",
                       **sim_options}
            sim = ComfySimulator(SimSettings(**options), gpu_index=n)
            app = sim.create_app()
            log: list[tuple[str, str]] = []
            app.middlewares.insert(0, request_log(log))
            for mw in middlewares:
                app.middlewares.insert(1, mw)
            cluster.requests.append(log)
            cluster.sims.append(sim)
            cluster.servers.append(await aiohttp_server(app, port=base + n))
        return cluster
    return start


@pytest.fixture
async def start_cylindria(start_sims, aiohttp_client):
    """Cylindria in front of a cluster. `start_sims` comes first in the arguments so
    Cylindria's client is torn down before the simulators."""
    async def start(cluster: Cluster | None = None, *, connect: bool = True,
                    **settings: Any) -> TestClient:
        if cluster is None:
            cluster = await start_sims(1)
        options: dict[str, Any] = {"comfy_url": cluster.base_url,
                                   "num_gpus": len(cluster.sims), "timing": FAST}
        options.update(settings)
        client = await aiohttp_client(create_app(Settings(**options)))
        if connect:
            await wait_until(lambda: all(g.listener_connected for g in client.app[GPUS]),
                             what="listeners to connect")
        return client
    return start


def with_timing(**changes: Any) -> Timing:
    return replace(FAST, **changes)
