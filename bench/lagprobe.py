"""Asks GET <url> every 5 ms until its standard input closes, then prints the longest
wait and the median in milliseconds, and how many answers it got.

A process of its own, so that what the benchmark itself does (sending 32 MiB, reading
answers) never delays the probe: only the service's own stalls count.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time

import aiohttp


async def probe(url: str) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=wait_for_eof, daemon=True).start()
    waits: list[float] = []
    async with aiohttp.ClientSession() as session:
        while not done.is_set():
            started = time.perf_counter()
            async with session.get(url) as resp:
                await resp.read()
            waits.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)
    print(f"{max(waits) * 1000:.1f} {statistics.median(waits) * 1000:.2f} {len(waits)}")


if __name__ == "__main__":
    asyncio.run(probe(sys.argv[1]))
