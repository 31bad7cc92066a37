"""What keeping input files in PostgreSQL costs an upload: the median latency of
`POST /inputs/` for new files and for files stored already, with the state file, then
with `--database-url` (where every file is written to the database before its 201).

Real processes on loopback: `cylindria simulate` (1 GPU) and `cylindria serve`, one
upload at a time. The PostgreSQL row runs on a database of its own, made and dropped
here, so the role must be allowed to create databases.

    .venv/bin/python bench/input_uploads.py
    .venv/bin/python bench/input_uploads.py --database-url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import procs
from inputs import database_of_its_own

SIZES = (("64 KiB", 64 << 10), ("8 MiB", 8 << 20))


async def medians(work: Path, database_url: str | None, files: int) -> dict[str, float]:
    found: dict[str, float] = {}
    with database_of_its_own(database_url, "uploads") as database:
        async with procs.stack(work, 1, work / "state.sqlite3", CYLINDRIA_INPUT_MAX="20M",
                               **database) as running, aiohttp.ClientSession() as session:
            for label, size in SIZES:
                sent = [os.urandom(size) for _ in range(files)]
                for kind in ("new", "stored"):
                    seconds = []
                    for n, data in enumerate(sent):
                        started = time.perf_counter()
                        async with session.post(f"{running.url}/inputs/",
                                                params={"name": f"f{n}.png"}, data=data,
                                                headers={"Content-Type": "image/png"}) as resp:
                            if resp.status not in (200, 201):
                                raise RuntimeError(f"{resp.status} {await resp.text()}")
                        seconds.append(time.perf_counter() - started)
                    found[f"{label} {kind}"] = statistics.median(seconds)
    return found


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10, help="files of each size")
    parser.add_argument("--database-url", default=None,
                        help="also with PostgreSQL (a role that may create databases)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cylindria-bench-uploads-") as work:
        for url in (None, args.database_url) if args.database_url else (None,):
            run = Path(tempfile.mkdtemp(dir=work))
            rows.append(("PostgreSQL" if url else "state file", await medians(run, url,
                                                                              args.files)))
    keys = list(rows[0][1])
    print("| kept in | " + " | ".join(f"{k} (p50)" for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, found in rows:
        print(f"| {name} | " + " | ".join(f"{found[k] * 1000:.1f} ms" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
