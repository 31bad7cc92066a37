"""What the benchmarks share: the service and its simulated GPUs on loopback, a workflow."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from cylindria.addresses import free_port_run
from cylindria.app import create_app
from cylindria.config import Settings, Timing
from cylindria.simulator import ComfySimulator, SimSettings

TIMING = Timing(poll_interval=0.2, lost_grace=2.0, reconnect_initial=0.05, reconnect_max=0.5)
EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def quick(color: int) -> dict[str, Any]:
    """The README's quick example, small, in a colour of its own (so never cached)."""
    workflow = json.loads((EXAMPLES / "quick.json").read_text())
    workflow["1"]["inputs"].update(width=64, height=64, color=color)
    return workflow


@asynccontextmanager
async def stack(gpus: int, out: Path, **settings: Any):
    """Simulators and Cylindria on real loopback sockets; yields (base URL, sims, sim
    port, upstream request counts by path)."""
    base = free_port_run(gpus)
    runners: list[web.AppRunner] = []
    sims = []
    counts: Counter[str] = Counter()

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        counts[request.path] += 1
        return await handler(request)

    try:
        for n in range(gpus):
            sim = ComfySimulator(SimSettings(step_seconds=0.0, output_dir=out / f"g{n}"), n)
            sims.append(sim)
            sim_app = sim.create_app()
            sim_app.middlewares.insert(0, count)
            runner = web.AppRunner(sim_app, access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, "127.0.0.1", base + n).start()
        port = free_port_run(1)
        app = create_app(Settings(port=port, comfy_url=f"http://127.0.0.1:{base}",
                                  num_gpus=gpus, timing=TIMING, **settings))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.insert(0, runner)
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                async with session.get(f"{url}/healthz") as resp:
                    if (await resp.json())["listeners_connected"] == gpus:
                        break
                await asyncio.sleep(0.05)
        yield url, sims, base, counts
    finally:
        for runner in runners:
            await runner.cleanup()
