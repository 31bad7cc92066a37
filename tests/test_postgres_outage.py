"""PostgreSQL stopped while `cylindria serve` runs: new jobs are refused with 503, jobs in
flight go on in memory, and every change is written once the database is back."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psycopg
import pytest
import ujson

from cylindria.addresses import free_port_run

import workflows
from helpers import Proc, clean_env, wait_until
from pg import PostgresMissing, PostgresServer, running_server

CYLINDRIA = [sys.executable, "-m", "cylindria"]
# One step of a simulated sampler: a 40-step job runs for about two seconds.
STEP_SECONDS = "0.05"
NODE = "outage-node"

pytestmark = pytest.mark.slow


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for this test alone: it is stopped and started again."""
    try:
        with running_server() as server:
            yield server
    except PostgresMissing as exc:
        pytest.fail(str(exc))


class Service:
    """The simulator and `cylindria serve` as processes, and calls to the service."""

    def __init__(self, tmp: Path, session: aiohttp.ClientSession, url: str) -> None:
        self.tmp = tmp
        self.session = session
        self.database_url = url
        self.sim_port = free_port_run(1)
        self.port = free_port_run(1)
        self.procs: list[Proc] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start_sim(self) -> None:
        proc = Proc([*CYLINDRIA, "simulate", "--gpus", "1", "--base-port", str(self.sim_port),
                     "--step-seconds", STEP_SECONDS, "--output-dir", str(self.tmp / "out")],
                    clean_env(), self.tmp / "sim.log")
        self.procs.append(proc)
        await proc.until_up(self.session, f"http://127.0.0.1:{self.sim_port}/system_stats")

    async def start_serve(self) -> Proc:
        proc = Proc([*CYLINDRIA, "serve", "--port", str(self.port), "--numberOfGpus", "1",
                     "--comfy-url", f"http://127.0.0.1:{self.sim_port}",
                     "--state-file", str(self.tmp / "state.sqlite3"),
                     "--database-url", self.database_url, "--node-name", NODE],
                    clean_env(CYLINDRIA_POLL_INTERVAL="0.2",
                              CYLINDRIA_HEARTBEAT_INTERVAL="0.5"),
                    self.tmp / f"serve-{len(self.procs)}.log")
        self.procs.append(proc)
        await proc.until_up(self.session, f"{self.url}/healthz")

        async def connected():
            return (await self.get("/healthz"))[1]["listeners_connected"] == 1
        await wait_until(connected, 10, "the listener to connect")
        return proc


    async def get(self, path: str) -> tuple[int, dict]:
        async with self.session.get(self.url + path) as resp:
            return resp.status, await resp.json()

    async def put(self, job_id: str, workflow: dict) -> tuple[int, dict, dict]:
        async with self.session.put(f"{self.url}/startjob/{job_id}/", data=ujson.dumps(workflow),
                                    params={"GpuId": "0"}) as resp:
            return resp.status, await resp.json(), dict(resp.headers)

    async def until_state(self, job_id: str, state: str, timeout: float = 15) -> dict:
        async def reached():
            status, body = await self.get(f"/jobstatus/{job_id}/")
            return body if status == 200 and body["state"] == state else None
        return await wait_until(reached, timeout, f"job {job_id} to be {state}")

    async def prompts(self) -> list[str]:
        async with self.session.get(f"http://127.0.0.1:{self.sim_port}/history") as resp:
            return list(await resp.json())

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
async def service(tmp_path, own_postgres):
    url = own_postgres.create_database()
    async with aiohttp.ClientSession() as session:
        service = Service(tmp_path, session, url)
        try:
            yield service
        finally:
            service.stop_all()


def states_in(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT job_id, state FROM jobs WHERE node = %s",
                                 (NODE,)).fetchall())


async def test_a_stopped_postgresql_refuses_new_jobs_and_loses_none(service, own_postgres):
    await service.start_sim()
    serve = await service.start_serve()
    assert (await service.put("before", workflows.quick()))[0] == 202
    await service.until_state("before", "completed")
    assert (await service.put("slow", workflows.txt2img(steps=40)))[0] == 202
    await service.until_state("slow", "running")

    own_postgres.halt()
    stopped_at = time.monotonic()
    status, body, headers = await service.put("refused", workflows.quick())
    assert status == 503, body
    assert body["error"]["code"] == "state_unavailable"
    assert "Retry later" in body["detail"] and "accepts no new job" in body["detail"]
    assert int(headers["Retry-After"]) > 0
    status, ready = await service.get("/readyz")
    assert status == 503 and "state" in ready["reasons"], ready
    assert (await service.get("/healthz"))[0] == 200
    # The job in flight is followed to its end, in memory.
    finished = await service.until_state("slow", "completed")
    assert finished["progress"] == 1.0
    assert (await service.put("refused-too", workflows.quick()))[0] == 503

    own_postgres.resume()
    resumed_at = time.monotonic()

    async def ready():
        return (await service.get("/readyz"))[0] == 200
    await wait_until(ready, 20, "the service to be ready again")
    back_in = time.monotonic() - resumed_at
    assert (await service.put("after", workflows.quick()))[0] == 202
    await service.until_state("after", "completed")
    outage = time.monotonic() - stopped_at

    assert serve.stop() == 0
    log = serve.output()
    assert log.count("writing failed") == 1, log
    assert log.count("writes work again;") == 1, log
    assert log.count("heartbeat failed") <= 1, log
    # What ComfyUI ran: never a job that was refused.
    assert len(await service.prompts()) == 3
    # Every job's last state is in the database, the one finished in the outage too.
    assert states_in(service.database_url) == {
        "before": "completed", "slow": "completed", "refused": "rejected",
        "after": "completed"}, (back_in, outage)

    await service.start_serve()
    for job_id, state in (("before", "completed"), ("slow", "completed"),
                          ("refused", "rejected"), ("after", "completed")):
        status, body = await service.get(f"/jobstatus/{job_id}/")
        assert status == 200 and body["state"] == state, body
