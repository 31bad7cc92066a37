"""What one cancel costs the service while ComfyUI holds a long queue.

Real processes on loopback: one simulated GPU whose first job runs for as long as the
run lasts, and `cylindria serve` with its state file. `--jobs` jobs are pinned to that
GPU, then cancelled one at a time from the front of the line (each cancel moves every
job behind it up one place), while a probe reads one job's status over and over. The
service's CPU seconds per cancel (its worker process's included) come from /proc; the
probe's median shows what the cancels cost everyone else.

    .venv/bin/python bench/cancel.py                 # 2,700 jobs, 200 of them cancelled
    .venv/bin/python bench/cancel.py --jobs 300 --cancels 100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import aiohttp
import procs
from support import quick, txt2img

SUBMITTERS = 16


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its living children (the service decodes large
    answers in a worker process)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/task/{pid}/children") as found:
            children = [int(child) for child in found.read().split()]
    except FileNotFoundError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(child) for child in children)


async def submit_all(session: aiohttp.ClientSession, url: str, count: int) -> None:
    ids = iter(range(count))

    async def submitter() -> None:
        for n in ids:
            async with session.put(f"{url}/startjob/c-{n}/", params={"GpuId": "0"},
                                   json=quick(n + 1)) as resp:
                await resp.read()
                assert resp.status == 202, resp.status

    await asyncio.gather(*(submitter() for _ in range(SUBMITTERS)))


async def probe(session: aiohttp.ClientSession, url: str, samples: list[float],
                stop: asyncio.Event) -> None:
    """Reads a status every few milliseconds until `stop`, timing each read."""
    while not stop.is_set():
        started = time.perf_counter()
        async with session.get(f"{url}/jobstatus/runner/") as resp:
            await resp.read()
        samples.append(time.perf_counter() - started)
        await asyncio.sleep(0.005)


async def probe_for(session: aiohttp.ClientSession, url: str, seconds: float) -> list[float]:
    samples: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(probe(session, url, samples, stop))
    await asyncio.sleep(seconds)
    stop.set()
    await task
    return samples


async def run(jobs: int, cancels: int, work: Path) -> None:
    async with procs.stack(work, 1, work / "state.sqlite3",
                           sim_args=("--step-seconds", "60")) as stack, \
            aiohttp.ClientSession() as session:
        url = stack.url
        # The first job holds the GPU (one step takes a minute), so the rest wait.
        async with session.put(f"{url}/startjob/runner/", params={"GpuId": "0"},
                               json=txt2img(1, 1000)) as resp:
            assert resp.status == 202, resp.status
        started = time.perf_counter()
        await submit_all(session, url, jobs)
        print(f"{jobs} jobs queued on one GPU in {time.perf_counter() - started:.1f} s")
        # Settle: the poller has read the long queue at least once.
        await asyncio.sleep(2.0)
        quiet = await probe_for(session, url, 3.0)

        samples: list[float] = []
        stop = asyncio.Event()
        prober = asyncio.create_task(probe(session, url, samples, stop))
        latencies: list[float] = []
        cpu_before = cpu_seconds(stack.serve.popen.pid)
        wall = time.perf_counter()
        for n in range(cancels):
            began = time.perf_counter()
            async with session.post(f"{url}/canceljob/c-{n}/") as resp:
                await resp.read()
                assert resp.status == 202, resp.status
            latencies.append(time.perf_counter() - began)
        wall = time.perf_counter() - wall
        cpu = cpu_seconds(stack.serve.popen.pid) - cpu_before
        stop.set()
        await prober

        print(f"cancels: {cancels} in {wall:.1f} s; service CPU {cpu * 1000 / cancels:.1f} ms "
              f"per cancel ({cpu / wall * 100:.0f}% of one core)")
        print(f"cancel latency: p50 {procs.percentile(latencies, 0.5) * 1000:.1f} ms, "
              f"p99 {procs.percentile(latencies, 0.99) * 1000:.1f} ms")
        print(f"GET /jobstatus p50: {procs.percentile(quiet, 0.5) * 1000:.1f} ms quiet, "
              f"{procs.percentile(samples, 0.5) * 1000:.1f} ms during the cancels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2700)
    parser.add_argument("--cancels", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cylindria-cancel-") as folder:
        asyncio.run(run(args.jobs, min(args.cancels, args.jobs), Path(folder)))


if __name__ == "__main__":
    main()
