"""Real processes for the benchmarks: simulated GPUs, `cylindria serve`, a bare server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from cylindria.addresses import free_port_run

PYTHON = sys.executable

BARE_SERVER = """
import sys, ujson
from aiohttp import web
record = ujson.loads(sys.argv[2])
async def handler(request):
    return web.json_response(record, dumps=ujson.dumps)
app = web.Application()
app.router.add_get("/jobstatus/{job_id}/", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

# The least a forwarding service can do with one extra aiohttp hop: read the PUT's
# workflow, send it to the GPU's POST /prompt through one shared ClientSession, answer
# 202 with ComfyUI's prompt id. No checks, no records, no journal: the floor under
# Cylindria's submission overhead.
BARE_PROXY = """
import sys, uuid, ujson, aiohttp
from aiohttp import web
gpu = sys.argv[2]
async def handler(request):
    workflow = ujson.loads(await request.read())
    body = ujson.dumps({"prompt": workflow, "client_id": "bare",
                        "prompt_id": str(uuid.uuid4())})
    async with request.app["session"].post(f"{gpu}/prompt", data=body,
            headers={"Content-Type": "application/json"}) as resp:
        answer = ujson.loads(await resp.read())
    return web.json_response({"job_id": request.match_info["job_id"],
                              "prompt_id": answer["prompt_id"]}, status=202,
                             dumps=ujson.dumps)
async def session(app):
    app["session"] = aiohttp.ClientSession()
    yield
    await app["session"].close()
app = web.Application()
app.cleanup_ctx.append(session)
app.router.add_put("/startjob/{job_id}/", handler)
app.router.add_get("/healthz", lambda request: web.json_response({}))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CYLINDRIA_", "COMFYUI_"))}
    env.update(extra)
    return env


class Process:
    def __init__(self, args: list[str], log: Path, **env: str) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log.open("wb")
        self.popen = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                      env=clean_env(**env))
        self.started = time.perf_counter()

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.popen.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.popen.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()


async def until_up(session: aiohttp.ClientSession, url: str, proc: Process,
                   timeout: float = 60) -> float:
    """Seconds from the process's start until `url` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.popen.args} exited; see {proc.log.name}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url) as resp:
                if resp.status == 200:
                    return time.perf_counter() - proc.started
        await asyncio.sleep(0.01)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


async def until_drained(session: aiohttp.ClientSession, url: str, timeout: float,
                        every: float = 0.1) -> bool:
    """Whether no job was queued or running at `url` within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with session.get(f"{url}/jobs/", params={"state": "queued,running",
                                                        "limit": "1"}) as resp:
            if not (await resp.json())["jobs"]:
                return True
        await asyncio.sleep(every)
    return False


def percentile(values: list[float], share: float) -> float:
    """The value `share` of the way up the sorted values (0.5: the median)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


class Stack:
    """Simulated GPUs and a Cylindria with its state file, each its own process."""

    def __init__(self, sim: Process, serve: Process, sim_port: int, port: int) -> None:
        self.sim, self.serve = sim, serve
        self.sim_port, self.port = sim_port, port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gpu_url(self, gpu: int) -> str:
        return f"http://127.0.0.1:{self.sim_port + gpu}"


@contextlib.asynccontextmanager
async def stack(work: Path, gpus: int, state: Path | None, sim_args: tuple[str, ...] = (),
                **env: str) -> AsyncIterator[Stack]:
    """`sim_args`: more flags for `cylindria simulate` (`--step-seconds 0` unless they
    say otherwise); `env`: the service's environment."""
    sim_port, port = free_port_run(gpus), free_port_run(1)
    steps = () if "--step-seconds" in sim_args else ("--step-seconds", "0")
    sim = Process([PYTHON, "-m", "cylindria", "simulate", "--gpus", str(gpus),
                   "--base-port", str(sim_port), *steps, "--output-dir",
                   str(work / "out"), "--log-level", "warning", *sim_args], work / "sim.log")
    state_args = ["--state-file", str(state)] if state is not None else ["--no-state"]
    serve = Process([PYTHON, "-m", "cylindria", "serve", "--port", str(port),
                     "--numberOfGpus", str(gpus), "--comfy-url", f"http://127.0.0.1:{sim_port}",
                     "--log-level", "warning", *state_args], work / "serve.log", **env)
    running = Stack(sim, serve, sim_port, port)
    try:
        async with aiohttp.ClientSession() as session:
            for gpu in range(gpus):
                await until_up(session, f"{running.gpu_url(gpu)}/system_stats", sim)
            await until_up(session, f"{running.url}/healthz", serve)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                async with session.get(f"{running.url}/healthz") as resp:
                    if (await resp.json())["listeners_connected"] == gpus:
                        break
                await asyncio.sleep(0.05)
        yield running
    finally:
        serve.stop()
        sim.stop()


@contextlib.asynccontextmanager
async def script_server(work: Path, script: str, arg: str, probe: str,
                        log: str) -> AsyncIterator[tuple[str, Process]]:
    """`script` run as `python -c script PORT ARG` on a free port, once `probe` answers
    200: its URL and its process."""
    port = free_port_run(1)
    proc = Process([PYTHON, "-c", script, str(port), arg], work / log)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await until_up(session, url + probe, proc)
        yield url, proc
    finally:
        proc.stop()


def bare_proxy(work: Path, gpu_url: str
               ) -> contextlib.AbstractAsyncContextManager[tuple[str, Process]]:
    """A minimal aiohttp forwarder of PUT /startjob/{job_id}/ to `gpu_url`'s /prompt."""
    return script_server(work, BARE_PROXY, gpu_url, "/healthz", "proxy.log")


def bare_server(work: Path, record: str
                ) -> contextlib.AbstractAsyncContextManager[tuple[str, Process]]:
    """An aiohttp + ujson handler returning `record` at /jobstatus/{job_id}/."""
    return script_server(work, BARE_SERVER, record, "/jobstatus/x/", "bare.log")


def wrk(url: str, connections: int, seconds: float) -> tuple[float, float] | None:
    """(requests/s, p99 ms) from wrk, or None when wrk is not installed."""
    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--latency",
                          url], capture_output=True, text=True, check=True).stdout
    rps = p99 = 0.0
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            rps = float(words[1])
        elif words[:1] == ["99%"]:
            p99 = _ms(words[1])
    return rps, p99


SUBMIT_SCRIPT = """
counter = 0
template = [[%s]]
request = function()
  counter = counter + 1
  local body = string.format(template, %d + counter)
  return wrk.format("PUT", "/startjob/w-" .. counter .. "/?GpuId=auto",
                    {["Content-Type"] = "application/json"}, body)
end
"""


def wrk_submit(url: str, workflow_template: str, first_color: int, connections: int,
               seconds: float, work: Path) -> tuple[int, int] | None:
    """PUT new jobs for `seconds` with wrk, each its own job id and colour:
    (requests sent, answers that were not 2xx), or None without wrk."""
    if shutil.which("wrk") is None:
        return None
    script = work / "submit.lua"
    script.write_text(SUBMIT_SCRIPT % (workflow_template, first_color))
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "-s",
                          str(script), url], capture_output=True, text=True, check=True).stdout
    sent = bad = 0
    for line in out.splitlines():
        words = line.split()
        if "requests in" in line:
            sent = int(words[0])
        elif line.strip().startswith("Non-2xx"):
            bad = int(words[-1])
    return sent, bad


def _ms(text: str) -> float:
    for unit, scale in (("ms", 1.0), ("us", 0.001), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)
