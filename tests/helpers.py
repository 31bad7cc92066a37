"""Helpers shared by the tests: bounded waits, free ports, fast timings, API calls."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import ujson
from aiohttp import web

from cylindria.addresses import free_port_run
from cylindria.config import Timing

# A test of the journal's store, run on the SQLite state file and on PostgreSQL.
both_stores = pytest.mark.parametrize("store", ["sqlite", "postgres"], indirect=True)

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


def with_timing(**changes: Any) -> Timing:
    return replace(FAST, **changes)


# -- calls to the API ---------------------------------------------------------------

async def put_job(client, job_id, workflow, gpu=None, headers=None):
    params = {} if gpu is None else {"GpuId": str(gpu)}
    resp = await client.put(f"/startjob/{job_id}/", params=params,
                            data=ujson.dumps(workflow), headers=headers)
    return resp.status, await resp.json()


async def job_status(client, job_id):
    resp = await client.get(f"/jobstatus/{job_id}/")
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def wait_state(client, job_id, *states, timeout=5.0):
    async def check():
        body = await job_status(client, job_id)
        return body if body["state"] in states else None
    return await wait_until(check, timeout, f"job {job_id} to be {states}")


async def start_paused(client, sim, job_id, workflow, gpu=None, timeout=5.0):
    """Submit a job and hold it running at its first progress tick (the simulator's
    pause point); returns its status. `sim.resume()` lets it go on."""
    sim.pause(at="tick")
    status, body = await put_job(client, job_id, workflow, gpu=gpu)
    assert status == 202, body
    async with asyncio.timeout(timeout):
        await sim.until_blocked()
    return await wait_state(client, job_id, "running", timeout=timeout)


def concrete(path: str) -> str:
    """A route's path with each {placeholder} filled in."""
    return re.sub(r"\{[^}]+\}", "x", path)


# -- real processes ----------------------------------------------------------------

def clean_env(**extra: str) -> dict[str, str]:
    """This environment without Cylindria's settings or proxies, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CYLINDRIA_", "COMFYUI_"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(extra)
    return env


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> int:
    """Ask a process to end with `sig`, kill it if it does not within 10 s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


class Proc:
    """A command running in the background, its output kept in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.handle = log.open("wb")
        self.popen = subprocess.Popen(args, env=env, stdout=self.handle,
                                      stderr=subprocess.STDOUT)

    def stop(self, sig: int = signal.SIGINT) -> int:
        code = stop(self.popen, sig)
        self.handle.close()
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def until_up(self, session: aiohttp.ClientSession, url: str, timeout: float = 20) -> None:
        """Wait until `url` answers 200 (an aiohttp `session` asks); fail at once, with
        the output, if the command exits first."""
        async def up() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"process exited early:\n{self.output()}")
            try:
                async with session.get(url) as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False
        await wait_until(up, timeout, f"{url} to answer")


# -- webhooks ------------------------------------------------------------------------

async def webhook_receiver(aiohttp_server, fail_first: int):
    """A loopback server for callbacks that answers 500 to the first `fail_first`."""
    calls: list[tuple[bytes, dict]] = []

    async def hook(request: web.Request) -> web.Response:
        calls.append((await request.read(), dict(request.headers)))
        if len(calls) <= fail_first:
            return web.Response(status=500)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}/hook", calls


async def webhook_state(client, job_id, state):
    """The job's status once its webhook is in `state`, else None."""
    body = await (await client.get(f"/jobstatus/{job_id}/")).json()
    hook = body.get("webhook")
    return body if hook and hook["state"] == state else None


@contextlib.contextmanager
def running_demo(folder: Path, *args: str, ready: bytes = b'"status":"ok"',
                 **env: str) -> Iterator[str]:
    """`cylindria demo ARGS` in a process of its own, with the state file off and ports
    of its own, once its /healthz holds `ready`; its URL."""
    port, sim_port = free_port_run(1), free_port_run(8)
    proc = Proc([sys.executable, "-m", "cylindria", "demo", "--port", str(port),
                 "--sim-port", str(sim_port), "--no-state", *args], clean_env(**env),
                folder / "demo.log")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while ready not in _get(url + "/healthz"):
            assert proc.popen.poll() is None, proc.output()
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.05)
        yield url
    finally:
        proc.stop()


def _get(url: str) -> bytes:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
        return resp.read()
    return b""
