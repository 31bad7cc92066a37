"""Nodes sharing PostgreSQL against one node, side by side in one run:
- jobs per second: `--jobs` GpuId=auto jobs PUT in turn over the nodes, 32 at a time,
  from the first PUT until every one has completed; one node of 4 simulated GPUs (the
  state file, then PostgreSQL) against three such nodes on one database;
- a GPU freeing to its next job starting: with a backlog waiting in line and
  CYLINDRIA_GPU_PREFETCH=0 (each GPU gets its next job only once it is free), the gap
  between one job's end and the next one's start on the same GPU, p50 and p99;
- GET /jobstatus requests per second under wrk at 32 connections on node gpu-a, of a job
  gpu-a holds and of a job gpu-b holds (read from the database).

Run with `.venv/bin/python bench/cluster.py` (PostgreSQL from Debian's postgresql
package, a server of its own on loopback; wrk from Debian's wrk package for the last
row). Each process is its own: simulators (one per node), nodes, and this client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import ujson
from chaos import all_jobs
from chaos_cluster import GPUS, NODES, Node
from procs import PYTHON, Process, percentile, until_up, wrk
from support import txt2img

from cylindria.addresses import free_port_run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pg import PostgresMissing, running_server  # the tests' own server

STEP = 0.01
STEPS = 4
IN_FLIGHT = 32


@contextlib.asynccontextmanager
async def cluster(work: Path, count: int, database_url: str | None, **env: str):
    """`count` nodes (one with the state file when `database_url` is None), each with a
    simulator process of its own: yields (session, nodes)."""
    sim_port = free_port_run(count * GPUS)
    sims = [Process([PYTHON, "-m", "cylindria", "simulate", "--gpus", str(GPUS),
                     "--base-port", str(sim_port + n * GPUS), "--step-seconds", str(STEP),
                     "--output-dir", str(work / f"out-{n}"), "--log-level", "warning"],
                    work / f"sim-{n}.log") for n in range(count)]
    nodes = [Node(NODES[n], n, work, sim_port, database_url, CYLINDRIA_POLL_INTERVAL="0.2",
                  **env) for n in range(count)]
    try:
        async with aiohttp.ClientSession() as session:
            for gpu in range(count * GPUS):
                await until_up(session, f"http://127.0.0.1:{sim_port + gpu}/system_stats",
                               sims[gpu // GPUS])
            await asyncio.gather(*(node.start(session) for node in nodes))
            yield session, nodes
    finally:
        for node in nodes:
            if node.proc is not None:
                node.proc.stop()
        for sim in sims:
            sim.stop()


async def submit(session: aiohttp.ClientSession, nodes: list[Node], count: int,
                 prefix: str) -> list[str]:
    """PUT `count` auto jobs, each to the next node, IN_FLIGHT at a time."""
    ids = [f"{prefix}-{n}" for n in range(count)]
    pending = list(enumerate(ids))

    async def worker() -> None:
        while pending:
            n, job_id = pending.pop()
            node = nodes[n % len(nodes)]
            async with session.put(f"{node.url}/startjob/{job_id}/", params={"GpuId": "auto"},
                                   data=ujson.dumps(txt2img(n, STEPS))) as resp:
                assert resp.status in (200, 202), await resp.text()

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return ids


async def until_done(session: aiohttp.ClientSession, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not await all_jobs(session, url, "queued,running"):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"jobs still in flight after {timeout} s")


def _moment(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def gaps(jobs: list[dict[str, Any]], own: str) -> list[float]:
    """Milliseconds from each job's end to the next job's start on the same GPU."""
    by_gpu: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for job in jobs:
        if job["state"] != "completed" or not job.get("started_at"):
            continue
        key = (job.get("node") or own, job["gpu_id"])
        by_gpu.setdefault(key, []).append((_moment(job["started_at"]),
                                           _moment(job["finished_at"])))
    found = []
    for runs in by_gpu.values():
        runs.sort()
        for (_, end), (start, _) in pairwise(runs):
            found.append(max(0.0, start - end) * 1000)
    return found


async def throughput(work: Path, count: int, url: str | None, jobs: int) -> dict[str, float]:
    async with cluster(work, count, url) as (session, nodes):
        started = time.perf_counter()
        await submit(session, nodes, jobs, "tput")
        await until_done(session, nodes[0].url, 300)
        seconds = time.perf_counter() - started
    return {"jobs/s": jobs / seconds, "seconds": seconds}


async def next_job(work: Path, count: int, url: str | None, jobs: int) -> dict[str, float]:
    async with cluster(work, count, url, CYLINDRIA_GPU_PREFETCH="0") as (session, nodes):
        await submit(session, nodes, jobs, "gap")
        await until_done(session, nodes[0].url, 300)
        found = gaps(await all_jobs(session, nodes[0].url), nodes[0].name)
    return {"p50 ms": percentile(found, 0.5), "p99 ms": percentile(found, 0.99),
            "gaps": len(found)}


async def status_rate(work: Path, url: str, seconds: float) -> dict[str, Any]:
    async with cluster(work, 2, url) as (session, nodes):
        a, b = nodes
        for node, job_id in ((a, "held-here"), (b, "held-there")):
            async with session.put(f"{node.url}/startjob/{job_id}/", params={"GpuId": "0"},
                                   data=ujson.dumps(txt2img(7, STEPS))) as resp:
                assert resp.status == 202, await resp.text()
        await until_done(session, a.url, 30)
        results = {}
        for job_id in ("held-here", "held-there", "held-here", "held-there"):
            measured = wrk(f"{a.url}/jobstatus/{job_id}/", 32, seconds)
            if measured is None:
                return {"skipped": "wrk not installed"}
            results.setdefault(job_id, []).append(measured)
    return {job_id: {"req/s": max(r for r, _ in runs), "p99 ms": min(p for _, p in runs)}
            for job_id, runs in results.items()}


async def main_async(args: argparse.Namespace, url_for: Any, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kinds = (("one node, state file", 1, False), ("one node, PostgreSQL", 1, True),
             ("three nodes, PostgreSQL", 3, True))
    if "jobs" in args.only:
        for label, count, pg in kinds:
            out[f"jobs/s: {label}"] = await throughput(
                work / f"t-{label[:3]}{count}", count, url_for() if pg else None, args.jobs)
    if "next" in args.only:
        for label, count, pg in kinds:
            out[f"GPU free -> next job: {label}"] = await next_job(
                work / f"g-{label[:3]}{count}", count, url_for() if pg else None, args.jobs)
    if "status" in args.only:
        out["GET /jobstatus on gpu-a, wrk -c32"] = await status_rate(
            work / "s", url_for(), args.seconds)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--only", default="jobs,next,status",
                        help="the rows to run, of jobs, next and status (comma-separated)")
    args = parser.parse_args()
    try:
        with running_server("-c max_connections=100") as server, \
                tempfile.TemporaryDirectory(prefix="cylindria-cluster-bench-") as tmp:
            result = asyncio.run(main_async(args, server.create_database, Path(tmp)))
    except PostgresMissing as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"cylindria cluster: {args.jobs} jobs of {STEPS} steps x {STEP} s, "
          f"{GPUS} simulated GPUs per node")
    for key, value in result.items():
        shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in value.items()}
        print(f"{key:48} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
