"""Flat however long the history or ComfyUI's queue: the submission mix after many jobs
went through, and status reads while ComfyUI holds a long queue.

Real processes on loopback: `cylindria simulate` (8 GPUs) and `cylindria serve` with a
state file, started afresh for each row.

- mix: a client sends, in turn, a `GpuId=auto` job, a pinned job, a `/jobstatus` read
  and (for comparison) the same `POST /prompt` straight to a GPU, ROUNDS times, on an
  empty history; then JOBS pinned jobs go through (pushed 64 at a time, every
  simulated queue drained), and the same mix is measured again.
- held: the same mix against a service whose state file holds HELD finished jobs
  (written straight into the file), side by side with one on an empty file.
- queue: JOBS pinned jobs are pushed faster than the GPUs run them (each takes a
  while), so ComfyUI's queues hold them; then `/jobstatus` and pinned `PUT` are timed.

    .venv/bin/python bench/flat.py                    # every row, 100,000 jobs
    .venv/bin/python bench/flat.py --only held --held 1000000
    .venv/bin/python bench/flat.py --only queue --jobs 20000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import procs
from history import fill
from support import quick, txt2img

GPUS = 8
ROUNDS = 150
PUSH = 64


def ms(values: list[float], share: float) -> float:
    return procs.percentile(values, share) * 1000


async def timed(request: Any) -> float:
    started = time.perf_counter()
    async with request as resp:
        await resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"{resp.method} {resp.url}: {resp.status} {await resp.text()}")
    return time.perf_counter() - started


async def push(session: aiohttp.ClientSession, url: str, count: int, prefix: str,
               workflow: Any) -> float:
    """PUT `count` pinned jobs, PUSH at a time; returns the seconds it took."""
    started = time.perf_counter()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(count):
        queue.put_nowait(n)

    async def worker() -> None:
        while not queue.empty():
            n = queue.get_nowait()
            await timed(session.put(f"{url}/startjob/{prefix}-{n}/",
                                    params={"GpuId": str(n % GPUS)}, json=workflow(n)))

    await asyncio.gather(*(worker() for _ in range(PUSH)))
    return time.perf_counter() - started


async def drained(session: aiohttp.ClientSession, url: str, timeout: float) -> None:
    if not await procs.until_drained(session, url, timeout, every=0.5):
        raise RuntimeError("the jobs did not drain")


async def mix(session: aiohttp.ClientSession, running: procs.Stack, tag: str,
              rounds: int = ROUNDS) -> dict[str, list[float]]:
    url = running.url
    got: dict[str, list[float]] = {"auto": [], "pinned": [], "status": [], "direct": []}
    for n in range(rounds):
        color = hash((tag, n)) & 0xFFFFFF
        got["auto"].append(await timed(session.put(
            f"{url}/startjob/{tag}-a{n}/", params={"GpuId": "auto"}, json=quick(color))))
        got["pinned"].append(await timed(session.put(
            f"{url}/startjob/{tag}-p{n}/", params={"GpuId": "1"}, json=quick(color + 1))))
        got["status"].append(await timed(session.get(f"{url}/jobstatus/{tag}-p{n}/")))
        body = {"prompt": quick(color + 2), "prompt_id": str(uuid.uuid4())}
        got["direct"].append(await timed(session.post(f"{running.gpu_url(1)}/prompt",
                                                      json=body)))
    return got


async def mix_row(work: Path, jobs: int) -> list[str]:
    async with procs.stack(work, GPUS, work / "state.sqlite3") as running, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        empty = await mix(session, running, "empty")
        await drained(session, running.url, 60)
        took = await push(session, running.url, jobs, "h", lambda n: quick(n))
        await drained(session, running.url, 300)
        full = await mix(session, running, "full")
        rss = running.serve.rss_mib()
    rows = [f"pushed {jobs:,} pinned jobs in {took:.0f} s; service RSS {rss:.0f} MiB"]
    for what in ("auto", "pinned", "status", "direct"):
        a, b = ms(empty[what], 0.5), ms(full[what], 0.5)
        rows.append(f"| mix {what} p50 | {a:.2f} ms | {b:.2f} ms | {b / a:.2f} | "
                    f"p99 {ms(empty[what], 0.99):.2f} -> {ms(full[what], 0.99):.2f} ms |")
    return rows


async def held_row(work: Path, held: int) -> list[str]:
    full = work / "full.sqlite3"
    started = time.perf_counter()
    await asyncio.to_thread(lambda: (work.mkdir(parents=True, exist_ok=True),
                                     fill(full, held, GPUS)))
    filled = time.perf_counter() - started
    async with procs.stack(work / "empty", GPUS, work / "empty.sqlite3") as empty, \
            procs.stack(work / "full", GPUS, full) as loaded, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        # Alternate rounds, so a noisy machine weighs on both alike.
        sides: dict[str, dict[str, list[float]]] = {"empty": {}, "full": {}}
        for n in range(5):
            for side, running in (("empty", empty), ("full", loaded)):
                got = await mix(session, running, f"{side}{n}", rounds=ROUNDS // 5)
                for what, values in got.items():
                    sides[side].setdefault(what, []).extend(values)
        rss = {"empty": empty.serve.rss_mib(), "full": loaded.serve.rss_mib()}
    rows = [f"{held:,} finished jobs written in {filled:.0f} s; service RSS "
            f"{rss['empty']:.0f} / {rss['full']:.0f} MiB"]
    for what in ("auto", "pinned", "status", "direct"):
        a, b = ms(sides["empty"][what], 0.5), ms(sides["full"][what], 0.5)
        rows.append(f"| held {what} p50 | {a:.2f} ms | {b:.2f} ms | {b / a:.2f} | p99 "
                    f"{ms(sides['empty'][what], 0.99):.2f} -> "
                    f"{ms(sides['full'][what], 0.99):.2f} ms |")
    return rows


async def queue_row(work: Path, jobs: int) -> list[str]:
    # Each job takes 100 s on a simulated GPU: ComfyUI's queues keep nearly all of them.
    async with procs.stack(work, GPUS, work / "state.sqlite3",
                           ("--step-seconds", "50")) as running, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        url = running.url
        empty_status = [await timed(session.get(f"{url}/healthz")) for _ in range(50)]
        took = await push(session, url, jobs, "q", lambda n: txt2img(n, 2))
        print(f"pushed {jobs} in {took:.0f} s; measuring", file=sys.stderr, flush=True)
        status, puts = [], []
        for n in range(ROUNDS):
            status.append(await timed(session.get(f"{url}/jobstatus/q-{n * 7 % jobs}/")))
            puts.append(await timed(session.put(
                f"{url}/startjob/late-{n}/", params={"GpuId": str(n % GPUS)},
                json=txt2img(10_000_000 + n, 2))))
            await asyncio.sleep(0.02)
        async with session.get(f"{url}/metrics") as resp:
            lag = [line for line in (await resp.text()).splitlines()
                   if line.startswith("cylindria_event_loop_lag_seconds_bucket")]
        rss = running.serve.rss_mib()
    return [f"pushed {jobs:,} pinned jobs in {took:.0f} s (they wait in ComfyUI's queues); "
            f"service RSS {rss:.0f} MiB; /healthz before: p50 {ms(empty_status, 0.5):.2f} ms",
            f"| queue /jobstatus | p50 {ms(status, 0.5):.2f} ms | p99 {ms(status, 0.99):.2f} ms "
            f"| max {max(status) * 1000:.2f} ms |",
            f"| queue pinned PUT | p50 {ms(puts, 0.5):.2f} ms | p99 {ms(puts, 0.99):.2f} ms "
            f"| max {max(puts) * 1000:.2f} ms |",
            "loop lag: " + ", ".join(line.split("{")[1] for line in lag[-4:])]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--held", type=int, default=1_000_000)
    parser.add_argument("--only", choices=("mix", "held", "queue"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cylindria-bench-flat-") as tmp:
        if args.only in (None, "mix"):
            for line in await mix_row(Path(tmp) / "mix", args.jobs):
                print(line, flush=True)
        if args.only in (None, "held"):
            for line in await held_row(Path(tmp) / "held", args.held):
                print(line, flush=True)
        if args.only in (None, "queue"):
            for line in await queue_row(Path(tmp) / "queue", args.jobs):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
