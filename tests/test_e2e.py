"""End to end: `cylindria simulate` and `cylindria serve` as real processes on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from cylindria.addresses import free_port_run

import workflows
from helpers import Proc, clean_env, wait_until

ROOT = Path(__file__).resolve().parents[1]
CYLINDRIA = [sys.executable, "-m", "cylindria"]
KEY = "e2e-test-key-5f3Qa"


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


async def get_json(session, url, **kw):
    async with session.get(url, **kw) as resp:
        return resp.status, await resp.json()


async def wait_http(session, url, proc: Proc, timeout=20.0):
    async def ready():
        if proc.popen.poll() is not None:
            raise AssertionError(f"process exited early:\n{proc.output()}")
        try:
            async with session.get(url) as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False
    await wait_until(ready, timeout, f"{url} to answer")


async def test_two_processes_end_to_end(procs, tmp_path):
    sim_port = free_port_run(2)
    port = free_port_run(1)
    sim = Proc([*CYLINDRIA, "simulate", "--gpus", "2", "--base-port", str(sim_port),
                "--step-seconds", "0.01", "--output-dir", str(tmp_path / "out")],
               clean_env(), tmp_path / "sim.log")
    procs.append(sim)
    serve = Proc([*CYLINDRIA, "serve", "--port", str(port), "--numberOfGpus", "2",
                  "--comfy-url", f"http://127.0.0.1:{sim_port}",
                  "--state-file", str(tmp_path / "state.sqlite3")],
                 clean_env(CYLINDRIA_API_KEY=KEY), tmp_path / "serve.log")
    procs.append(serve)
    base = f"http://127.0.0.1:{port}"
    headers = {"X-API-Key": KEY}
    async with aiohttp.ClientSession() as session:
        await wait_http(session, f"http://127.0.0.1:{sim_port + 1}/system_stats", sim)
        await wait_http(session, f"{base}/healthz", serve)

        async def both_ok():
            for gpu in (0, 1):
                _, body = await get_json(session, f"{base}/serverstatus",
                                         params={"GpuId": str(gpu)}, headers=headers)
                if body["status"] != "ok":
                    return False
            return True
        await wait_until(both_ok, 10, "both GPUs ok")

        for gpu in (0, 1):
            async with session.put(f"{base}/startjob/e2e-{gpu}/", params={"GpuId": str(gpu)},
                                   json=workflows.txt2img(steps=5), headers=headers) as resp:
                assert resp.status == 202, await resp.text()

        async def finished():
            states = []
            for gpu in (0, 1):
                _, body = await get_json(session, f"{base}/jobstatus/e2e-{gpu}/",
                                         headers=headers)
                states.append(body)
            return states if all(b["state"] == "completed" for b in states) else None
        states = await wait_until(finished, 20, "both jobs to complete")
        assert [s["gpu_id"] for s in states] == [0, 1]
        assert all(s["progress"] == 1.0 for s in states)

        status, _ = await get_json(session, f"{base}/jobstatus/e2e-0/")
        assert status == 401

        # The simulator process goes away: Cylindria says so, and keeps running.
        assert sim.stop() == 0
        async def degraded():
            _, body = await get_json(session, f"{base}/serverstatus", headers=headers)
            return body["status"] == "degraded"
        await wait_until(degraded, 10, "degraded status")
    assert serve.stop() == 0
    assert "listener connected" in serve.output()


def test_bad_configuration_stops_with_one_line(tmp_path):
    result = subprocess.run([*CYLINDRIA, "serve", "--numberOfGpus", "0"], env=clean_env(),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "cylindria: error: --numberOfGpus must be between 1 and 8 (got 0)"]


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "cylindria"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0
    assert "serve" in result.stdout and "simulate" in result.stdout


def test_plain_pip_install_ships_the_templates(tmp_path):
    """A non-editable install into a fresh venv renders the dashboard from its own copy."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", str(ROOT)], check=True,
                   timeout=600, capture_output=True)
    probe = (
        "import asyncio, cylindria, cylindria.dashboard as d\n"
        "from aiohttp.test_utils import TestClient, TestServer\n"
        "from cylindria.app import create_app\n"
        "from cylindria.config import Settings\n"
        "print(cylindria.__file__)\n"
        "print(d.templates_dir())\n"
        "async def main():\n"
        "    app = create_app(Settings(comfy_url='http://127.0.0.1:9'))\n"
        "    async with TestClient(TestServer(app)) as c:\n"
        "        r = await c.get('/')\n"
        "        print(r.status, 'Cylindria' in await r.text())\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run([str(py), "-c", probe], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path, env=clean_env())
    assert result.returncode == 0, result.stderr
    module, templates, page = result.stdout.strip().splitlines()
    assert module.startswith(str(venv)) and templates.startswith(str(venv))
    assert page == "200 True"


def run_once(*args: str) -> tuple[int, list[str]]:
    result = subprocess.run([*CYLINDRIA, *args], env=clean_env(), capture_output=True,
                            text=True, timeout=30)
    return result.returncode, result.stderr.strip().splitlines()


def test_ports_in_use_stop_each_command_with_one_line(tmp_path):
    port = free_port_run(1)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        code, lines = run_once("serve", "--port", str(port), "--no-state")
        assert code == 1
        assert lines[-1] == (f"cylindria: error: cannot listen on 127.0.0.1:{port} (address "
                             "already in use): something else is listening there: stop it, "
                             "or choose another port")
        assert not any("Traceback" in line for line in lines)
        code, lines = run_once("simulate", "--gpus", "1", "--base-port", str(port))
        assert code == 1 and lines[-1].startswith(
            f"cylindria: error: the simulator cannot listen on 127.0.0.1 port {port}")
        code, lines = run_once("demo", "--no-state", "--sim-port", str(port), "--port",
                               str(free_port_run(1)))
        assert code == 1
        assert lines[-1] == (f"cylindria: error: in use already: 127.0.0.1:{port} (the simulator); "
                         "stop what listens there, or choose other ports (make run "
                         "SIM_PORT=... PORT=...)")


async def test_demo_runs_jobs_on_simulated_gpus_away_from_comfyuis_port(procs, tmp_path):
    sim_port, port = free_port_run(2), free_port_run(1)
    demo = Proc([*CYLINDRIA, "demo", "--numberOfGpus", "2", "--sim-port", str(sim_port),
                 "--port", str(port), "--state-file", str(tmp_path / "s.sqlite3")],
                clean_env(), tmp_path / "demo.log")
    procs.append(demo)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        await wait_http(session, f"{base}/healthz", demo)

        async def ready():
            status, body = await get_json(session, f"{base}/readyz")
            return status == 200 and len(body["usable_gpus"]) == 2
        await wait_until(ready, 10, "both simulated GPUs to be usable")
        async with session.put(f"{base}/startjob/demo-1/", params={"GpuId": "auto"},
                               json=workflows.quick()) as resp:
            assert resp.status == 202

        async def done():
            _, body = await get_json(session, f"{base}/jobstatus/demo-1/")
            return body["state"] == "completed"
        await wait_until(done, 10, "the demo job to complete")
    assert demo.stop() == 0
