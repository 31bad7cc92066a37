"""Learned run times in the service: progress weighed by them, ETAs for running, queued
and held jobs and for each GPU, and what was learned kept across a restart."""

from __future__ import annotations

import itertools

import pytest
import ujson

from cylindria.appkeys import REGISTRY

import workflows
from helpers import job_status, put_job, start_paused, wait_state, wait_until


async def warm_up(client, count: int = 3, gpu="0") -> None:
    for n in range(count):
        status, _ = await put_job(client, f"warm-{n}", workflows.txt2img(steps=10), gpu=gpu)
        assert status == 202
        await wait_state(client, f"warm-{n}", "completed", timeout=10)


async def test_progress_counts_sampler_steps_once_times_are_learned(start_cylindria,
                                                                   start_sims):
    cluster = await start_sims(1, step_seconds=0.02)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    # Nothing learned: nodes are counted, so the sampler's first step already shows
    # the four nodes before it done.
    first = await start_paused(client, sim, "first", workflows.txt2img(steps=10), gpu=0)
    assert first["progress"] > 0.5
    sim.resume()
    await wait_state(client, "first", "completed", timeout=10)
    await warm_up(client)
    # Learned: the sampler is nearly all of the time, so its first step is little.
    body = await start_paused(client, sim, "weighed", workflows.txt2img(steps=10), gpu=0)
    assert body["progress"] < 0.3, body["progress"]
    assert body["eta_seconds"] is not None and body["eta_seconds"] > 0
    assert body["expected_finish_at"] > body["started_at"]
    sim.resume()
    await wait_state(client, "weighed", "completed", timeout=10)


async def test_progress_never_goes_back_and_is_one_only_on_success(start_cylindria,
                                                                  start_sims):
    cluster = await start_sims(1, step_seconds=0.01)
    client = await start_cylindria(cluster)
    await warm_up(client, 2)
    status, _ = await put_job(client, "watched", workflows.txt2img(steps=30), gpu=0)
    assert status == 202
    seen: list[float] = []

    async def done() -> bool:
        body = await job_status(client, "watched")
        seen.append(body["progress"])
        if body["state"] != "completed":
            assert body["progress"] < 1.0
        return body["state"] == "completed"

    await wait_until(done, timeout=10, what="the job to finish")
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert len(set(seen)) > 2  # it was seen moving, not only at both ends


async def test_nothing_learned_means_no_eta(start_cylindria, start_sims):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    sim.pause(at="dequeue")
    status, _ = await put_job(client, "fresh", workflows.txt2img(), gpu=0)
    assert status == 202
    body = await job_status(client, "fresh")
    assert body["eta_seconds"] is None and body["expected_finish_at"] is None
    gpus = await (await client.get("/gpus/")).json()
    assert gpus["gpus"][0]["expected_seconds_to_finish"] is None
    sim.resume()


async def test_queued_and_held_jobs_and_gpus_get_etas(start_cylindria, start_sims):
    cluster = await start_sims(1, step_seconds=0.02)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    await warm_up(client, gpu="auto")
    running = await start_paused(client, sim, "running", workflows.txt2img(steps=10),
                                 gpu="auto")
    status, body = await put_job(client, "held", workflows.txt2img(steps=10), gpu="auto")
    assert status == 202 and body["held"] is True
    held = await job_status(client, "held")
    assert held["eta_seconds"] is not None
    assert held["eta_seconds"] > running["eta_seconds"] * 0.9
    gpus = await (await client.get("/gpus/")).json()
    assert gpus["gpus"][0]["expected_seconds_to_finish"] is not None
    sim.resume()
    await wait_state(client, "held", "completed", timeout=10)


async def test_learned_times_survive_a_restart(start_cylindria, start_sims, tmp_path):
    cluster = await start_sims(1, step_seconds=0.02)
    sim = cluster.sims[0]
    state = tmp_path / "state.sqlite3"
    client = await start_cylindria(cluster, state_file=state)
    await warm_up(client)
    learned = client.app[REGISTRY].run_times.to_state()
    await client.close()

    client = await start_cylindria(cluster, state_file=state)
    assert client.app[REGISTRY].run_times.to_state() == learned
    body = await start_paused(client, sim, "after", workflows.txt2img(steps=10), gpu=0)
    assert body["eta_seconds"] is not None
    status, _ = await put_job(client, "held", workflows.txt2img(steps=10), gpu="auto")
    assert status == 202
    await client.close()

    # Restarted with a job held: its cost is read back, so it has an ETA at once.
    client = await start_cylindria(cluster, state_file=state)

    async def foreseen():
        body = await job_status(client, "held")
        return body if body["eta_seconds"] is not None else None

    body = await wait_until(foreseen, what="the held job's ETA after the restart")
    assert body["gpu_id"] is None and body["queue_position"] == 1
    sim.resume()
    await wait_state(client, "held", "completed", timeout=10)


def test_a_long_line_on_a_gpu_is_worked_out_in_one_pass():
    """Past the first few hundred jobs waiting on a GPU, each counts at their average;
    a job newer than the line kept a moment comes after all of it."""
    import uuid

    from cylindria.core.forecast import PLAYED_OUT_ON_GPU, Forecast
    from cylindria.core.registry import Registry
    from cylindria.core.workflow import read_workflow

    registry = Registry()
    workflow = read_workflow(ujson.dumps(workflows.txt2img(steps=4)).encode())
    for _node, cost in workflow.costs.items():
        registry.run_times.observe(0, cost.key, cost.units, 0.25)
    jobs = []
    for n in range(PLAYED_OUT_ON_GPU + 100):
        job = registry.begin(f"w{n}", 0, str(uuid.uuid4()), "f", workflow.nodes)
        job.costs = workflow.costs
        registry.confirm(job)
        job.queue_position = n + 1
        jobs.append(job)
    forecast = Forecast(registry)
    etas = [forecast.eta(job, 1000.0, [0]) for job in jobs]
    assert all(e is not None for e in etas)
    steps = {round(b - a, 6) for a, b in itertools.pairwise(etas)}
    assert len(steps) == 1, steps  # every job costs the same: exact and averaged agree
    late = registry.begin("late", 0, str(uuid.uuid4()), "f", workflow.nodes)
    late.costs = workflow.costs
    assert forecast.eta(late, 1000.2, [0]) == pytest.approx(etas[-1] + steps.pop())
