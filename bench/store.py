"""Benchmarks of the service with its journal: every part a real process on loopback.

Run with `make bench` (or `.venv/bin/python bench/store.py`). Each comparison is
measured side by side in one run, interleaved, so a noisy machine affects both sides
alike. `wrk` (Debian: apt-get install wrk) measures requests per second; without it
those rows are skipped. `--database-url postgresql://...` runs the submission rows again
with the jobs in PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import ujson
from history import fill
from procs import PYTHON, Process, bare_proxy, bare_server, stack, until_up, wrk, wrk_submit
from support import quick

GPUS = 8


def files_size(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


async def timed_put(session: aiohttp.ClientSession, url: str, job_id: str, gpu: str,
                    color: int) -> float:
    started = time.perf_counter()
    async with session.put(f"{url}/startjob/{job_id}/", params={"GpuId": gpu},
                           json=quick(color)) as resp:
        await resp.read()
        assert resp.status == 202, resp.status
    return time.perf_counter() - started


async def timed_get(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.get(url) as resp:
        await resp.read()
        assert resp.status == 200, resp.status
    return time.perf_counter() - started


async def flatness(work: Path, held: int, rounds: int) -> dict[str, str]:
    """PUT (auto and fixed) and GET /jobstatus of the job just submitted, with no history
    and with `held` finished jobs, all of them in memory; the two services answer in
    alternate rounds."""
    full = work / "full.sqlite3"
    started = time.perf_counter()
    fill(full, held, GPUS)
    filled = time.perf_counter() - started
    samples = {side: {"auto": [], "fixed": [], "get": [], "old": []}
               for side in ("empty", "full")}
    memory = {"CYLINDRIA_MEMORY_JOBS": str(held * 2)}
    async with (stack(work / "empty", GPUS, work / "empty.sqlite3", **memory) as empty,
                stack(work / "full", GPUS, full, **memory) as loaded,
                aiohttp.ClientSession() as session):
        sides = {"empty": empty, "full": loaded}
        for n in range(rounds):
            for side, running in sides.items():
                got = samples[side]
                for k in range(20):
                    tag = f"{n}-{k}"
                    got["auto"].append(await timed_put(session, running.url, f"a-{tag}",
                                                       "auto", 7_000_000 + n * 100 + k))
                    got["fixed"].append(await timed_put(session, running.url, f"f-{tag}",
                                                        str(k % GPUS), 8_000_000 + n * 100 + k))
                    got["get"].append(await timed_get(session,
                                                      f"{running.url}/jobstatus/a-{tag}/"))
                    if side == "full":
                        old = f"{running.url}/jobstatus/old-{random.randrange(held)}/"
                        got["old"].append(await timed_get(session, old))
        rss = {side: running.serve.rss_mib() for side, running in sides.items()}
    e, f = samples["empty"], samples["full"]
    return {
        f"history: {held:,} finished jobs written to a state file (s)": f"{filled:.1f}",
        "history: PUT ?GpuId=auto p50, empty / full (ms)": side_by_side(p50, e, f, "auto"),
        "history: PUT ?GpuId=n p50, empty / full (ms)": side_by_side(p50, e, f, "fixed"),
        "history: GET /jobstatus of a new job p99, empty / full (ms)":
            side_by_side(p99, e, f, "get"),
        "history: GET /jobstatus of a random held job, p50 / p99 (ms)":
            f"{p50(f['old']):.2f} / {p99(f['old']):.2f}",
        "history: service RSS, empty / full (MiB)": f"{rss['empty']:.0f} / {rss['full']:.0f}",
    }


def side_by_side(stat, empty: dict[str, list[float]], full: dict[str, list[float]],
                 what: str) -> str:
    a, b = stat(empty[what]), stat(full[what])
    return f"{a:.2f} / {b:.2f}  ratio {b / a:.2f}"


async def status_speed(work: Path, seconds: float) -> dict[str, str]:
    """GET /jobstatus at 32 connections against a bare aiohttp+ujson handler returning a
    record of the same size, alternating, best of two each; and the CPU each server
    spent per answer in those runs, which wrk and the other processes on the machine
    sway less than requests per second."""
    async with stack(work / "status", 1, work / "status.sqlite3") as running, \
            aiohttp.ClientSession() as session:
        await timed_put(session, running.url, "probe", "0", 1)
        for _ in range(200):
            async with session.get(f"{running.url}/jobstatus/probe/") as resp:
                body = await resp.text()
            if '"state":"completed"' in body:
                break
            await asyncio.sleep(0.02)
        async with bare_server(work, body) as (bare, bare_proc):
            ours, theirs = [], []
            for _ in range(2):
                theirs.append(cpu_wrk(bare_proc, f"{bare}/jobstatus/probe/", seconds))
                ours.append(cpu_wrk(running.serve, f"{running.url}/jobstatus/probe/",
                                    seconds))
    if ours[0] is None:
        return {"GET /jobstatus requests/s at 32 connections": "skipped: wrk not installed"}
    best = max(ours, key=lambda r: r[0])
    bare_best = max(theirs, key=lambda r: r[0])
    cpu = min(r[2] for r in ours)
    bare_cpu = min(r[2] for r in theirs)
    return {
        f"GET /jobstatus at 32 connections ({len(body)} B body): requests/s":
            f"{best[0]:.0f} (bare aiohttp+ujson handler {bare_best[0]:.0f}, ratio "
            f"{best[0] / bare_best[0]:.2f})",
        "GET /jobstatus at 32 connections: p99 (ms)": f"{best[1]:.2f}",
        "GET /jobstatus at 32 connections: server CPU per answer (us)":
            f"{cpu:.0f} (bare handler {bare_cpu:.0f}, ratio {bare_cpu / cpu:.2f})",
    }


def cpu_wrk(proc: Process, url: str, seconds: float) -> tuple[float, float, float] | None:
    """wrk at 32 connections: (requests/s, p99 ms, server CPU microseconds per answer)."""
    before = proc.cpu_seconds()
    result = wrk(url, 32, seconds)
    if result is None:
        return None
    spent = proc.cpu_seconds() - before
    return result[0], result[1], spent / (result[0] * seconds) * 1e6


async def submit_overhead(work: Path, count: int, **env: str) -> dict[str, str]:
    """PUT /startjob through Cylindria against POST /prompt straight to the same
    simulated GPU and against a minimal aiohttp forwarder to it (the cost of one more
    hop and nothing else), one at a time, in turn."""
    direct, bare, proxied = [], [], []
    async with stack(work / "overhead", 1, work / "overhead.sqlite3", **env) as running, \
            bare_proxy(work, running.gpu_url(0)) as (forwarder, _), \
            aiohttp.ClientSession() as session:
        for n in range(count):
            body = {"prompt": quick(2_000_000 + n), "client_id": "bench",
                    "prompt_id": str(uuid.uuid4())}
            started = time.perf_counter()
            async with session.post(f"{running.gpu_url(0)}/prompt", json=body) as resp:
                await resp.read()
                assert resp.status == 200
            direct.append(time.perf_counter() - started)
            bare.append(await timed_put(session, forwarder, f"b-{n}", "0", 5_000_000 + n))
            proxied.append(await timed_put(session, running.url, f"o-{n}", "0",
                                           3_000_000 + n))
    warm = count // 5
    d, b, p = p50(direct[warm:]), p50(bare[warm:]), p50(proxied[warm:])
    return {"PUT /startjob p50 vs POST /prompt straight to the GPU (ms)":
            f"{p:.2f} vs {d:.2f}: +{p - d:.2f} ms, journal on",
            "the same PUT through a minimal aiohttp forwarder (ms)":
            f"{b:.2f}: +{b - d:.2f} ms for the hop alone; Cylindria +{p - b:.2f} ms "
            "over it"}


async def throughput(work: Path, jobs: int, concurrency: int, seconds: float,
                     **env: str) -> dict[str, str]:
    """Jobs submitted with GpuId=auto and run to completion on 8 simulated GPUs. wrk
    submits, when it is installed, so that the client takes little of the CPU the
    service and the simulator share; otherwise an aiohttp client sends `jobs` jobs."""
    template = ujson.dumps(quick(0)).replace('"color":0', '"color":%d')
    async with stack(work / "throughput", GPUS, work / "throughput.sqlite3",
                     **env) as running, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        cpu_before = (running.sim.cpu_seconds(), running.serve.cpu_seconds())
        started = time.perf_counter()
        sent = await asyncio.to_thread(wrk_submit, running.url, template, 4_000_000,
                                       concurrency, seconds, work)
        if sent is None:
            slots = asyncio.Semaphore(concurrency)

            async def one(n: int) -> None:
                async with slots:
                    await timed_put(session, running.url, f"t-{n}", "auto", 4_000_000 + n)

            await asyncio.gather(*(one(n) for n in range(jobs)))
            submitted, client = jobs, "aiohttp client"
        else:
            submitted, client = sent[0] - sent[1], "wrk"
        while True:
            async with session.get(f"{running.url}/jobs/", params={"state": "queued,running",
                                                                   "limit": "1"}) as resp:
                if not (await resp.json())["jobs"]:
                    break
            await asyncio.sleep(0.1)
        elapsed = time.perf_counter() - started
        sim_cpu = running.sim.cpu_seconds() - cpu_before[0]
        serve_cpu = running.serve.cpu_seconds() - cpu_before[1]
        completed = await count_jobs(session, running.url, "completed")
        others = await count_jobs(session, running.url, "failed,cancelled,rejected")
    # wrk stops counting at the deadline; the PUTs it had sent still go through.
    assert completed >= submitted and others == 0, (completed, submitted, others)
    return {
        f"end to end: {completed:,} jobs, {GPUS} GPUs, auto, journal on, sent by {client} "
        "(jobs/s)": f"{completed / elapsed:.0f}",
        "end to end: CPU per job, service / simulator (ms)":
            f"{serve_cpu * 1000 / completed:.2f} / {sim_cpu * 1000 / completed:.2f} "
            "(2 cores shared by both and the client)",
    }


async def count_jobs(session: aiohttp.ClientSession, url: str, state: str) -> int:
    count, before = 0, None
    while True:
        params = {"state": state, "limit": "500"}
        if before is not None:
            params["before"] = str(before)
        async with session.get(f"{url}/jobs/", params=params) as resp:
            page = await resp.json()
        count += len(page["jobs"])
        before = page["next_before"]
        if before is None:
            return count


async def stalls(work: Path, mib: int) -> dict[str, str]:
    """The longest wait of GET /healthz, asked every 5 ms by a probe process of its own,
    while a large workflow is submitted, and while a job with a large text output runs
    and completes (its output comes over the websocket and from /history)."""
    # Just under the 32 MiB a body may have.
    size = (mib << 20) - 4096
    big_workflow = {"prompt": quick(5_000_000),
                    "extra_data": {"extra_pnginfo": {"note": "x" * size}}}
    text_job = {"1": {"class_type": "PreviewAny", "inputs": {"source": "t" * size}}}
    rows = {}
    async with stack(work / "stalls", 1, work / "stalls.sqlite3") as running, \
            aiohttp.ClientSession() as session:
        for label, job_id, workflow, until in (
                (f"a {mib} MiB workflow is submitted", "big-in", big_workflow, "accepted"),
                (f"a job with a {mib} MiB text output completes", "big-out", text_job,
                 "completed")):
            body = ujson.dumps(workflow).encode()
            probe = await asyncio.create_subprocess_exec(
                PYTHON, str(Path(__file__).with_name("lagprobe.py")), f"{running.url}/healthz",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            await asyncio.sleep(0.3)  # the probe is up and asking
            async with session.put(f"{running.url}/startjob/{job_id}/", data=io.BytesIO(body),
                                   headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 202, await resp.text()
            deadline = time.monotonic() + 60
            while until == "completed" and time.monotonic() < deadline:
                async with session.get(f"{running.url}/jobstatus/{job_id}/") as resp:
                    if (await resp.json())["state"] == "completed":
                        break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # and whatever follows: journal, events
            out, _ = await probe.communicate(b"")
            longest, median, count = out.split()
            rows[f"longest /healthz wait while {label} (ms; median, answers)"] = \
                f"{float(longest):.0f} ({float(median):.1f}, {int(count)})"
    return rows


async def million(work: Path, count: int) -> dict[str, str]:
    """Start-up with `count` finished jobs in the state file: time to the first answered
    /jobstatus, memory, and an old job answered from disk."""
    state = work / "million.sqlite3"
    started = time.perf_counter()
    fill(state, count, GPUS)
    filled = time.perf_counter() - started
    size = files_size(work, "million.sqlite3*") / 2**20
    async with stack(work / "million", GPUS, state) as running, \
            aiohttp.ClientSession() as session:
        first = await until_up(session, f"{running.url}/jobstatus/old-{count - 1}/",
                               running.serve)
        old = [await timed_get(session, f"{running.url}/jobstatus/old-{n}/")
               for n in random.sample(range(count // 2), 200)]
        rss = running.serve.rss_mib()
    return {
        f"{count:,} finished jobs: state file written in (s)": f"{filled:.1f}",
        f"{count:,} finished jobs: state file size (MiB)": f"{size:.0f}",
        f"{count:,} finished jobs: start-up to the first answered /jobstatus (s)":
            f"{first:.2f}",
        f"{count:,} finished jobs: service RSS (MiB)": f"{rss:.0f}",
        f"{count:,} finished jobs: /jobstatus of a job only on disk, p50 / p99 (ms)":
            f"{p50(old):.2f} / {p99(old):.2f}",
    }


# The rows that --database-url runs a second time, with the jobs in PostgreSQL.
ON_POSTGRES = ("overhead", "throughput")


@contextlib.asynccontextmanager
async def scratch_database(server_url: str) -> AsyncIterator[str]:
    """A new database on the server of `server_url`, dropped afterwards; its URL."""
    import psycopg

    name = f"cylindria_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--held", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--million", type=int, default=1_000_000)
    parser.add_argument("--wrk-seconds", type=float, default=5.0)
    parser.add_argument("--submit-seconds", type=float, default=10.0)
    parser.add_argument("--only", choices=("flatness", "status", "overhead", "throughput",
                                           "stalls", "million"), default=None)
    parser.add_argument("--database-url", default=None, metavar="URL",
                        help="a PostgreSQL server whose role may create databases: the "
                             "overhead and throughput rows run again with the jobs there, "
                             "each in a database of its own, dropped afterwards")
    args = parser.parse_args()
    runs = {
        "flatness": lambda work: flatness(work, args.held, args.rounds),
        "status": lambda work: status_speed(work, args.wrk_seconds),
        "overhead": lambda work, **env: submit_overhead(work, 500, **env),
        "throughput": lambda work, **env: throughput(work, args.jobs, 64,
                                                     args.submit_seconds, **env),
        "stalls": lambda work: stalls(work, 32),
        "million": lambda work: million(work, args.million),
    }
    rows: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in runs.items():
            if args.only in (None, name):
                work = Path(tmp) / name
                work.mkdir()
                rows |= await run(work)
                if args.database_url and name in ON_POSTGRES:
                    work = Path(tmp) / f"{name}-postgres"
                    work.mkdir()
                    async with scratch_database(args.database_url) as url:
                        found = await run(work, CYLINDRIA_DATABASE_URL=url)
                    rows |= {f"{row} [PostgreSQL]": value for row, value in found.items()}
    width = max(map(len, rows))
    print(f"cpus: {os.cpu_count()}")
    for name, value in rows.items():
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    asyncio.run(main())
