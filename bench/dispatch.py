"""Dispatch for GpuId=auto, measured: late binding against immediate placement with
jobs of mixed lengths, model-aware choice against plain late binding with several
checkpoints, an urgent job behind a long line, and how true ETAs are.

Real processes on loopback: the simulated GPUs (`cylindria simulate`, with sampler
steps and model loads that take time) and `cylindria serve`, started afresh for each
run; this client submits and reads every job's times back from `/jobs/`. Times are
scaled down from real GPUs (a "30 s" job takes 1.2 s here) so a run takes minutes.

    .venv/bin/python bench/dispatch.py            # every row
    .venv/bin/python bench/dispatch.py --only models
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import procs
from support import CHECKPOINTS, txt2img

STEP = 0.01  # seconds per sampler step on the simulated GPUs
IN_FLIGHT = 16
# The mixed-lengths row: the share of long jobs, the seconds a short and a long job
# take on a simulated GPU (4 and 120 steps, with the simulator's own overhead), and
# the loads tried (arrivals as a share of what two GPUs can do).
LONG_SHARE = 0.05
SHORT_SECONDS, LONG_SECONDS = 0.066, 1.23
LOADS = (0.4, 0.6, 0.75)


@dataclass
class Stack:
    url: str
    gpu_urls: list[str]
    session: aiohttp.ClientSession


@contextlib.asynccontextmanager
async def stack(work: Path, gpus: int, sim_args: list[str], **env: str
                ) -> AsyncIterator[Stack]:
    """Fresh simulated GPUs and a fresh `cylindria serve` (no state file) for one run."""
    run = Path(tempfile.mkdtemp(dir=work))
    async with procs.stack(run, gpus, None, ("--step-seconds", str(STEP), *sim_args),
                           **env) as running, aiohttp.ClientSession() as session:
        yield Stack(running.url, [running.gpu_url(g) for g in range(gpus)], session)


async def submit(st: Stack, jobs: list[tuple[str, dict[str, Any]]],
                 priority: int = 0) -> None:
    queue = list(reversed(jobs))

    async def worker() -> None:
        while queue:
            job_id, workflow = queue.pop()
            async with st.session.put(f"{st.url}/startjob/{job_id}/", json=workflow,
                                      params={"GpuId": "auto", "priority": str(priority)}
                                      ) as resp:
                await resp.read()
                if resp.status != 202:
                    raise RuntimeError(f"{job_id}: {resp.status} {await resp.text()}")

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))


async def settled(st: Stack, job_ids: list[str], timeout: float = 180) -> dict[str, dict]:
    """Every job's final status, once all are final."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, dict] = {}
        before = None
        while True:
            params = {"limit": "500", **({"before": str(before)} if before else {})}
            async with st.session.get(f"{st.url}/jobs/", params=params) as resp:
                page = await resp.json()
            found.update({job["job_id"]: job for job in page["jobs"]})
            before = page["next_before"]
            if before is None:
                break
        if all(found.get(j, {}).get("state") in ("completed", "failed") for j in job_ids):
            return {j: found[j] for j in job_ids}
        if time.monotonic() > deadline:
            stuck = [(j, found.get(j, {}).get("state"), found.get(j, {}).get("detail"))
                     for j in job_ids
                     if found.get(j, {}).get("state") not in ("completed", "failed")]
            raise RuntimeError(f"{len(stuck)} jobs did not finish in time: {stuck[:5]}")
        await asyncio.sleep(0.1)


