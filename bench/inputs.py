"""Input files that travel with jobs, measured: 200 `GpuId=auto` jobs over 8 simulated
GPUs sharing 5 inputs of 8 MiB, sent three ways (a multipart form per job, base64 in
the JSON, a reference to an input uploaded once), each through a fresh stack.

Real processes on loopback: `cylindria simulate` (8 GPUs) and `cylindria serve`. For
each way: how many uploads each GPU received (the goal is at most one per input), the
submission latency seen by the client (p50/p99, 8 submissions in flight), and how late
Cylindria's event loop ran while the files moved (its own lag histogram from
/metrics, and /healthz answered on the side every 20 ms; the goal is under 50 ms).

With `--database-url`, the jobs and the input files are kept in PostgreSQL (each way
on a database of its own, made and dropped here, so the role must be allowed to create
databases): every file is then written there before its answer.

    .venv/bin/python bench/inputs.py                 # the three rows
    .venv/bin/python bench/inputs.py --jobs 50 --size-mib 2
    .venv/bin/python bench/inputs.py --database-url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import procs
import ujson

GPUS = 8
PROBE = """
import sys, threading, time, ujson, urllib.request
latencies, done = [], threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), done.set()), daemon=True).start()
while not done.is_set():
    started = time.perf_counter()
    urllib.request.urlopen(sys.argv[1], timeout=30).read()
    latencies.append(time.perf_counter() - started)
    time.sleep(0.02)
print(ujson.dumps(latencies))
"""
IN_FLIGHT = 8
LAG_GOAL = 0.05


def workflow(ref: str, n: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": ref}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": f"bench/in{n}"}},
    }


@functools.cache
def _encoded(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encoded(data: bytes) -> str:
    """The file in base64, made once: the client's cost is not what is measured."""
    return _encoded(data)


async def submit(session: aiohttp.ClientSession, url: str, way: str, n: int,
                 files: list[bytes], refs: list[str]) -> float:
    pick = n % len(files)
    name = f"in{pick}.png"
    started = time.perf_counter()
    target = f"{url}/startjob/b{n}/?GpuId=auto"
    if way == "multipart":
        form = aiohttp.FormData()
        form.add_field("workflow", ujson.dumps(workflow(name, n)),
                       content_type="application/json")
        form.add_field("file", files[pick], filename=name, content_type="image/png")
        request = session.put(target, data=form)
    elif way == "base64":
        body = {"prompt": workflow(name, n),
                "inputs": {name: {"base64": encoded(files[pick])}}}
        request = session.put(target, data=ujson.dumps(body),
                              headers={"Content-Type": "application/json"})
    else:
        request = session.put(target, data=ujson.dumps(workflow(refs[pick], n)),
                              headers={"Content-Type": "application/json"})
    async with request as resp:
        await resp.read()
        if resp.status not in (200, 202):
            raise RuntimeError(f"job b{n}: {resp.status} {await resp.text()}")
    return time.perf_counter() - started


