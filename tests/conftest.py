"""Shared fixtures: simulated ComfyUIs on consecutive loopback ports, and Cylindria in front."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import ujson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cylindria.addresses import free_port_run
from cylindria.app import create_app
from cylindria.appkeys import GPUS
from cylindria.config import Settings
from cylindria.simulator import ComfySimulator, SimSettings
from cylindria.store.journal import open_journal
from cylindria.web.serving import server_options, start_server

from helpers import FAST, wait_until
from pg import PostgresMissing, PostgresServer, running_server


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


# -- where jobs are kept: the SQLite state file, or PostgreSQL ----------------------------

@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole run, started when a test first needs it. CI
    installs PostgreSQL; a missing one fails the run, never skips these tests."""
    try:
        with running_server() as server:
            yield server
    except PostgresMissing as exc:
        pytest.fail(str(exc))


@pytest.fixture
def database_url(postgres_server: PostgresServer) -> str:
    """A new, empty database of its own for each test."""
    return postgres_server.create_database()


@dataclass
class Store:
    """Where a test keeps its jobs: `sqlite` (a state file) or `postgres` (a database of
    its own), as Settings, as `cylindria serve` flags, and opened as a journal."""

    kind: str
    path: Path
    url: str | None = None

    @property
    def settings(self) -> dict[str, Any]:
        return {"state_file": self.path, "database_url": self.url}

    @property
    def serve_args(self) -> list[str]:
        # The state file's path places the input files, PostgreSQL or not.
        url = ["--database-url", self.url] if self.url else []
        return ["--state-file", str(self.path), *url]

    async def open(self, memory_jobs: int, on_saved: Callable[..., None]) -> Any:
        return await open_journal(self.path, memory_jobs, on_saved, database_url=self.url)

    def record(self, job_id: str) -> dict[str, Any] | None:
        """A job's record as the store holds it, read past Cylindria."""
        if self.url is None:
            with sqlite3.connect(self.path) as conn:
                row = conn.execute("SELECT record FROM jobs WHERE job_id = ?",
                                   (job_id,)).fetchone()
        else:
            with psycopg.connect(self.url) as conn:
                row = conn.execute("SELECT record FROM jobs WHERE job_id = %s",
                                   (job_id,)).fetchone()
        return None if row is None else ujson.loads(row[0])


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The SQLite state file, unless the test is parametrized with `both_stores`."""
    kind = getattr(request, "param", "sqlite")
    url = request.getfixturevalue("database_url") if kind == "postgres" else None
    return Store(kind, tmp_path / "state.sqlite3", url)
