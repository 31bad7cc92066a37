"""Late binding for GpuId=auto: Cylindria's own queue, priorities, aging, drain, the
limit, restarts, cancels, and the preference for a GPU that holds a job's models."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cylindria.appkeys import GPUS, JOBS, JOURNAL
from cylindria.core.dispatch import HeldQueue, ModelMemory
from cylindria.core.records import Job

import workflows
from helpers import (
    both_stores,
    job_status,
    put_job,
    start_paused,
    wait_state,
    wait_until,
    with_timing,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def held_job(seq: int, priority: int = 0, at: float = 0.0,
             models: tuple[str, ...] = ()) -> Job:
    moment = T0 + timedelta(seconds=at)
    return Job(job_id=f"j{seq}", gpu_id=None, fingerprint="f", prompt_id=f"p{seq}",
               nodes=frozenset(), submitted_at=moment, updated_at=moment, seq=seq,
               priority=priority, models=frozenset(models) or None)


def test_higher_priority_first_then_first_come():
    queue = HeldQueue(aging=60)
    jobs = [held_job(1), held_job(2, priority=5), held_job(3), held_job(4, priority=5)]
    for job in jobs:
        queue.add(job)
    assert [queue.position(j) for j in jobs] == [3, 1, 4, 2]
    order = []
    while len(queue):
        pick = queue.next_for(0, (), T0)
        order.append(pick.job.job_id)
        queue.discard(pick.job)
    assert order == ["j2", "j4", "j1", "j3"]


def test_aging_lets_an_old_job_overtake_newer_urgent_ones():
    queue = HeldQueue(aging=60)
    old, urgent = held_job(1, priority=0, at=0), held_job(2, priority=1, at=100)
    queue.add(old)
    queue.add(urgent)
    # At t=100 s the old job has waited 100 s: worth 1.67 levels, above the new job's 1.
    assert queue.next_for(0, (), T0 + timedelta(seconds=100)).job is old
    # Had it waited only 30 s, the urgent one goes first.
    assert queue.next_for(0, (), T0 + timedelta(seconds=30)).job is urgent


def test_a_gpu_holding_the_models_takes_the_job_that_needs_them_within_the_window():
    queue = HeldQueue()
    first = held_job(1, models=("sd_xl_base_1.0.safetensors",))
    second = held_job(2, models=("v1-5-pruned-emaonly.safetensors",))
    queue.add(first)
    queue.add(second)
    pick = queue.next_for(2, ["v1-5-pruned-emaonly.safetensors"], T0)
    assert pick.job is second
    assert pick.reason == "GPU 2 already holds v1-5-pruned-emaonly.safetensors."
    # Nothing in common: the earliest job, said so.
    pick = queue.next_for(3, ["flux.safetensors"], T0)
    assert pick.job is first and "next job in line" in pick.reason
    # Beyond the window, order wins over models.
    crowd = HeldQueue()
    for seq in range(1, 20):
        crowd.add(held_job(seq, models=("a",)))
    late = held_job(50, models=("b",))
    crowd.add(late)
    assert crowd.next_for(0, ["b"], T0).job.job_id == "j1"


def test_model_memory_keeps_the_most_recent_files():
    memory = ModelMemory(kept=2)
    memory.used(0, ["a", "b"])
    memory.used(0, ["c"])
    assert memory.of(0) == ["b", "c"]
    memory.forget(0)
    assert memory.of(0) == []


async def test_no_job_waits_behind_a_long_one_while_another_gpu_is_idle(
        start_cylindria, start_sims):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    long = await start_paused(client, cluster.sims[0], "long", workflows.txt2img(steps=8),
                              gpu="auto")
    assert long["gpu_id"] == 0
    for n in range(6):
        status, body = await put_job(client, f"short-{n}", workflows.quick(), gpu="auto")
        assert status == 202, body
    for n in range(6):
        body = await wait_state(client, f"short-{n}", "completed", timeout=10)
        assert body["gpu_id"] == 1, body
        assert body["placement"]
    assert (await job_status(client, "long"))["state"] == "running"
    cluster.sims[0].resume()
    await wait_state(client, "long", "completed", timeout=10)


async def test_held_jobs_go_by_priority_and_a_held_cancel_is_immediate(
        start_cylindria, start_sims):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    await start_paused(client, sim, "busy", workflows.txt2img(), gpu="auto")
    answers = {}
    for job_id, priority in [("a", 0), ("b", 0), ("c", 0), ("urgent", 10), ("gone", 0)]:
        resp = await client.put(f"/startjob/{job_id}/",
                                params={"GpuId": "auto", "priority": str(priority)},
                                json=workflows.quick())
        assert resp.status == 202
        answers[job_id] = await resp.json()
    assert answers["a"]["held"] is True and answers["a"]["gpu_id"] is None
    assert answers["urgent"]["queue_position"] == 1
    assert (await job_status(client, "c"))["queue_position"] == 4
    status = await job_status(client, "b")
    assert status["state"] == "queued" and "Held in Cylindria's queue" in status["detail"]

    resp = await client.post("/canceljob/gone/")
    assert resp.status == 202 and (await resp.json())["state"] == "cancelled"

    sim.resume()
    started = {}
    for job_id in ["busy", "urgent", "a", "b", "c"]:
        body = await wait_state(client, job_id, "completed", timeout=10)
        started[job_id] = body["started_at"]
    assert sorted(started, key=started.get) == ["busy", "urgent", "a", "b", "c"]
    assert all(entry["runs"] == 1 for entry in sim.ledger.values())
    assert len(sim.ledger) == 5  # the cancelled job never reached ComfyUI


async def test_a_bad_priority_is_a_clear_400(start_cylindria):
    client = await start_cylindria()
    for bad in ["high", "1.5", "1001", "-0", "+3", "07"]:
        resp = await client.put("/startjob/p/", params={"GpuId": "auto", "priority": bad},
                                json=workflows.quick())
        body = await resp.json()
        assert resp.status == 400 and "priority" in body["error"]["message"], (bad, body)


async def test_drained_and_unhealthy_gpus_get_nothing(start_cylindria, start_sims):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    assert (await client.post("/gpus/1/drain")).status == 200
    await start_paused(client, cluster.sims[0], "busy", workflows.txt2img(), gpu="auto")
    status, body = await put_job(client, "waits", workflows.quick(), gpu="auto")
    assert status == 202 and body["held"] is True
    # Held, not sent to the drained GPU, however long it waits.
    assert (await job_status(client, "waits"))["gpu_id"] is None
    assert (await client.post("/gpus/1/undrain")).status == 200
    body = await wait_state(client, "waits", "completed", timeout=10)
    assert body["gpu_id"] == 1
    cluster.sims[0].resume()


async def test_the_held_queue_has_a_limit(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster, max_held=2)
    await start_paused(client, cluster.sims[0], "busy", workflows.txt2img(), gpu="auto")
    for job_id in ["h1", "h2"]:
        status, _ = await put_job(client, job_id, workflows.quick(), gpu="auto")
        assert status == 202
    resp = await client.put("/startjob/h3/", params={"GpuId": "auto"},
                            json=workflows.quick())
    body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "queue_full"
    assert resp.headers["Retry-After"] and "CYLINDRIA_MAX_HELD" in body["error"]["message"]
    # A pinned job is not held, so it still goes.
    status, _ = await put_job(client, "pinned", workflows.quick(), gpu=0)
    assert status == 202
    cluster.sims[0].resume()


@both_stores
async def test_held_jobs_keep_their_order_across_a_restart(start_cylindria, start_sims, store):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster, **store.settings)
    await start_paused(client, sim, "busy", workflows.txt2img(), gpu="auto")
    for job_id, priority in [("a", 0), ("b", 5), ("c", 0)]:
        resp = await client.put(f"/startjob/{job_id}/",
                                params={"GpuId": "auto", "priority": str(priority)},
                                json=workflows.quick())
        assert resp.status == 202
    await client.close()

    client = await start_cylindria(cluster, **store.settings)
    positions = {j: (await job_status(client, j))["queue_position"] for j in "abc"}
    assert positions == {"b": 1, "a": 2, "c": 3}
    sim.resume()
    started = {}
    for job_id in ["busy", "b", "a", "c"]:
        started[job_id] = (await wait_state(client, job_id, "completed",
                                            timeout=10))["started_at"]
    assert sorted(started, key=started.get) == ["busy", "b", "a", "c"]
    assert all(entry["runs"] == 1 for entry in sim.ledger.values())


async def test_an_idle_gpu_takes_an_auto_job_at_once(start_cylindria, start_sims):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    status, body = await put_job(client, "now", workflows.quick(), gpu="auto")
    assert status == 202 and body.get("held") is None
    assert body["gpu_id"] in (0, 1)
    await wait_until(lambda: all(g.listener_connected for g in client.app[GPUS]))
    await wait_state(client, "now", "completed")


def test_the_model_loaded_last_weighs_most():
    queue = HeldQueue()
    old = held_job(1, models=("a.safetensors",))
    recent = held_job(2, models=("b.safetensors",))
    queue.add(old)
    queue.add(recent)
    # The GPU used a, then b: b is likelier still in VRAM.
    assert queue.next_for(0, ["a.safetensors", "b.safetensors"], T0).job is recent
    # A window of 1 is first come, first served.
    strict = HeldQueue(window=1)
    strict.add(old)
    strict.add(recent)
    assert strict.next_for(0, ["b.safetensors"], T0).job is old


async def test_a_held_job_waits_out_a_full_state_file_instead_of_being_refused(
        start_cylindria, start_sims, tmp_path):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster, state_file=tmp_path / "s.sqlite3",
                                   timing=with_timing(state_retry=0.1))
    await start_paused(client, sim, "busy", workflows.txt2img(steps=3), gpu="auto")
    status, body = await put_job(client, "patient", workflows.quick(), gpu="auto")
    assert status == 202 and body["held"] is True
    journal = client.app[JOURNAL]
    pages = await journal._run(lambda db: db.conn.execute("PRAGMA page_count").fetchone()[0])
    # The file may not grow any more, as on a full disk; a bulky refusal fills it.
    await journal._run(lambda db: db.conn.execute(f"PRAGMA max_page_count = {pages}"))
    status, _ = await put_job(client, "bulky", workflows.quick(prefix="x" * 200_000), gpu=0)
    assert status == 503
    sim.resume()
    await wait_state(client, "busy", "completed", timeout=10)

    # The GPU is free, but a dispatch that cannot be written is not made: the job
    # keeps its place, not refused.
    assert await client.app[JOBS].dispatch() == {}
    body = await job_status(client, "patient")
    assert (body["state"], body["gpu_id"], body["queue_position"]) == ("queued", None, 1)
    assert len(sim.ledger) == 1  # only the first job reached ComfyUI
    await journal._run(lambda db: db.conn.execute("PRAGMA max_page_count = 1073741823"))
    body = await wait_state(client, "patient", "completed", timeout=10)
    assert body["attempt"] == 1