async def lag_histogram(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("cylindria_event_loop_lag_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets[bound] = float(line.split()[-1])
    return buckets


def uploads_by_gpu(text: str) -> dict[int, int]:
    found: dict[int, int] = {}
    for line in text.splitlines():
        if line.startswith("cylindria_input_uploads_total{"):
            gpu = int(line.split('gpu="')[1].split('"')[0])
            found[gpu] = int(float(line.split()[-1]))
    return found


@contextlib.contextmanager
def database_of_its_own(url: str | None, way: str) -> Iterator[dict[str, str]]:
    """With `url`, the service's environment for a new database, dropped afterwards."""
    if url is None:
        yield {}
        return
    import psycopg

    name = f"cylindria_bench_inputs_{way}_{os.getpid()}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield {"CYLINDRIA_DATABASE_URL": urlunsplit(urlsplit(url)._replace(path=f"/{name}"))}
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def one_way(work: Path, way: str, jobs: int, files: list[bytes],
                  database_url: str | None = None) -> dict[str, Any]:
    with database_of_its_own(database_url, way) as database:
        return await _one_way(work, way, jobs, files, database)


async def _one_way(work: Path, way: str, jobs: int, files: list[bytes],
                   database: dict[str, str]) -> dict[str, Any]:
    run = Path(tempfile.mkdtemp(dir=work, prefix=f"{way}-"))
    env = {"CYLINDRIA_INPUT_MAX": str(max(len(f) for f in files) + 1024), **database}
    async with procs.stack(run, GPUS, run / "state.sqlite3", **env) as running, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        url = running.url
        refs: list[str] = []
        if way == "reference":
            for n, data in enumerate(files):
                async with session.post(f"{url}/inputs/", params={"name": f"in{n}.png"},
                                        data=data, headers={"Content-Type": "image/png"}
                                        ) as resp:
                    refs.append((await resp.json())["inputs"][0]["ref"])
        before = await lag_histogram(session, url)
        # /healthz is asked from a process of its own: this one is busy encoding bodies.
        prober = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PROBE, f"{url}/healthz", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def bounded(n: int) -> float:
            async with gate:
                return await submit(session, url, way, n, files, refs)

        started = time.perf_counter()
        latencies = await asyncio.gather(*(bounded(n) for n in range(jobs)))
        submitted = time.perf_counter() - started
        await procs.until_drained(session, url, 120)
        finished = time.perf_counter() - started
        out, _ = await prober.communicate(b"stop\n")
        probes = ujson.loads(out)
        async with session.get(f"{url}/jobs/", params={"limit": "500"}) as resp:
            states = [job["state"] for job in (await resp.json())["jobs"]]
        after = await lag_histogram(session, url)
        async with session.get(f"{url}/metrics") as resp:
            uploads = uploads_by_gpu(await resp.text())
    samples = after["+Inf"] - before["+Inf"]
    within = after["0.05"] - before["0.05"]
    late = {bound: after[bound] - before[bound] for bound in after}
    p99_bound = next((b for b, c in late.items() if c >= 0.99 * samples), "+Inf")
    return {"way": way, "jobs": jobs, "completed": states.count("completed"),
            "uploads": [uploads.get(g, 0) for g in range(GPUS)],
            "p50": procs.percentile(latencies, 0.5), "p99": procs.percentile(latencies, 0.99),
            "submitted_s": submitted, "finished_s": finished,
            "lag_samples": samples, "lag_over_goal": samples - within, "lag_p99_le": p99_bound,
            "healthz_p99": procs.percentile(probes, 0.99), "healthz_max": max(probes)}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--inputs", type=int, default=5)
    parser.add_argument("--size-mib", type=float, default=8)
    parser.add_argument("--only", choices=("multipart", "base64", "reference"))
    parser.add_argument("--database-url", default=None,
                        help="keep jobs and input files in PostgreSQL (a role that may "
                             "create databases)")
    args = parser.parse_args()
    size = int(args.size_mib * 2**20)
    files = [os.urandom(size) for _ in range(args.inputs)]
    print(f"{args.jobs} auto jobs, {GPUS} simulated GPUs, {args.inputs} inputs of "
          f"{args.size_mib:g} MiB ({', '.join(hashlib.sha256(f).hexdigest()[:8] for f in files)})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cylindria-bench-inputs-") as work:
        for way in ("multipart", "base64", "reference"):
            if args.only in (None, way):
                row = await one_way(Path(work), way, args.jobs, files, args.database_url)
                rows.append(row)
                print(f"  {way:9}  done", file=sys.stderr)
    print("| way | completed | uploads per GPU | submit p50 | submit p99 | loop lag > 50 ms "
          "| lag p99 | /healthz p99 (max) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {r['completed']}/{r['jobs']} | "
              f"{' '.join(map(str, r['uploads']))} | {r['p50'] * 1000:.1f} ms | "
              f"{r['p99'] * 1000:.1f} ms | {int(r['lag_over_goal'])} of "
              f"{int(r['lag_samples'])} samples | <= {r['lag_p99_le']} s | "
              f"{r['healthz_p99'] * 1000:.1f} ms ({r['healthz_max'] * 1000:.1f} ms) |")
    print("wall: " + ", ".join(f"{r['way']} {r['finished_s']:.1f} s" for r in rows))
    bad = [r for r in rows if r["completed"] != r["jobs"]
           or any(u > args.inputs for u in r["uploads"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
