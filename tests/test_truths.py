"""States and messages that say what really happened, as ComfyUI showed it."""

from __future__ import annotations

import workflows
from helpers import job_status, put_job, start_paused, wait_state, wait_until, with_timing


async def cancel(client, job_id):
    resp = await client.post(f"/canceljob/{job_id}/")
    return resp.status, await resp.json()


async def test_a_queued_job_cancelled_before_it_ran_never_started(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    sim = cluster.sims[0]
    await start_paused(client, sim, "busy", workflows.txt2img(steps=3))
    await put_job(client, "waiting", workflows.quick())
    await wait_until(lambda: sim.queue_remaining == 2, what="a second job queued")
    status, body = await cancel(client, "waiting")
    assert status == 202 and body["state"] == "cancelled"
    assert body["started_at"] is None and body["finished_at"] is not None
    assert body["cancel_requested"] is False
    assert "before it ran" in body["detail"]
    sim.resume()
    await wait_state(client, "busy", "completed")


async def test_a_running_job_lost_after_its_cancel_says_it_had_run(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    sim = cluster.sims[0]
    running = await start_paused(client, sim, "half", workflows.txt2img(steps=4))
    assert running["progress"] > 0
    # ComfyUI refuses the cancel's calls, then restarts and forgets the job.
    sim.fail_next(10, path="/queue")
    status, body = await cancel(client, "half")
    assert status == 202 and body["state"] == "running" and body["cancel_requested"] is True
    sim.release_hangs()
    await sim.restart()
    done = await wait_state(client, "half", "cancelled")
    assert "before it ran" not in done["detail"]
    assert "it had started" in done["detail"] and "any record of it" in done["detail"]
    assert done["started_at"] is not None and done["cancel_requested"] is False


async def test_an_unreachable_gpu_is_named_on_its_jobs_and_its_queue_unknown(start_cylindria,
                                                                             start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    sim = cluster.sims[0]
    await start_paused(client, sim, "stranded", workflows.txt2img(steps=3))
    await cluster.servers[0].close()

    async def doubted():
        body = await job_status(client, "stranded")
        return body if "has not answered since" in body["detail"] else None
    body = await wait_until(doubted, what="the job to say ComfyUI is gone")
    assert body["state"] == "running" and "unknown until it does" in body["detail"]
    status = await (await client.get("/serverstatus")).json()
    assert status["reachable"] is False and status["queue_remaining"] is None


async def test_a_cancel_answers_soon_while_comfyui_hangs(start_cylindria, start_sims):
    cluster = await start_sims(1)
    # The hung calls give up after request_timeout (2 s); the answer comes long before.
    client = await start_cylindria(cluster, timing=with_timing(cancel_wait=0.2))
    sim = cluster.sims[0]
    await start_paused(client, sim, "stuck", workflows.txt2img(steps=3))
    sim.hang_next(20, path="/queue")
    sim.hang_next(20, path="/interrupt")
    # The hung calls answer only when released below: the cancel's answer comes first.
    status, body = await cancel(client, "stuck")
    assert status == 202 and body["state"] == "running"
    assert "ComfyUI is not answering" in body["detail"] and "keeps trying" in body["detail"]
    sim.release_hangs()
    sim.resume()
    done = await wait_state(client, "stuck", "cancelled", "completed")
    assert done["cancel_requested"] is False


async def test_a_missing_model_names_the_file(start_cylindria):
    client = await start_cylindria()
    status, body = await put_job(client, "nomodel",
                                 workflows.txt2img(ckpt="does-not-exist.safetensors"))
    assert status == 422
    assert "ckpt_name" in body["detail"] and "does-not-exist.safetensors" in body["detail"]
    assert len(body["detail"]) < 400


async def test_a_partly_invalid_workflow_names_the_outputs_that_will_not_run(start_cylindria):
    client = await start_cylindria()
    workflow = workflows.quick()
    workflow["4"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0],
                                                           "filename_prefix": "bad"}}
    workflow["5"] = {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8,
                                                            "batch_size": 1, "color": 0}}
    status, body = await put_job(client, "partly", workflow)
    assert status == 202, body
    assert body["detail"].endswith("will not run: output node 4.")
    assert "5" in body["node_errors"]
