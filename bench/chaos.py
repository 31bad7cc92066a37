"""Chaos: thousands of jobs through real processes while everything that can go wrong
does, then every job's final state checked against what the simulated GPUs really ran.

Run with `make chaos` (or `.venv/bin/python bench/chaos.py --jobs 10000`). All on
loopback: the simulated GPUs are one process, `cylindria serve` with its state file
another, and this client a third. While the client submits (GpuId=auto; a share of the
workflows fail at run time, a share are invalid):
- each GPU's websocket is dropped about every 5 s;
- the simulated ComfyUIs restart (losing their queues) `--comfy-restarts` times;
- `cylindria serve` is killed with SIGKILL `--kills` times and started again on the
  same state file;
- `/prompt` or `/queue` of a GPU hangs for a few seconds now and then.
Then it waits until nothing is in flight and compares Cylindria's answers with each
simulated GPU's ledger (every prompt it began to run, kept across its restarts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import ujson
from procs import PYTHON, Process, until_up
from support import quick, txt2img

from cylindria.addresses import free_port_run

GPUS = 8
# Seconds per sampler step on the simulated GPUs: jobs take a moment, so a restart
# always catches some running.
STEP = 0.005
FINISHED = re.compile(r'^cylindria_jobs\{state="(completed|failed|cancelled|rejected)"\} '
                      r'([0-9.e+]+)$', re.MULTILINE)
IN_FLIGHT = 32
WAIT_AFTER = 60.0


def finished_jobs(metrics: str) -> int:
    """Jobs in a final state, from a /metrics scrape."""
    return int(sum(float(value) for _, value in FINISHED.findall(metrics)))


def working(n: int) -> dict[str, Any]:
    """A short txt2img (eight sampler steps) that also saves two images at once: the
    GPUs are busy while the line lasts, and a crash falls between the outputs of the
    jobs running then."""
    workflow = txt2img(n, 8)
    workflow["10"] = {"class_type": "EmptyImage", "inputs": {
        "width": 64, "height": 64, "batch_size": 2, "color": n % 0xFFFFFF}}
    workflow["11"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0],
                                                            "filename_prefix": "bench/early"}}
    return workflow


def failing(n: int) -> dict[str, Any]:
    """Passes validation, fails at run time (a file name outside the output folder)."""
    workflow = quick(n)
    workflow["3"]["inputs"]["filename_prefix"] = "../escape"
    return workflow


def invalid(n: int) -> dict[str, Any]:
    """Refused before it runs: by Cylindria (no class_type) or by ComfyUI's validation."""
    if n % 2:
        return {"1": {"inputs": {}}}
    workflow = quick(n)
    workflow["1"]["inputs"]["width"] = 0
    return workflow


def plan(count: int, rng: random.Random) -> list[tuple[str, str, dict[str, Any]]]:
    """(job id, kind, workflow) for every job: 80% fine, 10% failing, 10% invalid."""
    jobs = []
    for n in range(count):
        roll = rng.random()
        kind = "ok" if roll < 0.8 else "failing" if roll < 0.9 else "invalid"
        workflow = {"ok": working, "failing": failing, "invalid": invalid}[kind](n)
        jobs.append((f"chaos-{n}", kind, workflow))
    return jobs


class Service:
    """`cylindria serve` on one state file, killed and started again at will."""

    def __init__(self, work: Path, port: int, sim_port: int, retry_lost: int) -> None:
        self.work, self.port, self.sim_port = work, port, sim_port
        self.retry_lost = retry_lost
        self.url = f"http://127.0.0.1:{port}"
        self.starts = 0
        self.proc: Process | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.starts += 1
        self.proc = Process(
            [PYTHON, "-m", "cylindria", "serve", "--port", str(self.port), "--numberOfGpus",
             str(GPUS), "--comfy-url", f"http://127.0.0.1:{self.sim_port}", "--log-level",
             "warning", "--state-file", str(self.work / "state.sqlite3")],
            self.work / f"serve-{self.starts}.log",
            CYLINDRIA_RETRY_LOST=str(self.retry_lost), CYLINDRIA_POLL_INTERVAL="0.5",
            CYLINDRIA_LOST_GRACE="3")
        await until_up(session, f"{self.url}/healthz", self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.popen.send_signal(signal.SIGKILL)
        self.proc.popen.wait()
        self.proc.log.close()


async def submit_all(session: aiohttp.ClientSession, url: Callable[[], str],
                     jobs: list[tuple[str, str, dict[str, Any]]],
                     outcome: dict[str, int]) -> None:
    """PUT every job (GpuId=auto), IN_FLIGHT at a time, each try to the service `url()`
    names then; a PUT that gets no answer, or a 5xx, is sent again (the same job id:
    never submitted twice)."""
    queue: asyncio.Queue[tuple[str, str, dict[str, Any]]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            job_id, _, workflow = queue.get_nowait()
            body = ujson.dumps(workflow)
            for _ in range(200):
                try:
                    async with session.put(f"{url()}/startjob/{job_id}/",
                                           params={"GpuId": "auto"}, data=body,
                                           timeout=aiohttp.ClientTimeout(total=20)) as resp:
                        await resp.read()
                        if resp.status < 500:
                            outcome[job_id] = resp.status
                            break
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.2)

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))