def seconds(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def wall(done: dict[str, dict]) -> float:
    return (max(seconds(j["finished_at"]) for j in done.values())
            - min(seconds(j["submitted_at"]) for j in done.values()))


# -- the rows ----------------------------------------------------------------------------

async def arrive(st: Stack, jobs: list[tuple[str, dict[str, Any]]], gaps: list[float]
                 ) -> None:
    """Submit each job at its own moment (the gaps between arrivals), as clients do."""
    sending = []
    start = time.monotonic()
    due = 0.0
    for job, gap in zip(jobs, gaps, strict=True):
        due += gap
        delay = start + due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sending.append(asyncio.create_task(submit(st, [job])))
    await asyncio.gather(*sending)


async def lengths(work: Path) -> list[str]:
    """200 jobs on 2 GPUs, one in twenty 30 times longer, arriving at random at a share
    of what the GPUs can do: the short jobs' wait (p95, median) and the wall time, for
    immediate placement (today's least-work choice at submission, which a prefetch
    larger than any queue gives back) and for late binding."""
    lines = []
    for load in LOADS:
        rng = random.Random(11)
        plan = [(f"len-{n}", txt2img(n, 120 if rng.random() < LONG_SHARE else 4))
                for n in range(200)]
        mean = (1 - LONG_SHARE) * SHORT_SECONDS + LONG_SHARE * LONG_SECONDS
        gaps = [rng.expovariate(load * 2 / mean) for _ in plan]
        short = [job_id for job_id, w in plan if w["3"]["inputs"]["steps"] == 4]
        results = {}
        for name, env in [("immediate", {"CYLINDRIA_GPU_PREFETCH": "1000"}), ("late", {})]:
            async with stack(work, 2, [], **env) as st:
                await arrive(st, plan, gaps)
                done = await settled(st, [j for j, _ in plan])
            waits = [seconds(done[j]["started_at"]) - seconds(done[j]["submitted_at"])
                     for j in short]
            results[name] = (p95(waits), statistics.median(waits), wall(done))
        imm, late = results["immediate"], results["late"]
        lines.append(
            f"mixed lengths at {load:.0%} load, 2 GPUs, 200 jobs (1 in 20 is 30x longer): "
            f"short jobs' wait p95 {imm[0]:.2f} s immediate vs {late[0]:.2f} s late binding "
            f"({(1 - late[0] / imm[0]) * 100:.0f}% lower), median {imm[1]:.3f} vs "
            f"{late[1]:.3f} s; wall {imm[2]:.1f} vs {late[2]:.1f} s")
    return lines


async def models(work: Path) -> list[str]:
    """400 jobs on 4 GPUs over 3 checkpoints, one fits in VRAM: loads and wall time."""
    rng = random.Random(12)
    plan = [(f"mod-{n}", txt2img(n, 5, rng.choice(CHECKPOINTS))) for n in range(400)]
    results = {}
    sim = ["--model-load-seconds", "0.5", "--vram-gb", "7"]
    for name, env in [("plain", {"CYLINDRIA_MODEL_WINDOW": "1"}), ("aware", {})]:
        async with stack(work, 4, sim, **env) as st:
            await submit(st, plan)
            done = await settled(st, [j for j, _ in plan])
            loads = 0
            for gpu_url in st.gpu_urls:
                async with st.session.get(f"{gpu_url}/_sim/models") as resp:
                    loads += (await resp.json())["loads"]
        results[name] = (loads, wall(done))
    (plain_loads, plain_wall), (aware_loads, aware_wall) = results["plain"], results["aware"]
    return [f"mixed models, 4 GPUs, 400 jobs, 3 checkpoints (one fits in VRAM, 0.5 s a "
            f"load): {plain_loads} loads plain vs {aware_loads} model-aware "
            f"({(1 - aware_loads / plain_loads) * 100:.0f}% fewer); wall {plain_wall:.1f} vs "
            f"{aware_wall:.1f} s ({(1 - aware_wall / plain_wall) * 100:.0f}% shorter)"]


async def priority(work: Path) -> list[str]:
    """A priority-10 job sent behind about 100 held ones on 2 GPUs, while the line moves:
    how soon it starts, against one job-time (at priority 0 it would be last)."""
    plan = [(f"line-{n}", txt2img(n, 20)) for n in range(108)]
    async with stack(work, 2, []) as st:
        await submit(st, plan)
        # Sent mid-stream, at no particular moment of the GPUs' jobs.
        await asyncio.sleep(1.0)
        await submit(st, [("urgent", txt2img(10_000, 20))], priority=10)
        async with st.session.get(f"{st.url}/jobs/", params={"state": "queued",
                                                             "limit": "500"}) as resp:
            behind = sum(j["gpu_id"] is None for j in (await resp.json())["jobs"]) - 1
        done = await settled(st, [j for j, _ in plan] + ["urgent"])
    runs = [seconds(j["finished_at"]) - seconds(j["started_at"]) for j in done.values()]
    job_time = statistics.median(runs)
    urgent = done["urgent"]
    waited = seconds(urgent["started_at"]) - seconds(urgent["submitted_at"])
    return [f"priority 10 sent with {behind} jobs still held, 2 GPUs: started after "
            f"{waited:.2f} s; one job-time is {job_time:.2f} s (ratio {waited / job_time:.2f})"]


async def eta(work: Path) -> list[str]:
    """After 20 jobs of warm-up, 40 more at once on 2 GPUs: the ETA each got at
    submission against when it really finished."""
    async with stack(work, 2, []) as st:
        warm = [(f"warm-{n}", txt2img(n, 20)) for n in range(20)]
        await submit(st, warm)
        await settled(st, [j for j, _ in warm])
        told: dict[str, float] = {}
        for n in range(40):
            job_id = f"eta-{n}"
            await submit(st, [(job_id, txt2img(1000 + n, 20))])
            async with st.session.get(f"{st.url}/jobstatus/{job_id}/") as resp:
                body = await resp.json()
            if body["eta_seconds"] is not None:
                told[job_id] = seconds(body["expected_finish_at"])
        done = await settled(st, [f"eta-{n}" for n in range(40)])
    errors = []
    for job_id, expected in told.items():
        actual = seconds(done[job_id]["finished_at"]) - seconds(done[job_id]["submitted_at"])
        errors.append(abs(expected - seconds(done[job_id]["finished_at"])) / actual)
    return [f"ETA at submission, 40 jobs after 20 of warm-up, 2 GPUs: {len(told)}/40 had "
            f"one; median absolute error {statistics.median(errors) * 100:.1f}% "
            f"(p90 {sorted(errors)[int(0.9 * len(errors))] * 100:.1f}%)"]


ROWS = {"lengths": lengths, "models": models, "priority": priority, "eta": eta}


async def main(only: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="cylindria-dispatch-") as tmp:
        for name, row in ROWS.items():
            if only and name != only:
                continue
            for line in await row(Path(tmp)):
                print(line, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(ROWS))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    asyncio.run(main(args.only))
