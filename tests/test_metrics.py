"""GET /metrics: parsed with prometheus-client's own parser, its numbers match what
was done."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

import workflows
from helpers import put_job, start_paused, wait_state


async def scrape(client, headers=None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = await client.get("/metrics", headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_what_was_done(start_cylindria, start_sims):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    for n in range(3):
        await put_job(client, f"ok-{n}", workflows.quick(color=n), gpu=n % 2)
    await put_job(client, "broken", workflows.fails_at_runtime(), gpu=1)
    await put_job(client, "refused", workflows.UI_EXPORT)
    for n in range(3):
        await wait_state(client, f"ok-{n}", "completed")
    await wait_state(client, "broken", "failed")

    samples = await scrape(client)
    assert value(samples, "cylindria_jobs_finished_total", gpu="0", state="completed") == 2
    assert value(samples, "cylindria_jobs_finished_total", gpu="1", state="completed") == 1
    assert value(samples, "cylindria_jobs_finished_total", gpu="1", state="failed") == 1
    assert value(samples, "cylindria_jobs_finished_total", gpu="none", state="rejected") == 1
    assert value(samples, "cylindria_jobs", state="completed") == 3
    assert value(samples, "cylindria_jobs", state="failed") == 1
    assert value(samples, "cylindria_jobs", state="rejected") == 1
    puts = {(labels, v) for (name, labels), v in samples.items()
            if name == "cylindria_http_requests_total" and ("route", "startjob") in labels}
    assert {(dict(labels)["status"], v) for labels, v in puts} == {("202", 4), ("422", 1)}
    assert value(samples, "cylindria_http_request_duration_seconds_count",
                 route="startjob", method="PUT") == 5
    assert value(samples, "cylindria_job_run_seconds_count", gpu="0") == 2
    assert value(samples, "cylindria_job_queue_wait_seconds_count", gpu="1") == 2
    for gpu in ("0", "1"):
        assert value(samples, "cylindria_gpu_reachable", gpu=gpu) == 1
        assert value(samples, "cylindria_gpu_listener_connected", gpu=gpu) == 1
        assert value(samples, "cylindria_gpu_queue_jobs", gpu=gpu, stage="pending") == 0
    assert value(samples, "cylindria_gpu_websocket_messages_total",
                 gpu="0", type="execution_success") == 2
    assert value(samples, "cylindria_event_streams_open") == 0
    assert value(samples, "cylindria_journal_writable") == 1
    assert value(samples, "cylindria_journal_commit_seconds_count") >= 1
    for gpu in ("0", "1"):  # two submissions each; the refused one never left
        assert value(samples, "cylindria_comfyui_request_duration_seconds_count",
                     gpu=gpu, endpoint="/prompt") == 2


async def test_metrics_need_the_key_unless_public(start_cylindria):
    client = await start_cylindria(api_key="k3y")
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers={"Authorization": "Bearer nope"})).status == 401
    await scrape(client, headers={"Authorization": "Bearer k3y"})
    await scrape(client, headers={"X-API-Key": "k3y"})
    await client.close()
    public = await start_cylindria(api_key="k3y", metrics_public=True)
    await scrape(public)
    assert (await public.get("/jobs/")).status == 401


async def test_jobs_held_for_a_gpu_are_counted(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    await start_paused(client, cluster.sims[0], "busy", workflows.txt2img(), gpu="auto")
    for n in range(3):
        status, _ = await put_job(client, f"held-{n}", workflows.quick(), gpu="auto")
        assert status == 202
    samples = await scrape(client)
    assert value(samples, "cylindria_jobs_held") == 3
    assert value(samples, "cylindria_jobs", state="queued") == 3
    cluster.sims[0].resume()
    for n in range(3):
        await wait_state(client, f"held-{n}", "completed")
    assert value(await scrape(client), "cylindria_jobs_held") == 0
