"""Cancelling jobs: queued ones leave ComfyUI's queue, running ones are interrupted."""

from __future__ import annotations

import asyncio

import workflows
from helpers import job_status, put_job, start_paused, wait_state, wait_until, with_timing


async def cancel(client, job_id):
    resp = await client.post(f"/canceljob/{job_id}/")
    return resp.status, await resp.json()


async def test_cancel_queued_and_running_on_two_gpus_without_collateral(start_cylindria,
                                                                       start_sims):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    for sim in cluster.sims:
        sim.pause(at="tick")
    await put_job(client, "a-run", workflows.txt2img(steps=4), gpu=0)
    await put_job(client, "b-run", workflows.txt2img(steps=4), gpu=1)
    await wait_state(client, "a-run", "running")
    await wait_state(client, "b-run", "running")
    await put_job(client, "a-queued", workflows.quick(), gpu=0)
    await put_job(client, "a-keep", workflows.quick(), gpu=0)
    await put_job(client, "b-keep", workflows.quick(), gpu=1)
    for sim in cluster.sims:
        await asyncio.wait_for(sim.until_blocked(), 5)

    (s1, queued), (s2, running) = await asyncio.gather(cancel(client, "a-queued"),
                                                       cancel(client, "b-run"))
    assert (s1, s2) == (202, 202)
    # Deleted from ComfyUI's queue and confirmed absent: cancelled at once.
    assert queued["state"] == "cancelled"
    assert "removed from ComfyUI's queue" in queued["detail"]
    # A running job is only cancelled when ComfyUI reports the interruption.
    assert running["state"] == "running" and running["cancel_requested"] is True

    for sim in cluster.sims:
        sim.resume()
    body = await wait_state(client, "b-run", "cancelled")
    assert "interrupted" in body["detail"] and body["progress"] < 1
    for job_id in ("a-run", "a-keep", "b-keep"):
        done = await wait_state(client, job_id, "completed", "failed", "cancelled")
        assert done["state"] == "completed", job_id
    assert (await job_status(client, "a-queued"))["state"] == "cancelled"


async def test_cancel_that_comes_too_late_ends_completed(start_cylindria, start_sims):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    # One image: its only progress tick is the job's last interrupt check.
    await start_paused(client, sim, "late", workflows.websocket_images(batch=1))
    status, body = await cancel(client, "late")
    assert status == 202 and body["state"] == "running"
    sim.resume()
    done = await wait_state(client, "late", "completed", "cancelled", "failed")
    assert done["state"] == "completed"
    assert "too late" in done["detail"]


async def test_repeating_a_cancel_is_harmless(start_cylindria, start_sims):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    await start_paused(client, sim, "twice", workflows.txt2img(steps=3))
    first, _ = await cancel(client, "twice")
    second, body = await cancel(client, "twice")
    assert (first, second) == (202, 202)
    sim.resume()
    await wait_state(client, "twice", "cancelled")
    status, body = await cancel(client, "twice")
    assert status == 409
    assert body["state"] == "cancelled" and body["error"]["code"] == "job_finished"


async def test_cancel_finished_is_409_and_unknown_is_404(start_cylindria):
    client = await start_cylindria()
    await put_job(client, "done", workflows.quick())
    await wait_state(client, "done", "completed")
    status, body = await cancel(client, "done")
    assert status == 409 and body["state"] == "completed"
    status, body = await cancel(client, "ghost")
    assert status == 404 and body["error"]["code"] == "job_not_found"


async def test_a_cancel_asks_about_its_own_job_not_the_whole_queue(start_cylindria,
                                                                     start_sims):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    # The poller reads the queue once a minute here: every read seen is the cancels'.
    client = await start_cylindria(cluster, timing=with_timing(poll_interval=60.0))
    await start_paused(client, sim, "runner", workflows.txt2img(steps=3))
    ids = [f"line-{n}" for n in range(12)]
    for job_id in ids:
        status, _ = await put_job(client, job_id, workflows.quick())
        assert status == 202
    await wait_until(lambda: sim.queue_remaining == len(ids) + 1, what="the line queued")
    queue_reads = cluster.count(0, "GET", "/queue")
    for job_id in ids[:6]:
        status, body = await cancel(client, job_id)
        assert status == 202 and body["state"] == "cancelled", body
        asked = cluster.count(0, "GET", f"/api/jobs/{body['prompt_id']}")
        assert asked == 1
    assert cluster.count(0, "GET", "/queue") == queue_reads
    assert sim.queue_remaining == len(ids) + 1 - 6
    # The one running is interrupted, on its own word.
    status, body = await cancel(client, "runner")
    assert status == 202 and body["cancel_requested"] is True
    sim.resume()
    await wait_state(client, "runner", "cancelled")
    for job_id in ids[6:]:
        await wait_state(client, job_id, "completed")


async def test_cancel_never_interrupts_globally(start_cylindria, start_sims):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    sim.pause(at="dequeue")
    await put_job(client, "pending", workflows.quick())
    await wait_until(lambda: sim.queue_remaining == 1, what="queued on the simulator")
    status, body = await cancel(client, "pending")
    assert status == 202 and body["state"] == "cancelled"
    sim.resume()
    # Only targeted calls reached ComfyUI: a queue delete; no bodiless interrupt.
    assert cluster.count(0, "POST", "/queue") == 1
    assert cluster.count(0, "POST", "/interrupt") == 0
