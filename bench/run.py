"""Benchmarks: Cylindria in front of simulated GPUs on loopback; prints one table.

Run with `make bench` (or `.venv/bin/python bench/run.py`). Ratios are measured in one
run so that a noisy machine affects both sides alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from support import quick, stack


async def bench_jobs(out: Path, jobs: int) -> dict[str, str]:
    async with stack(2, out) as (url, _, _, _), aiohttp.ClientSession() as session:
        started = time.perf_counter()
        put_latency = []

        async def submit(n: int) -> None:
            t0 = time.perf_counter()
            async with session.put(f"{url}/startjob/b-{n}/", params={"GpuId": "auto"},
                                   json=quick(10_000 + n)) as resp:
                assert resp.status == 202, await resp.text()
            put_latency.append(time.perf_counter() - t0)

        for batch in range(0, jobs, 50):
            await asyncio.gather(*(submit(n) for n in range(batch, min(jobs, batch + 50))))
        status_latency = []
        pending = set(range(jobs))
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            for n in list(pending):
                t0 = time.perf_counter()
                async with session.get(f"{url}/jobstatus/b-{n}/") as resp:
                    body = await resp.json()
                status_latency.append(time.perf_counter() - t0)
                if body["state"] == "completed":
                    pending.discard(n)
        elapsed = time.perf_counter() - started
        assert not pending, f"{len(pending)} jobs unfinished"
        return {
            "jobs submitted and completed (2 GPUs, auto placement)": str(jobs),
            "jobs per second, end to end": f"{jobs / elapsed:.0f}",
            "PUT /startjob latency p50 / p99 (ms)": _p(put_latency),
            "GET /jobstatus latency p50 / p99 (ms)": _p(status_latency),
        }


async def bench_status_burst(out: Path, calls: int) -> dict[str, str]:
    async with stack(1, out) as (url, _, _, counts), aiohttp.ClientSession() as session:
        before = counts["/system_stats"]
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(session.get(f"{url}/serverstatus")
                                         for _ in range(calls)))
        elapsed = time.perf_counter() - t0
        for resp in answers:
            resp.release()
        return {
            f"GET /serverstatus x{calls} at once: wall time (ms)": f"{elapsed * 1000:.0f}",
            f"  upstream /system_stats calls for those {calls}": str(
                counts["/system_stats"] - before),
        }


async def bench_stream(out: Path, size_mib: int) -> dict[str, str]:
    async with stack(1, out) as (url, sims, sim_port, _), aiohttp.ClientSession() as session:
        async with session.put(f"{url}/startjob/big/", json=quick(1)) as resp:
            assert resp.status == 202
        for _ in range(200):
            async with session.get(f"{url}/jobstatus/big/") as resp:
                body = await resp.json()
            if body["state"] == "completed":
                break
            await asyncio.sleep(0.02)
        entry = body["outputs"][0]
        path = sims[0].output_dir / entry["subfolder"] / entry["filename"]
        os.truncate(path, size_mib * 1024 * 1024)
        direct = (f"http://127.0.0.1:{sim_port}/view?filename={entry['filename']}"
                  f"&subfolder={entry['subfolder']}&type=output")

        async def fetch(target: str) -> float:
            t0 = time.perf_counter()
            total = 0
            async with session.get(target) as resp:
                async for chunk in resp.content.iter_chunked(1 << 20):
                    total += len(chunk)
            assert total == size_mib * 1024 * 1024
            return time.perf_counter() - t0

        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Alternate and keep the best of three each, so warm-up favours neither side.
        t_direct, t_proxy = float("inf"), float("inf")
        for _ in range(3):
            t_direct = min(t_direct, await fetch(direct))
            t_proxy = min(t_proxy, await fetch(f"{url}{entry['url']}"))
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        os.truncate(path, 0)
        return {
            f"{size_mib} MiB straight from ComfyUI /view (MiB/s)": f"{size_mib / t_direct:.0f}",
            f"{size_mib} MiB through /joboutput (MiB/s)": f"{size_mib / t_proxy:.0f}",
            "through Cylindria / direct, time ratio": f"{t_proxy / t_direct:.2f}",
            "peak RSS growth while streaming (MiB)": f"{(rss_after - rss_before) / 1024:.1f}",
        }


async def bench_sse(out: Path, clients: int, jobs: int) -> dict[str, str]:
    async with stack(2, out) as (url, _, _, _), aiohttp.ClientSession() as session:
        streams = [await session.get(f"{url}/events/") for _ in range(clients)]

        async def drain(resp: aiohttp.ClientResponse) -> int:
            done = 0
            while done < jobs:
                line = await resp.content.readline()
                if line.startswith(b"data: ") and b'"state":"completed"' in line:
                    done += 1
            return done

        readers = [asyncio.create_task(drain(s)) for s in streams]
        t0 = time.perf_counter()
        await asyncio.gather(*(session.put(f"{url}/startjob/s-{n}/",
                                           params={"GpuId": "auto"}, json=quick(50_000 + n))
                               for n in range(jobs)))
        async with asyncio.timeout(60):
            counts = await asyncio.gather(*readers)
        elapsed = time.perf_counter() - t0
        for s in streams:
            s.close()
        assert all(c == jobs for c in counts)
        return {f"SSE: {clients} clients each saw {jobs} jobs complete (s)": f"{elapsed:.2f}"}


def _p(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{statistics.median(ordered) * 1000:.1f} / {p99 * 1000:.1f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--stream-mib", type=int, default=512)
    args = parser.parse_args()
    rows: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rows |= await bench_jobs(out / "jobs", args.jobs)
        rows |= await bench_status_burst(out / "status", 100)
        rows |= await bench_stream(out / "stream", args.stream_mib)
        rows |= await bench_sse(out / "sse", 20, 100)
    width = max(map(len, rows))
    for name, value in rows.items():
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    asyncio.run(main())
