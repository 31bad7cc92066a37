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


CHECKPOINTS = ("v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors",
               "sd_xl_refiner_1.0.safetensors")


def txt2img(seed: int, steps: int, ckpt: str = CHECKPOINTS[0]) -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse",
                                                         "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512,
                                                           "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0],
            "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0],
                                                    "filename_prefix": "bench/txt2img"}},
    }


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
