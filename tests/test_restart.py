"""Crashes, with `cylindria serve` and `cylindria simulate` as real processes: a
killed service comes back with every job, never running one twice."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from cylindria.addresses import free_port_run

import workflows
from helpers import Proc, both_stores, clean_env, wait_until

CYLINDRIA = [sys.executable, "-m", "cylindria"]
GPUS = 2
# Fast enough for a test, slow enough that a job is caught queued or running.
STEP_SECONDS = "0.05"

pytestmark = pytest.mark.slow


class Rig:
    """Simulated GPUs in one process, and `cylindria serve` processes in front of them,
    started and killed as a test needs."""

    def __init__(self, tmp_path: Path, session: aiohttp.ClientSession, store) -> None:
        self.tmp = tmp_path
        self.session = session
        self.sim_port = free_port_run(GPUS)
        self.port = free_port_run(1)
        self.store = store
        self.state = store.path
        self.procs: list[Proc] = []
        self.serves = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sim_url(self, gpu: int) -> str:
        return f"http://127.0.0.1:{self.sim_port + gpu}"

    async def start_sim(self) -> None:
        proc = Proc([*CYLINDRIA, "simulate", "--gpus", str(GPUS), "--base-port",
                     str(self.sim_port), "--step-seconds", STEP_SECONDS, "--output-dir",
                     str(self.tmp / "out")], clean_env(), self.tmp / "sim.log")
        self.procs.append(proc)
        for gpu in range(GPUS):
            await proc.until_up(self.session, f"{self.sim_url(gpu)}/system_stats")

    async def start_serve(self, **env: str) -> Proc:
        self.serves += 1
        proc = Proc([*CYLINDRIA, "serve", "--port", str(self.port), "--numberOfGpus",
                     str(GPUS), "--comfy-url", self.sim_url(0), *self.store.serve_args],
                    clean_env(CYLINDRIA_LOST_GRACE="0.5", CYLINDRIA_POLL_INTERVAL="0.2",
                              **env),
                    self.tmp / f"serve-{self.serves}.log")
        self.procs.append(proc)
        await proc.until_up(self.session, f"{self.url}/healthz")

        async def connected():
            return (await self.get("/healthz"))[1]["listeners_connected"] == GPUS
        await wait_until(connected, 10, "listeners to connect")
        return proc


    async def get(self, path: str, base: str | None = None) -> tuple[int, dict]:
        async with self.session.get((base or self.url) + path) as resp:
            return resp.status, await resp.json()

    async def put(self, job_id: str, workflow: dict, gpu: int | str = "auto") -> int:
        async with self.session.put(f"{self.url}/startjob/{job_id}/", json=workflow,
                                    params={"GpuId": str(gpu)}) as resp:
            return resp.status

    async def states(self, job_ids: list[str]) -> dict[str, dict]:
        return {job_id: (await self.get(f"/jobstatus/{job_id}/"))[1] for job_id in job_ids}

    async def until_all(self, job_ids: list[str], *states: str, timeout: float = 30) -> dict:
        async def done():
            found = await self.states(job_ids)
            return found if all(b.get("state") in states for b in found.values()) else None
        return await wait_until(done, timeout, f"{len(job_ids)} jobs to be {states}")

    async def comfy_history(self) -> list[str]:
        """Every prompt id each simulated GPU ran, in one list."""
        prompts: list[str] = []
        for gpu in range(GPUS):
            prompts.extend((await self.get("/history", self.sim_url(gpu)))[1])
        return prompts

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
async def rig(tmp_path, store):
    async with aiohttp.ClientSession() as session:
        rig = Rig(tmp_path, session, store)
        try:
            yield rig
        finally:
            rig.stop_all()


def kill(proc: Proc) -> None:
    assert proc.stop(signal.SIGKILL) == -signal.SIGKILL


@both_stores
async def test_a_killed_service_comes_back_with_every_job(rig):
    await rig.start_sim()
    serve = await rig.start_serve()
    finished = [f"done-{n}" for n in range(5)]
    for job_id in finished:
        assert await rig.put(job_id, workflows.quick()) == 202
    await rig.until_all(finished, "completed")
    in_flight = [f"busy-{n}" for n in range(20)]
    for n, job_id in enumerate(in_flight):
        assert await rig.put(job_id, workflows.txt2img(steps=6), gpu=n % GPUS) == 202

    async def both_running():
        found = await rig.states(in_flight)
        return sum(b["state"] == "running" for b in found.values()) == GPUS
    await wait_until(both_running, 10, "a job running on each GPU")
    kill(serve)

    await rig.start_serve()
    after = await rig.states(finished + in_flight)
    assert all(after[j]["state"] == "completed" for j in finished)
    listed = (await rig.get("/jobs/?state=completed&limit=100"))[1]["jobs"]
    assert [j["job_id"] for j in listed if j["job_id"] in finished] == finished[::-1]
    assert all(after[j]["state"] in ("queued", "running", "completed") for j in in_flight)
    running = [j for j in in_flight if after[j]["state"] == "running"]
    assert running, after

    async def progressed():
        found = await rig.states(running)
        return all(b["state"] == "completed" or b["progress"] > after[j]["progress"]
                   for j, b in found.items())
    await wait_until(progressed, 10, "the running jobs to move on")
    done = await rig.until_all(finished + in_flight, "completed")
    assert all(b["progress"] == 1.0 and b["attempt"] == 1 for b in done.values())
    history = await rig.comfy_history()
    assert sorted(history) == sorted(b["prompt_id"] for b in done.values())
    # The state file's path only placed the input files: the jobs were in PostgreSQL.
    assert rig.state.exists() == (rig.store.kind == "sqlite")


def files(outputs) -> list[str]:
    """The file names of a job's outputs (a status body's list, or ComfyUI's history)."""
    if isinstance(outputs, list):
        return sorted(o["filename"] for o in outputs if "filename" in o)
    return sorted(image["filename"] for output in outputs.values()
                  for image in output.get("images", []))


