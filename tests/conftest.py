"""Shared fixtures: simulated ComfyUIs on consecutive loopback ports, and Cylindria in front."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cylindria.addresses import free_port_run
from cylindria.app import create_app
from cylindria.appkeys import GPUS
from cylindria.config import Settings
from cylindria.simulator import ComfySimulator, SimSettings
from cylindria.web.serving import server_options, start_server

from helpers import FAST, wait_until


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
        base = free_port_run(count)
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


@dataclass
class Served:
    """Cylindria served as `cylindria serve` serves it: its own runner on a real port."""

    app: web.Application
    runner: web.AppRunner
    port: int
    stopped: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()


@pytest.fixture
async def serve(start_sims):
    """Cylindria on one simulated GPU, served by its own runner. aiohttp's test server
    cancels a handler when its client leaves; the service does not (that would cut
    other handlers short mid-work), so tests of leaving clients and of connection
    timeouts use this."""
    started: list[Served] = []

    async def start(**settings: Any) -> Served:
        cluster = await start_sims(1)
        port = free_port_run(1)
        options: dict[str, Any] = {"comfy_url": cluster.base_url, "port": port,
                                   "timing": FAST, **settings}
        config = Settings(**options)
        app = create_app(config)
        served = Served(app, await start_server(app, config), port)
        started.append(served)
        await wait_until(lambda: all(g.listener_connected for g in app[GPUS]),
                         what="listeners to connect")
        return served

    yield start
    for served in reversed(started):
        await served.stop()


@pytest.fixture
async def start_cylindria(start_sims, aiohttp_client):
    """Cylindria in front of a cluster. `start_sims` comes first in the arguments so
    Cylindria's client is torn down before the simulators."""
    async def start(cluster: Cluster | None = None, *, connect: bool = True,
                    **settings: Any) -> TestClient:
        if cluster is None:
            cluster = await start_sims(1)
        # Tests' webhook receivers listen on loopback, which callbacks may not reach
        # unless the operator allows it.
        options: dict[str, Any] = {"comfy_url": cluster.base_url,
                                   "num_gpus": len(cluster.sims), "timing": FAST,
                                   "callback_allow": ("127.0.0.0/8", "::1")}
        options.update(settings)
        config = Settings(**options)
        # Served as `cylindria serve` serves it (aiohttp_client would drop server_kwargs).
        server = TestServer(create_app(config))
        await server.start_server(**server_options(config))
        client = await aiohttp_client(server)
        if connect:
            await wait_until(lambda: all(g.listener_connected for g in client.app[GPUS]),
                             what="listeners to connect")
        return client
    return start