class Noise:
    """The faults that never stop: each GPU's websocket dropped every 4 to 6 s, and
    `/prompt` or `/queue` of one GPU hung for 2 to 4 s every 5 to 9 s."""

    def __init__(self, session: aiohttp.ClientSession, sim_port: int, gpus: int,
                 rng: random.Random, did: Counter[str]) -> None:
        self.session, self.sim_port, self.gpus = session, sim_port, gpus
        self.rng, self.did = rng, did
        self.next_drop = {gpu: time.monotonic() + rng.uniform(0, 1) for gpu in range(gpus)}
        self.next_hang = time.monotonic() + 1

    async def sim(self, gpu: int, action: str, body: dict[str, Any] | None = None) -> None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self.session.post(
                    f"http://127.0.0.1:{self.sim_port + gpu}/_sim/{action}", json=body or {},
                    timeout=aiohttp.ClientTimeout(total=10)) as resp:
                await resp.read()

    async def restart_all(self) -> None:
        await asyncio.gather(*(self.sim(gpu, "restart") for gpu in range(self.gpus)))

    async def tick(self) -> None:
        """Make the drops and hangs that are due."""
        now = time.monotonic()
        for gpu, due in self.next_drop.items():
            if now >= due:
                await self.sim(gpu, "drop_sockets")
                self.did["websocket drops"] += 1
                self.next_drop[gpu] = now + self.rng.uniform(4, 6)
        if now >= self.next_hang:
            gpu, path = self.rng.randrange(self.gpus), self.rng.choice(["/prompt", "/queue"])
            await self.sim(gpu, "hang", {"count": 3, "path": path})
            self.did[f"{path} hangs"] += 1
            asyncio.get_running_loop().call_later(
                self.rng.uniform(2, 4),
                lambda g=gpu: asyncio.ensure_future(self.sim(g, "release")))
            self.next_hang = now + self.rng.uniform(5, 9)

    async def release_all(self) -> None:
        for gpu in range(self.gpus):
            await self.sim(gpu, "release")


async def chaos(session: aiohttp.ClientSession, service: Service, sim_port: int,
                jobs: int, comfy_restarts: int, kills: int, done: asyncio.Event,
                progress: dict[str, int], rng: random.Random) -> Counter[str]:
    """The faults, spread over the submission; returns what was done."""
    did: Counter[str] = Counter()
    # The restarts and kills alternate, evenly spread over the work (two restarts and
    # one kill: when 1/4, 2/4 and 3/4 of the jobs are finished), never together.
    order: list[str] = []
    for n in range(max(comfy_restarts, kills)):
        order += ["restart"] * (n < comfy_restarts) + ["kill"] * (n < kills)
    noise = Noise(session, sim_port, GPUS, rng, did)

    async def make(kind: str) -> None:
        if kind == "restart":
            await noise.restart_all()
            did["ComfyUI restarts (all GPUs)"] += 1
        else:
            service.kill()
            did["Cylindria SIGKILLs"] += 1
            await asyncio.sleep(0.5)
            await service.start(session)

    await spread(order, jobs, done, progress, noise, make)
    return did