async def test_outputs_saved_before_a_crash_are_all_reported(rig):
    await rig.start_sim()
    serve = await rig.start_serve()
    # Long enough (5 s) that the job still runs when the service is back.
    assert await rig.put("two-saves", workflows.two_saves(steps=100), gpu=0) == 202

    async def early_saved_and_sampling():
        body = (await rig.get("/jobstatus/two-saves/"))[1]
        return body if body["outputs"] and body["current_node"] == "3" else None
    before = await wait_until(early_saved_and_sampling, 10, "the early images and sampling")
    assert len(before["outputs"]) == 2
    kill(serve)

    await rig.start_serve()
    assert (await rig.get("/jobstatus/two-saves/"))[1]["state"] == "running"
    done = (await rig.until_all(["two-saves"], "completed"))["two-saves"]
    prompt = done["prompt_id"]
    history = (await rig.get(f"/history/{prompt}", rig.sim_url(0)))[1][prompt]["outputs"]
    assert files(done["outputs"]) == files(history)
    assert len(done["outputs"]) == 3, done["outputs"]


async def both_crash(rig: Rig, serve: Proc, job_ids: list[str]) -> None:
    """Submit long jobs, then kill the service and restart every simulated ComfyUI, which
    forgets its queue."""
    for n, job_id in enumerate(job_ids):
        assert await rig.put(job_id, workflows.txt2img(steps=20), gpu=n % GPUS) == 202
    await rig.until_all(job_ids, "queued", "running")
    kill(serve)
    for gpu in range(GPUS):
        async with rig.session.post(f"{rig.sim_url(gpu)}/_sim/restart") as resp:
            assert resp.status == 200


async def test_jobs_comfyui_forgot_fail_as_lost_or_run_again(rig):
    await rig.start_sim()
    serve = await rig.start_serve()
    lost = [f"lost-{n}" for n in range(4)]
    await both_crash(rig, serve, lost)
    serve = await rig.start_serve()
    failed = await rig.until_all(lost, "failed")
    for job_id, body in failed.items():
        assert body["error"]["type"] == "lost"
        assert f"POST /retryjob/{job_id}/" in body["detail"]
    assert await rig.comfy_history() == []

    # The same again, with automatic retries: each lost job runs a second time.
    again = [f"again-{n}" for n in range(4)]
    await both_crash(rig, serve, again)
    await rig.start_serve(CYLINDRIA_RETRY_LOST="1")
    done = await rig.until_all(again, "completed")
    for body in done.values():
        assert body["attempt"] == 2
        first, second = body["attempts"]
        assert first["state"] == "failed" and first["error"]["type"] == "lost"
        assert second["state"] == "completed" and second["prompt_id"] == body["prompt_id"]
    assert sorted(await rig.comfy_history()) == sorted(b["prompt_id"] for b in done.values())
    # Jobs lost before retries were allowed stay as they ended.
    assert all(b["state"] == "failed" for b in (await rig.states(lost)).values())


