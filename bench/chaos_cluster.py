"""Chaos on a cluster: three nodes sharing one PostgreSQL database, each in front of
four simulated GPUs of its own, while everything that can go wrong does; then every
job's final state checked against what the simulated GPUs really ran, with the same
verdict table as bench/chaos.py.

Run with `.venv/bin/python bench/chaos_cluster.py --jobs 2000` (it starts its own
PostgreSQL from Debian's postgresql package, unless `--database-url` names an empty
database). All on loopback. The client spreads its PUTs (GpuId=auto) over the live
nodes in turn, as a round-robin balancer does, and sends a PUT that got no answer (or a
5xx) again to the next node: job ids are unique across the nodes, so it never runs
twice. Meanwhile:
- each GPU's websocket is dropped about every 5 s, and `/prompt` or `/queue` of a GPU
  hangs for a few seconds now and then;
- every simulated ComfyUI restarts (losing its queue) `--comfy-restarts` times;
- node gpu-b is killed with SIGKILL and started again on its name;
- node gpu-c is killed with SIGKILL and stays dead: its held jobs run on the others'
  GPUs, its jobs in flight are settled by a rescuer (lost, or run again elsewhere with
  `--retry-lost`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from chaos import WAIT_AFTER, Noise, all_jobs, finished_jobs, plan, report, show, spread, submit_all
from procs import PYTHON, Process, until_up

from cylindria.addresses import free_port_run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pg import PostgresMissing, running_server  # the tests' own server

NODES = ("gpu-a", "gpu-b", "gpu-c")
GPUS = 4  # per node
STEP = 0.005
HEARTBEAT = 0.5
GRACE = 3.0


class Node:
    """`cylindria serve` as one node, killed and started again at will."""

    def __init__(self, name: str, index: int, work: Path, sim_port: int, url: str | None,
                 retry_lost: int = 0, **env: str) -> None:
        self.name, self.work, self.database_url = name, work, url
        self.env = env
        self.sim_port = sim_port + index * GPUS
        self.port = free_port_run(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.retry_lost = retry_lost
        self.starts = 0
        self.proc: Process | None = None
        self.alive = False

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.starts += 1
        self.proc = Process(
            [PYTHON, "-m", "cylindria", "serve", "--port", str(self.port), "--numberOfGpus",
             str(GPUS), "--comfy-url", f"http://127.0.0.1:{self.sim_port}", "--log-level",
             "warning", "--state-file", str(self.work / f"{self.name}.sqlite3"),
             *(["--database-url", self.database_url, "--node-name", self.name]
               if self.database_url else [])],
            self.work / f"{self.name}-{self.starts}.log",
            **{"CYLINDRIA_RETRY_LOST": str(self.retry_lost),
               "CYLINDRIA_POLL_INTERVAL": "0.5", "CYLINDRIA_LOST_GRACE": "3",
               "CYLINDRIA_HEARTBEAT_INTERVAL": str(HEARTBEAT),
               "CYLINDRIA_NODE_GRACE": str(GRACE), **self.env})
        await until_up(session, f"{self.url}/healthz", self.proc)
        self.alive = True

    def kill(self) -> None:
        assert self.proc is not None
        self.alive = False
        self.proc.popen.send_signal(signal.SIGKILL)
        self.proc.popen.wait()
        self.proc.log.close()


async def chaos(session: aiohttp.ClientSession, nodes: list[Node], sim_port: int,
                jobs: int, comfy_restarts: int, done: asyncio.Event,
                progress: dict[str, int], rng: random.Random) -> Counter[str]:
    """The faults, spread over the work done; returns what was done."""
    did: Counter[str] = Counter()
    order = ["restart"] * comfy_restarts + ["restart node", "kill node"]
    rng.shuffle(order)
    noise = Noise(session, sim_port, len(nodes) * GPUS, rng, did)

    async def make(kind: str) -> None:
        if kind == "restart":
            await noise.restart_all()
            did["ComfyUI restarts (all GPUs)"] += 1
        elif kind == "restart node":
            nodes[1].kill()
            did[f"SIGKILL of {nodes[1].name}, started again"] += 1
            await asyncio.sleep(0.5)
            await nodes[1].start(session)
        else:
            nodes[2].kill()
            did[f"SIGKILL of {nodes[2].name}, left dead"] += 1

    await spread(order, jobs, done, progress, noise, make)
    return did


async def count_finished(session: aiohttp.ClientSession, nodes: list[Node],
                         progress: dict[str, int]) -> None:
    """Jobs in a final state, summed over the live nodes' metrics (each counts the jobs
    it holds): the faults are spread over the work done."""
    while True:
        total = 0
        for node in nodes:
            if not node.alive:
                continue
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with session.get(f"{node.url}/metrics",
                                       timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    total += finished_jobs(await resp.text())
        progress["finished"] = max(progress["finished"], total)
        await asyncio.sleep(0.2)


async def run(count: int, retry_lost: int, comfy_restarts: int, seed: int, work: Path,
              database_url: str) -> dict[str, Any]:
    rng = random.Random(seed)
    jobs = plan(count, rng)
    kinds = {job_id: kind for job_id, kind, _ in jobs}
    gpus = len(NODES) * GPUS
    sim_port = free_port_run(gpus)
    # A simulator process per node, as each host runs its own ComfyUIs.
    sims = [Process([PYTHON, "-m", "cylindria", "simulate", "--gpus", str(GPUS),
                     "--base-port", str(sim_port + n * GPUS), "--step-seconds", str(STEP),
                     "--output-dir", str(work / f"out-{n}"), "--log-level", "warning"],
                    work / f"sim-{n}.log") for n in range(len(NODES))]
    nodes = [Node(name, n, work, sim_port, database_url, retry_lost)
             for n, name in enumerate(NODES)]
    started = time.perf_counter()
    try:
        async with aiohttp.ClientSession() as session:
            for gpu in range(gpus):
                await until_up(session, f"http://127.0.0.1:{sim_port + gpu}/system_stats",
                               sims[gpu // GPUS])
            await asyncio.gather(*(node.start(session) for node in nodes))
            outcome: dict[str, int] = {}
            progress = {"finished": 0}
            done = asyncio.Event()
            counter = asyncio.create_task(count_finished(session, nodes, progress))
            faults = asyncio.create_task(chaos(session, nodes, sim_port, count,
                                               comfy_restarts, done, progress, rng))
            # Each PUT (and each one sent again) to the next live node, as a balancer's
            # round robin does.
            turn = itertools.count()

            def next_node() -> str:
                live = [node for node in nodes if node.alive] or nodes
                return live[next(turn) % len(live)].url

            await submit_all(session, next_node, jobs, outcome)
            done.set()
            did = await faults
            counter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await counter
            submitted = time.perf_counter() - started
            # The dead node's jobs are settled once its grace is over; then nothing may
            # stay in flight, read through a live node (every node's jobs).
            url = nodes[0].url
            deadline = time.monotonic() + WAIT_AFTER
            while time.monotonic() < deadline:
                if not await all_jobs(session, url, "queued,running"):
                    break
                await asyncio.sleep(1)
            settled = time.perf_counter() - started
            final = await all_jobs(session, url)
            ledger: dict[str, dict[str, Any]] = {}
            for gpu in range(gpus):
                async with session.get(f"http://127.0.0.1:{sim_port + gpu}/_sim/ledger") as r:
                    ledger.update(await r.json())
    finally:
        for node in nodes:
            if node.proc is not None and node.alive:
                node.proc.stop()
        for sim in sims:
            sim.stop()
    ran_by = Counter(job.get("node", NODES[0]) for job in final
                     if job["state"] == "completed")
    return report(jobs, outcome, final, kinds, ledger, did, submitted, settled,
                  **{"completed, by node": dict(sorted(ran_by.items()))})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--retry-lost", type=int, default=0)
    parser.add_argument("--comfy-restarts", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--database-url", help="an empty database (default: a PostgreSQL "
                                               "server of its own, on loopback)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with contextlib.ExitStack() as stack:
            url = args.database_url or stack.enter_context(
                running_server("-c max_connections=100")).create_database()
            with tempfile.TemporaryDirectory(prefix="cylindria-chaos-cluster-") as tmp:
                result = asyncio.run(run(args.jobs, args.retry_lost, args.comfy_restarts,
                                         args.seed, Path(tmp), url))
    except PostgresMissing as exc:
        print(f"{exc} Or pass --database-url.", file=sys.stderr)
        return 2
    return show(result, args.json,
                f"cylindria chaos, cluster of {len(NODES)} nodes x {GPUS} GPUs: {args.jobs} "
                f"jobs, CYLINDRIA_RETRY_LOST={args.retry_lost}, {args.comfy_restarts} "
                f"ComfyUI restart(s), seed {args.seed}")


if __name__ == "__main__":
    sys.exit(main())