async def spread(order: list[str], jobs: int, done: asyncio.Event,
                 progress: dict[str, int], noise: Noise,
                 make: Callable[[str], Awaitable[None]]) -> None:
    """Make the faults of `order` (by `make`), evenly spread over the jobs finished,
    with the noise all along; until every job is submitted and every fault was made (or
    the work stopped moving: what is left is then judged as it stands)."""
    faults_at = [(jobs * (n + 1) // (len(order) + 1), kind) for n, kind in enumerate(order)]
    give_up = None
    while not done.is_set() or faults_at:
        now = time.monotonic()
        if done.is_set():
            give_up = give_up or now + WAIT_AFTER
            if now > give_up:
                noise.did["faults not made (the work stopped)"] += len(faults_at)
                break
        await noise.tick()
        if faults_at and progress["finished"] >= faults_at[0][0]:
            await make(faults_at.pop(0)[1])
        await asyncio.sleep(0.1)
    await noise.release_all()


async def all_jobs(session: aiohttp.ClientSession, url: str,
                   state: str | None = None) -> list[dict[str, Any]]:
    found, before = [], None
    while True:
        params = {"limit": "500"}
        if state:
            params["state"] = state
        if before is not None:
            params["before"] = str(before)
        async with session.get(f"{url}/jobs/", params=params) as resp:
            page = await resp.json()
        found += page["jobs"]
        before = page["next_before"]
        if before is None:
            return found


def _moment(text: str | None) -> float:
    return datetime.fromisoformat(text).timestamp() if text else float("inf")


def lost_truthfully(attempt: dict[str, Any], ran: dict[str, Any]) -> str | None:
    """How a lost attempt squares with what its GPU did: None when it is untrue (the
    GPU began or finished the prompt after Cylindria gave it up), else what happened."""
    if not ran:
        return "never ran (dropped from ComfyUI's queue)"
    declared = _moment(attempt.get("finished_at"))
    if ran["began"] > declared or (ran["ended"] or 0) > declared:
        return None
    if ran["ended"] is None:
        return "cut short by the restart"
    # Finished, then ComfyUI's restart wiped its history before Cylindria read it: the
    # job may only say its end is unknown when Cylindria had seen it start.
    message = (attempt.get("error") or {}).get("message", "")
    if "started running" in message and "unknown" not in message:
        return None
    return "finished before the restart wiped it (said: outcome unknown)"


def judge(jobs: list[dict[str, Any]], kinds: dict[str, str],
          ledger: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Cylindria's final word on each job, and on every attempt it gave up as lost,
    against what the GPUs ran."""
    counts: Counter[str] = Counter()
    wrong: list[str] = []
    twice: list[str] = []
    outputs_differ: list[str] = []
    known_prompts: set[str] = set()
    for job in jobs:
        state = job["state"]
        counts[state] += 1
        attempts = job.get("attempts") or [job]
        prompts = [a["prompt_id"] for a in attempts if a.get("prompt_id")]
        known_prompts.update(prompts)
        runs = sum(ledger.get(p, {}).get("runs", 0) for p in prompts)
        if runs > len(attempts) or any(ledger.get(p, {}).get("runs", 0) > 1 for p in prompts):
            twice.append(job["job_id"])
        ok = True
        for attempt in attempts:
            if (attempt.get("error") or {}).get("type") != "lost":
                continue
            story = lost_truthfully(attempt, ledger.get(attempt.get("prompt_id") or "", {}))
            counts[f"lost attempts: {story or 'UNTRUE'}"] += 1
            ok = ok and story is not None
        if len(attempts) > 1:
            counts["jobs retried after a loss"] += 1
        error = job.get("error") or {}
        if state == "failed":
            cause = "lost" if error.get("type") == "lost" else kinds[job["job_id"]]
            counts[f"failed: {cause}"] += 1
        last = ledger.get(job.get("prompt_id") or "", {})
        expected = {"success": "completed", "error": "failed",
                    "interrupted": "cancelled"}.get(last.get("outcome") or "")
        if state == "completed" and "files" in last:
            told = sorted(o["filename"] for o in job.get("outputs") or [] if "filename" in o)
            if told != last["files"]:
                outputs_differ.append(job["job_id"])
        if state in ("completed", "cancelled") or (state == "failed"
                                                   and error.get("type") != "lost"):
            ok = ok and expected == state
        elif state == "rejected":
            ok = ok and not last
        elif state != "failed":
            ok = False  # still in flight: counted as stuck, not wrong
        if not ok and state in ("completed", "failed", "cancelled", "rejected"):
            wrong.append(job["job_id"])
    unknown_runs = sum(1 for p in ledger if p not in known_prompts)
    return {"counts": counts, "wrong": wrong, "twice": twice, "unknown_runs": unknown_runs,
            "outputs_differ": outputs_differ}


async def run(count: int, retry_lost: int, comfy_restarts: int, kills: int,
              seed: int, work: Path) -> dict[str, Any]:
    rng = random.Random(seed)
    jobs = plan(count, rng)
    kinds = {job_id: kind for job_id, kind, _ in jobs}
    sim_port, port = free_port_run(GPUS), free_port_run(1)
    sim = Process([PYTHON, "-m", "cylindria", "simulate", "--gpus", str(GPUS), "--base-port",
                   str(sim_port), "--step-seconds", str(STEP), "--output-dir", str(work / "out"),
                   "--log-level", "warning"], work / "sim.log")
    service = Service(work, port, sim_port, retry_lost)
    started = time.perf_counter()
    try:
        async with aiohttp.ClientSession() as session:
            for gpu in range(GPUS):
                await until_up(session, f"http://127.0.0.1:{sim_port + gpu}/system_stats", sim)
            await service.start(session)
            outcome: dict[str, int] = {}
            progress = {"finished": 0}
            done = asyncio.Event()

            async def count_finished() -> None:
                # Faults are spread over the work done, read from the service's metrics
                # (the submissions themselves are over in a moment: auto jobs wait in
                # Cylindria's queue).
                while True:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                        async with session.get(f"{service.url}/metrics",
                                               timeout=aiohttp.ClientTimeout(total=5)) as r:
                            progress["finished"] = finished_jobs(await r.text())
                    await asyncio.sleep(0.1)

            counter = asyncio.create_task(count_finished())
            faults = asyncio.create_task(chaos(session, service, sim_port, count,
                                               comfy_restarts, kills, done, progress, rng))
            await submit_all(session, lambda: service.url, jobs, outcome)
            done.set()
            did = await faults
            counter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await counter
            submitted = time.perf_counter() - started
            deadline = time.monotonic() + WAIT_AFTER
            while time.monotonic() < deadline:
                if not await all_jobs(session, service.url, "queued,running"):
                    break
                await asyncio.sleep(1)
            settled = time.perf_counter() - started
            final = await all_jobs(session, service.url)
            ledger: dict[str, dict[str, Any]] = {}
            for gpu in range(GPUS):
                async with session.get(f"http://127.0.0.1:{sim_port + gpu}/_sim/ledger") as r:
                    ledger.update(await r.json())
    finally:
        if service.proc is not None:
            service.proc.stop()
        sim.stop()
    return report(jobs, outcome, final, kinds, ledger, did, submitted, settled)


def report(jobs: list[tuple[str, str, dict[str, Any]]], outcome: dict[str, int],
           final: list[dict[str, Any]], kinds: dict[str, str],
           ledger: dict[str, dict[str, Any]], did: Counter[str], submitted: float,
           settled: float, **extra: Any) -> dict[str, Any]:
    """The verdict table: what was sent, how it ended, and what went wrong (`extra`
    rows go after `completed`)."""
    verdict = judge(final, kinds, ledger)
    counts = verdict["counts"]
    listed = {j["job_id"] for j in final}
    missing = [job_id for job_id, _, _ in jobs
               if outcome.get(job_id) in (200, 202) and job_id not in listed]
    return {
        "jobs sent": len(jobs),
        "accepted (200/202)": sum(1 for s in outcome.values() if s in (200, 202)),
        "refused at submission (4xx)": sum(1 for s in outcome.values() if s >= 400),
        "completed": counts["completed"],
        **extra,
        "failed": counts["failed"],
        **{k: v for k, v in sorted(counts.items()) if k.startswith("failed: ")},
        "rejected": counts["rejected"],
        "cancelled": counts["cancelled"],
        "lost (failed, type lost)": counts["failed: lost"],
        "jobs retried after a loss": counts["jobs retried after a loss"],
        **{k: v for k, v in sorted(counts.items()) if k.startswith("lost attempts: ")},
        "stuck (not final 60 s after the end)": counts["queued"] + counts["running"],
        "run twice": len(verdict["twice"]),
        "wrong state": len(verdict["wrong"]),
        "completed with outputs other than the GPU's": len(verdict["outputs_differ"]),
        "accepted but missing": len(missing),
        "prompts run that no job names": verdict["unknown_runs"],
        "faults": dict(did),
        "wall time: submitting / until settled (s)": f"{submitted:.0f} / {settled:.0f}",
        "examples": {"wrong": verdict["wrong"][:5], "twice": verdict["twice"][:5],
                     "missing": missing[:5], "outputs": verdict["outputs_differ"][:5]},
    }


def show(result: dict[str, Any], as_json: bool, title: str) -> int:
    """Print the verdict table (or its JSON); the exit status: 1 when it holds anything
    against the service."""
    if as_json:
        print(ujson.dumps(result))
    else:
        print(title)
        for key, value in result.items():
            print(f"{key:45} {value}")
    return 1 if bad(result) else 0


def bad(result: dict[str, Any]) -> int:
    """How many jobs the verdict holds against the service."""
    return (result["stuck (not final 60 s after the end)"] + result["run twice"]
            + result["wrong state"] + result["accepted but missing"]
            + result["completed with outputs other than the GPU's"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--retry-lost", type=int, default=0)
    parser.add_argument("--comfy-restarts", type=int, default=2)
    parser.add_argument("--kills", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    # Stopped from outside: still stop the processes it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="cylindria-chaos-") as tmp:
        result = asyncio.run(run(args.jobs, args.retry_lost, args.comfy_restarts, args.kills,
                                 args.seed, Path(tmp)))
    return show(result, args.json,
                f"cylindria chaos: {args.jobs} jobs, CYLINDRIA_RETRY_LOST={args.retry_lost}, "
                f"{args.comfy_restarts} ComfyUI restarts, {args.kills} SIGKILL(s), "
                f"seed {args.seed}")


if __name__ == "__main__":
    sys.exit(main())