@pytest.mark.parametrize("fault, reached_comfyui", [("crash-before-submit", False),
                                                    ("crash-after-submit", True)])
async def test_a_crash_around_the_submission_never_runs_a_job_twice(rig, fault,
                                                                    reached_comfyui):
    await rig.start_sim()
    serve = await rig.start_serve(CYLINDRIA_FAULTS=fault)
    with pytest.raises(aiohttp.ClientError):
        await rig.put("edge", workflows.quick(), gpu=0)
    assert serve.popen.wait(timeout=10) == 70
    assert f"fault {fault}" in serve.output()

    await rig.start_serve()
    if reached_comfyui:
        body = (await rig.until_all(["edge"], "completed"))["edge"]
        assert await rig.comfy_history() == [body["prompt_id"]]
    else:
        body = (await rig.until_all(["edge"], "failed"))["edge"]
        assert body["error"]["type"] == "lost"
        assert "stopped while submitting" in body["detail"]
        assert "POST /retryjob/edge/" in body["detail"]
        assert await rig.comfy_history() == []
        async with rig.session.post(f"{rig.url}/retryjob/edge/") as resp:
            assert resp.status == 202
        body = (await rig.until_all(["edge"], "completed"))["edge"]
        assert await rig.comfy_history() == [body["prompt_id"]]


# -- state files Cylindria cannot use ---------------------------------------------------

def serve_once(state: Path, **kw) -> tuple[int, str]:
    """Start `cylindria serve` on `state`; it must stop by itself. (exit code, last line)"""
    result = subprocess.run(
        [*CYLINDRIA, "serve", "--port", str(free_port_run(1)), "--comfy-url",
         f"http://127.0.0.1:{free_port_run(1)}", "--state-file", str(state)],
        env=clean_env(), capture_output=True, text=True, timeout=30, **kw)
    lines = result.stderr.strip().splitlines()
    return result.returncode, lines[-1] if lines else ""


def test_a_corrupt_state_file_stops_start_up_with_one_line(tmp_path):
    state = tmp_path / "state.sqlite3"
    state.write_bytes(b"this is not a database at all, " * 100)
    code, line = serve_once(state)
    assert code == 1
    assert line.startswith(f"cylindria: error: state file {state} ")
    assert "not a Cylindria state file, or it is damaged" in line
    assert state.read_bytes().startswith(b"this is not a database")


def test_a_state_file_of_a_newer_cylindria_is_refused(tmp_path):
    state = tmp_path / "state.sqlite3"
    with sqlite3.connect(state) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    code, line = serve_once(state)
    assert code == 1
    assert "has schema 99" in line and "newer Cylindria" in line


async def test_a_state_file_in_use_by_another_cylindria_is_refused(rig):
    await rig.start_sim()
    await rig.start_serve()
    code, line = serve_once(rig.state)
    assert code == 1
    assert line == (f"cylindria: error: state file {rig.state} is in use by another running "
                    "Cylindria; stop that one first, or give this one its own --state-file")
    assert (await rig.get("/healthz"))[0] == 200


def test_a_state_file_that_cannot_be_written_is_refused(tmp_path):
    state = tmp_path / "state.sqlite3"
    with sqlite3.connect(state) as conn:
        conn.execute("CREATE TABLE t (x)")
    with unwritable(state):
        code, line = serve_once(state)
    assert code == 1
    assert line.startswith(f"cylindria: error: state file {state} ")
    assert "writable" in line


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """`path` cannot be written, even by root (who ignores file modes)."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a file immutable here: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
