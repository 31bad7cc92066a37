"""Placement across GPUs: GpuId=auto, the default GPU, draining, and GET /gpus/."""

from __future__ import annotations

import asyncio
from collections import Counter

from cylindria.appkeys import GPUS

import workflows
from helpers import put_job, wait_state, wait_until


async def degrade(client, cluster, n):
    """GPU n's ComfyUI still answers HTTP but refuses the listener: degraded."""
    sim = cluster.sims[n]
    sim.refuse_websockets(True)
    await sim.drop_sockets()
    await wait_until(lambda: not client.app[GPUS][n].listener_connected, what="degraded")


async def test_auto_gives_each_healthy_gpu_one_job_and_holds_the_rest(start_cylindria,
                                                                     start_sims):
    cluster = await start_sims(4)
    client = await start_cylindria(cluster)
    await degrade(client, cluster, 2)
    for sim in cluster.sims:
        sim.pause(at="dequeue")
    results = []
    for n in range(40):
        results.append(await put_job(client, f"auto-{n}", workflows.quick(), gpu="auto"))
    assert {status for status, _ in results} == {202}
    placed = Counter(body["gpu_id"] for _, body in results)
    # One job per healthy GPU at once (CYLINDRIA_GPU_PREFETCH=0); the rest wait in
    # Cylindria's queue, in order, for whichever GPU frees first.
    assert placed == {0: 1, 1: 1, 3: 1, None: 37}, placed
    assert [body["queue_position"] for _, body in results[3:]] == list(range(1, 38))
    for sim in cluster.sims:
        sim.resume()
    ran = Counter()
    for n in range(40):
        ran[(await wait_state(client, f"auto-{n}", "completed", timeout=20))["gpu_id"]] += 1
    assert 2 not in ran and all(ran[g] >= 1 for g in (0, 1, 3)), ran


async def test_auto_prefers_the_gpu_with_least_work(start_cylindria, start_sims):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    for sim in cluster.sims:
        sim.pause(at="dequeue")
    for n in range(3):
        await put_job(client, f"busy-{n}", workflows.quick(), gpu=0)
    _, body = await put_job(client, "light", workflows.quick(), gpu="auto")
    assert body["gpu_id"] == 1
    for sim in cluster.sims:
        sim.resume()


async def test_concurrent_auto_submissions_fill_each_gpu_once(start_cylindria, start_sims):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    for sim in cluster.sims:
        sim.pause(at="dequeue")
    results = await asyncio.gather(*(put_job(client, f"c-{n}", workflows.quick(), gpu="auto")
                                     for n in range(10)))
    placed = Counter(body["gpu_id"] for _, body in results)
    assert placed == {0: 1, 1: 1, None: 8}, placed
    for sim in cluster.sims:
        sim.resume()
    for n in range(10):
        await wait_state(client, f"c-{n}", "completed", timeout=10)
    assert sum(len(sim.ledger) for sim in cluster.sims) == 10


async def test_with_no_healthy_gpu_an_auto_job_is_held_until_one_is(start_cylindria,
                                                                   start_sims):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    for n in range(2):
        await degrade(client, cluster, n)
    resp = await client.put("/startjob/none/", params={"GpuId": "auto"},
                            json=workflows.quick())
    assert resp.status == 202
    body = await resp.json()
    assert body["held"] is True and body["gpu_id"] is None
    assert body["queue_position"] == 1
    cluster.sims[1].refuse_websockets(False)
    body = await wait_state(client, "none", "completed", timeout=10)
    assert body["gpu_id"] == 1


async def test_default_gpu_auto_applies_to_a_missing_gpu_id(start_cylindria, start_sims):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster, default_gpu="auto")
    await degrade(client, cluster, 0)
    status, body = await put_job(client, "default-auto", workflows.quick())
    assert status == 202 and body["gpu_id"] == 1


async def test_default_gpu_number(start_cylindria, start_sims):
    client = await start_cylindria(await start_sims(2), default_gpu=1)
    _, body = await put_job(client, "default-one", workflows.quick())
    assert body["gpu_id"] == 1


async def test_drain_stops_new_placements_but_lets_work_finish(start_cylindria, start_sims):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    cluster.sims[1].pause(at="dequeue")
    await put_job(client, "before-drain", workflows.quick(), gpu=1)
    resp = await client.post("/gpus/1/drain")
    assert resp.status == 200 and (await resp.json())["drained"] is True
    status, body = await put_job(client, "explicit", workflows.quick(), gpu=1)
    assert status == 409 and body["error"]["code"] == "gpu_drained"
    for n in range(4):
        _, body = await put_job(client, f"auto-d-{n}", workflows.quick(), gpu="auto")
        assert body["gpu_id"] == 0
    cluster.sims[1].resume()
    await wait_state(client, "before-drain", "completed")
    resp = await client.post("/gpus/1/undrain")
    assert (await resp.json())["drained"] is False
    status, _ = await put_job(client, "explicit", workflows.quick(), gpu=1)
    assert status == 202


async def test_gpus_lists_every_gpu(start_cylindria, start_sims):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    cluster.sims[0].pause(at="tick")
    await put_job(client, "shown", workflows.txt2img(steps=3), gpu=0)
    await wait_state(client, "shown", "running")
    await client.post("/gpus/1/drain")
    body = await (await client.get("/gpus/")).json()
    first, second = body["gpus"]
    assert first["gpu_id"] == 0 and first["status"] == "ok"
    assert first["running_job"]["job_id"] == "shown"
    assert first["queue_depth"] == 0 and first["drained"] is False
    assert second["drained"] is True and second["running_job"] is None
    assert "devices" in first and "listener_connected" in second
    cluster.sims[0].resume()
    resp = await client.post("/gpus/7/drain")
    assert resp.status == 400
