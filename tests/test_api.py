"""The JSON API against simulated ComfyUIs on loopback."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import datetime

import pytest
import ujson
from aiohttp import web

from cylindria.appkeys import GPUS, REGISTRY
from cylindria.upstream.gpus import Gpu

import workflows
from helpers import (
    FAST,
    concrete,
    job_status,
    put_job,
    start_paused,
    wait_state,
    wait_until,
    with_timing,
)

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


# -- health and server status -------------------------------------------------------

async def test_healthz_needs_no_upstream(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    before = len(cluster.requests[0])
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert (await resp.json())["status"] == "ok"
    assert len(cluster.requests[0]) == before


async def test_serverstatus_reports_ok_with_devices_and_version(start_cylindria):
    client = await start_cylindria()
    resp = await client.get("/serverstatus")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ok" and body["reachable"] is True
    assert body["gpu_id"] == 0 and body["listener_connected"] is True
    assert body["comfy_url"] == client.app[GPUS][0].url
    assert body["comfyui_version"] == "0.8.0"
    assert body["queue_remaining"] == 0
    device = body["devices"][0]
    assert set(device) == {"name", "vram_total", "vram_free"}
    assert device["vram_total"] >= device["vram_free"] > 0


async def test_serverstatus_picks_the_gpu(start_cylindria, start_sims):
    cluster = await start_sims(3)
    client = await start_cylindria(cluster)
    body = await (await client.get("/serverstatus", params={"GpuId": "2"})).json()
    assert body["gpu_id"] == 2
    assert body["comfy_url"].endswith(f":{cluster.base_port + 2}")


@pytest.mark.parametrize("value", ["x", "1.5", "-1", "3", "+1", "01", "\uff11", "\u0661",
                                   " 1", "9" * 5000])
async def test_serverstatus_bad_gpu_id_is_400(start_cylindria, start_sims, value):
    client = await start_cylindria(await start_sims(3))
    resp = await client.get("/serverstatus", params={"GpuId": value})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["code"] == "unknown_gpu"
    assert "0 to 2" in body["error"]["message"]


async def test_serverstatus_degraded_when_comfyui_is_down(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    await cluster.servers[0].close()
    await wait_until(lambda: not client.app[GPUS][0].listener_connected,
                     what="listener to notice")
    await asyncio.sleep(0)
    body = await wait_until(lambda: _status_if(client, "degraded"), what="degraded status")
    assert body["reachable"] is False
    assert "unreachable" in body["detail"]


async def _status_if(client, status):
    body = await (await client.get("/serverstatus")).json()
    return body if body["status"] == status else None


async def test_serverstatus_answers_fast_when_comfyui_hangs(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    cluster.sims[0].hang_next(5, path="/system_stats")
    started = time.monotonic()
    resp = await client.get("/serverstatus")
    elapsed = time.monotonic() - started
    body = await resp.json()
    cluster.sims[0].release_hangs()
    assert body["status"] == "degraded" and body["reachable"] is False
    assert elapsed < 2.5


async def test_status_calls_within_the_cache_window_make_one_upstream_call(
        start_cylindria, start_sims):
    cluster = await start_sims(1)
    # A cache window far longer than the test: however slow the machine, every call
    # below falls inside it.
    client = await start_cylindria(cluster, timing=with_timing(status_cache_seconds=600))
    await client.get("/serverstatus")
    before = cluster.count(0, "GET", "/system_stats")
    answers = await asyncio.gather(*(client.get("/serverstatus") for _ in range(25)))
    assert {r.status for r in answers} == {200}
    assert cluster.count(0, "GET", "/system_stats") == before


async def test_concurrent_probes_share_one_upstream_call():
    release = asyncio.Event()
    calls = []

    class SlowComfy:
        async def system_stats(self, timeout):
            calls.append(timeout)
            await release.wait()
            return {"devices": []}

    gpu = Gpu(index=0, url="http://127.0.0.1:1", client_id="c", comfy=SlowComfy(),
              timing=FAST)
    waiting = [asyncio.create_task(gpu.probe()) for _ in range(25)]
    await wait_until(lambda: calls, what="the probe to reach ComfyUI")
    assert len(calls) == 1 and not any(t.done() for t in waiting)
    release.set()
    probes = await asyncio.gather(*waiting)
    assert all(p is probes[0] and p.reachable for p in probes)
    assert len(calls) == 1


# -- submission ------------------------------------------------------------------------

async def test_startjob_runs_to_completion(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    status, body = await put_job(client, "job-1", workflows.quick())
    assert status == 202, body
    assert body["accepted"] is True and body["job_id"] == "job-1" and body["gpu_id"] == 0
    assert UUID4.match(body["prompt_id"])
    done = await wait_state(client, "job-1", "completed")
    assert done["progress"] == 1.0
    assert done["prompt_id"] == body["prompt_id"]
    assert done["queue_position"] is None and done["error"] is None
    (image,) = done["outputs"]
    assert image["node_id"] == "3" and image["kind"] == "image"
    assert image["filename"].endswith(".png") and image["subfolder"] == "cyl"
    assert image["type"] == "output" and image["url"] == "/joboutput/job-1/0"
    assert done["outputs_reused"] is False
    for key in ("submitted_at", "updated_at", "started_at", "finished_at"):
        assert done[key].endswith("Z")
        datetime.fromisoformat(done[key].replace("Z", "+00:00"))
    assert done["submitted_at"] <= done["started_at"] <= done["finished_at"]
    # Submitted with the listener's client id and Cylindria's own prompt id.
    entry = cluster.sims[0].history[body["prompt_id"]]
    assert entry["prompt"][3]["client_id"] == client.app[GPUS][0].client_id


async def test_envelope_with_extra_data_is_accepted(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    envelope = {"prompt": workflows.quick(), "extra_data": {"extra_pnginfo": {"k": "v"},
                                                            "client_id": "someone-else"}}
    status, body = await put_job(client, "env", envelope)
    assert status == 202
    await wait_state(client, "env", "completed")
    extra = cluster.sims[0].history[body["prompt_id"]]["prompt"][3]
    assert extra["extra_pnginfo"] == {"k": "v"}
    assert extra["client_id"] == client.app[GPUS][0].client_id


async def test_startjob_goes_to_the_requested_gpu(start_cylindria, start_sims):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    status, body = await put_job(client, "on-1", workflows.quick(), gpu=1)
    assert status == 202 and body["gpu_id"] == 1
    await wait_state(client, "on-1", "completed")
    assert cluster.count(1, "POST", "/prompt") == 1
    assert cluster.count(0, "POST", "/prompt") == 0


async def test_same_job_again_is_200_and_not_resubmitted(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    wf = workflows.quick()
    first, _ = await put_job(client, "twice", wf)
    second, body = await put_job(client, "twice", wf)
    assert (first, second) == (202, 200)
    assert body["accepted"] is True and "nothing was submitted again" in body["detail"]
    assert cluster.count(0, "POST", "/prompt") == 1


async def test_concurrent_identical_puts_submit_once(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    wf = workflows.quick()
    results = await asyncio.gather(*(put_job(client, "race", wf) for _ in range(5)))
    statuses = sorted(s for s, _ in results)
    assert statuses == [200, 200, 200, 200, 202]
    assert len({b["prompt_id"] for _, b in results}) == 1
    assert cluster.count(0, "POST", "/prompt") == 1


async def test_same_job_id_with_other_workflow_is_409(start_cylindria):
    client = await start_cylindria()
    await put_job(client, "dup", workflows.quick())
    status, body = await put_job(client, "dup", workflows.quick())
    assert status == 409
    assert body["accepted"] is False and body["error"]["code"] == "job_id_conflict"
    assert "new job_id" in body["detail"]
    assert (await job_status(client, "dup"))["state"] in ("queued", "running", "completed")


@pytest.mark.parametrize("job_id", ["has space", "x" * 129, "semi;colon", "ümlaut",
                                    "abc%0A", "abc%0D", "%EF%BC%91"])
async def test_bad_job_id_is_400(start_cylindria, job_id):
    client = await start_cylindria()
    status, body = await put_job(client, job_id, workflows.quick())
    assert status == 400
    assert body["accepted"] is False and "1 to 128" in body["detail"]


@pytest.mark.parametrize("value", ["+1", "01", "\uff11", "\u0661"])
async def test_gpu_numbers_are_plain_digits_everywhere(start_cylindria, start_sims, value):
    client = await start_cylindria(await start_sims(2))
    status, body = await put_job(client, "odd-gpu", workflows.quick(), gpu=value)
    assert status == 400 and body["error"]["code"] == "unknown_gpu"
    assert (await client.post(f"/gpus/{value}/drain")).status == 400
    assert (await client.get("/jobs/", params={"gpu": value})).status == 400
    assert (await client.get("/jobstatus/odd-gpu/")).status == 404


async def test_longest_job_id_is_fine(start_cylindria):
    client = await start_cylindria()
    status, _ = await put_job(client, "A-z_0.9" + "x" * 121, workflows.quick())
    assert status == 202


async def test_invalid_json_and_non_objects_are_400(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    resp = await client.put("/startjob/j/", data=b"{not json")
    body = await resp.json()
    assert resp.status == 400 and body["accepted"] is False and "not valid JSON" in body["detail"]
    for payload in ([1, 2], "text", 3, None, {"prompt": [1]}):
        status, body = await put_job(client, "j", payload)
        assert status == 400, payload
        assert body["error"]["code"] == "bad_request"
    assert cluster.count(0, "POST", "/prompt") == 0


async def test_ui_export_is_422_and_says_to_export_api_format(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    for payload in (workflows.UI_EXPORT, {"prompt": workflows.UI_EXPORT}):
        status, body = await put_job(client, "ui", payload)
        assert status == 422
        assert "Export (API)" in body["detail"]
    assert cluster.count(0, "POST", "/prompt") == 0


async def test_node_without_class_type_is_422(start_cylindria):
    client = await start_cylindria()
    status, body = await put_job(client, "n", {"1": {"inputs": {}}})
    assert status == 422 and "'1'" in body["detail"]
    status, body = await put_job(client, "n", {"1": 5})
    assert status == 422
    status, body = await put_job(client, "n", {})
    assert status == 422 and "no nodes" in body["detail"]


async def test_comfyui_validation_error_is_422_and_recorded(start_cylindria):
    client = await start_cylindria()
    status, body = await put_job(client, "bad", workflows.below_min())
    assert status == 422
    assert body["accepted"] is False
    assert "node 1 (EmptyImage) input 'width'" in body["detail"]
    assert "smaller than min" in body["detail"]
    assert body["node_errors"]["1"]["errors"][0]["type"] == "value_smaller_than_min"
    recorded = await job_status(client, "bad")
    assert recorded["state"] == "rejected"
    assert "width" in recorded["detail"]
    assert recorded["node_errors"]["1"]["class_type"] == "EmptyImage"
    # A rejected job id may be used again.
    status, body = await put_job(client, "bad", workflows.quick())
    assert status == 202
    await wait_state(client, "bad", "completed")


async def test_unknown_class_is_422_with_comfyuis_message(start_cylindria):
    client = await start_cylindria()
    status, body = await put_job(client, "nc", {"1": {"class_type": "NoSuchNode",
                                                      "inputs": {}}})
    assert status == 422
    assert "NoSuchNode does not exist" in body["detail"]


async def test_unknown_checkpoint_fails_validation(start_cylindria):
    client = await start_cylindria()
    status, body = await put_job(client, "ck", workflows.txt2img(ckpt="nope.safetensors"))
    assert status == 422
    assert "ckpt_name" in body["detail"]


async def test_unreachable_comfyui_is_502_and_recorded(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    await cluster.servers[0].close()
    status, body = await put_job(client, "down", workflows.quick())
    assert status == 502
    assert body["accepted"] is False and body["error"]["code"] == "backend_unavailable"
    assert (await job_status(client, "down"))["state"] == "rejected"


async def test_a_5xx_answer_is_logged_with_its_job_but_never_the_key(start_cylindria,
                                                                     start_sims, caplog):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster, api_key="k3y-never-logged")
    await cluster.servers[0].close()
    with caplog.at_level(logging.WARNING, logger="cylindria"):
        status, _ = await put_job(client, "logged", workflows.quick(),
                                  headers={"X-API-Key": "k3y-never-logged"})
    assert status == 502
    (line,) = [r.getMessage() for r in caplog.records if "answered 502" in r.getMessage()]
    assert line.startswith("PUT /startjob/logged/ answered 502 backend_unavailable (job logged)")
    assert "k3y-never-logged" not in caplog.text


async def test_comfyui_error_page_is_502(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    cluster.sims[0].fail_next(1, path="/prompt")
    status, body = await put_job(client, "five", workflows.quick())
    assert status == 502 and body["accepted"] is False
    assert "HTTP 500" in body["detail"]


async def test_submission_timeout_is_504_when_nothing_was_queued(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    cluster.sims[0].hang_next(1, path="/prompt")
    status, body = await put_job(client, "slow", workflows.quick())
    cluster.sims[0].release_hangs()
    assert status == 504
    assert body["accepted"] is False and body["error"]["code"] == "backend_timeout"
    assert (await job_status(client, "slow"))["state"] == "rejected"


def answer_late(gate: asyncio.Event):
    """ComfyUI queues the job, then stalls before answering (a lost answer)."""
    @web.middleware
    async def late(request, handler):
        response = await handler(request)
        if request.method == "POST" and request.path == "/prompt" and not gate.is_set():
            await gate.wait()
        return response
    return late


async def test_timed_out_submission_that_was_queued_is_accepted_once(start_cylindria,
                                                                     start_sims):
    gate = asyncio.Event()
    cluster = await start_sims(1, middlewares=(answer_late(gate),))
    client = await start_cylindria(cluster)
    try:
        status, body = await put_job(client, "lost-answer", workflows.quick())
    finally:
        gate.set()
    assert status == 202, body
    assert body["accepted"] is True
    assert "had queued" in body["detail"]
    await wait_state(client, "lost-answer", "completed")
    assert cluster.count(0, "POST", "/prompt") == 1


async def test_retry_after_an_unanswered_submission_adopts_the_first_attempt(
        start_cylindria, start_sims):
    """ComfyUI queued the job but neither answered nor could be asked in time: the job
    is refused (504); a retry finds the first attempt and does not submit again."""
    gate = asyncio.Event()
    cluster = await start_sims(1, middlewares=(answer_late(gate),))
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    sim.pause(at="dequeue")
    sim.hang_next(10, path="/queue")  # the poller may take some of these too
    wf = workflows.quick()
    try:
        status, body = await put_job(client, "uncertain", wf)
    finally:
        gate.set()
        sim.release_hangs()
    assert status == 504 and body["accepted"] is False
    assert "will check again" in body["detail"]
    first = await job_status(client, "uncertain")
    assert first["state"] == "rejected"
    status, body = await put_job(client, "uncertain", wf)
    assert status == 202, body
    assert body["prompt_id"] == first["prompt_id"]
    assert "after all" in body["detail"]
    sim.resume()
    await wait_state(client, "uncertain", "completed")
    assert cluster.count(0, "POST", "/prompt") == 1


async def test_dev_mode_saves_the_workflow(start_cylindria, tmp_path):
    save_dir = tmp_path / "saved"
    client = await start_cylindria(dev_mode=True, dev_save_dir=save_dir)
    wf = workflows.quick()
    status, _ = await put_job(client, "dev-job", wf)
    assert status == 202
    files = list(save_dir.glob("*_dev-job.json"))
    assert len(files) == 1
    assert re.match(r"^\d{8}T\d{6}\.\d{6}Z_dev-job\.json$", files[0].name)
    text = files[0].read_text()
    assert "\n  " in text
    assert ujson.loads(text) == wf


async def test_dev_mode_save_failure_does_not_fail_the_job(start_cylindria, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    client = await start_cylindria(dev_mode=True, dev_save_dir=blocker / "sub")
    status, _ = await put_job(client, "dev-fail", workflows.quick())
    assert status == 202
    assert "could not save" in caplog.text
    await wait_state(client, "dev-fail", "completed")


# -- job status ----------------------------------------------------------------------

async def test_unknown_job_is_404(start_cylindria):
    client = await start_cylindria()
    resp = await client.get("/jobstatus/never/")
    assert resp.status == 404
    body = await resp.json()
    assert body["error"]["code"] == "job_not_found" and "PUT /startjob/never/" in body[
        "error"]["message"]


async def test_queue_positions_running_node_and_progress(start_cylindria, start_sims):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    running = await start_paused(client, sim, "first", workflows.txt2img(steps=4))
    for n in range(2):
        await put_job(client, f"wait-{n}", workflows.quick())
    second = await wait_until(lambda: _status_pos(client, "wait-1", 2), what="positions")
    assert second["state"] == "queued"
    assert (await job_status(client, "wait-0"))["queue_position"] == 1
    running = await wait_until(lambda: _status_pos(client, "first", 0), what="running pos")
    assert running["current_node"] == "3"
    assert running["node_progress"]["node"] == "3" and running["node_progress"]["max"] == 4
    assert 0 < running["progress"] < 1
    sim.resume()
    for job_id in ("first", "wait-0", "wait-1"):
        await wait_state(client, job_id, "completed")


async def _status_pos(client, job_id, position):
    body = await job_status(client, job_id)
    return body if body["queue_position"] == position else None


async def test_progress_moves_through_the_sampler(start_cylindria, start_sims):
    cluster = await start_sims(1, step_seconds=0.02)
    client = await start_cylindria(cluster)
    await put_job(client, "steps", workflows.txt2img(steps=10))
    seen = set()

    async def sample():
        body = await job_status(client, "steps")
        seen.add(body["progress"])
        return body["state"] == "completed"
    await wait_until(sample, what="completion")
    moving = sorted(p for p in seen if 0 < p < 1)
    assert len(moving) >= 3, seen
    assert max(seen) == 1.0


async def test_runtime_error_is_failed_with_the_error(start_cylindria):
    client = await start_cylindria()
    await put_job(client, "boom", workflows.fails_at_runtime())
    body = await wait_state(client, "boom", "failed")
    assert body["error"]["type"] == "Exception"
    assert body["error"]["node_id"] == "2" and body["error"]["node_type"] == "SaveImage"
    assert "outside the output folder" in body["error"]["message"]
    assert "outside the output folder" in body["detail"]
    assert body["progress"] < 1


async def test_websocket_image_jobs_complete(start_cylindria):
    client = await start_cylindria()
    await put_job(client, "wsimg", workflows.websocket_images(batch=4))
    body = await wait_state(client, "wsimg", "completed")
    assert body["outputs"] == []


# -- errors and auth ---------------------------------------------------------------------

async def test_unknown_route_and_wrong_method_are_json(start_cylindria):
    client = await start_cylindria()
    resp = await client.get("/nope")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await client.post("/startjob/x/")
    assert resp.status == 405
    body = await resp.json()
    assert body["error"]["code"] == "method_not_allowed" and "PUT" in body["error"]["message"]


async def test_every_route_but_the_health_checks_needs_the_key(start_cylindria):
    """Walks every route of the app without a key: only the routes listed here are
    open, the dashboard's pages send the browser to the sign-in form, and every other
    route answers 401 JSON."""
    # The health checks (load balancers know no secrets), the sign-in form, and the
    # stylesheet and script the form uses. The simulated GPU behind is up: ready.
    open_routes = {
        ("GET", "/healthz"): 200, ("HEAD", "/healthz"): 200,
        ("GET", "/readyz"): 200, ("HEAD", "/readyz"): 200,
        ("GET", "/dashboard/login"): 200, ("HEAD", "/dashboard/login"): 200,
        ("POST", "/dashboard/login"): 401,
        ("GET", "/dashboard/static/dashboard.css"): 200,
        ("HEAD", "/dashboard/static/dashboard.css"): 200,
        ("GET", "/docs/static/swagger-ui.css"): 200,
        ("HEAD", "/docs/static/swagger-ui.css"): 200,
    }
    sign_in_pages = {"/", "/dashboard/job/x", "/dashboard/logout", "/docs",
                     "/dashboard/failures"}
    client = await start_cylindria(api_key="s3cret")
    seen_open = set()
    checked = 0
    for route in client.app.router.routes():
        info = route.resource.get_info()
        if "prefix" in info:
            asset = "/swagger-ui.css" if info["prefix"] == "/docs/static" else "/dashboard.css"
            path = info["prefix"] + asset
        else:
            path = concrete(info.get("path") or info.get("formatter"))
        resp = await client.request(route.method, path, allow_redirects=False)
        if (route.method, path) in open_routes:
            assert resp.status == open_routes[route.method, path], (route.method, path)
            seen_open.add((route.method, path))
            continue
        if path in sign_in_pages:
            assert resp.status == 303, (route.method, path)
            assert resp.headers["Location"].startswith("/dashboard/login")
            checked += 1
            continue
        assert resp.status == 401, (route.method, path)
        if route.method != "HEAD":
            body = await resp.json()
            assert body["error"]["code"] == "unauthorized"
            assert "X-API-Key" in body["error"]["message"]
        checked += 1
    assert seen_open == set(open_routes)
    assert checked >= 12


async def test_the_right_key_opens_the_api_and_a_wrong_one_does_not(start_cylindria):
    client = await start_cylindria(api_key="s3cret")
    status, _ = await put_job(client, "k", workflows.quick(), headers={"X-API-Key": "s3cret"})
    assert status == 202
    resp = await client.get("/jobstatus/k/", headers={"X-API-Key": "wrong"})
    assert resp.status == 401
    assert "wrong" in (await resp.json())["error"]["message"]
    resp = await client.get("/jobstatus/k/", headers={"X-API-Key": "s3cret"})
    assert resp.status == 200


async def test_create_app_never_reads_the_environment(start_cylindria, start_sims, monkeypatch):
    monkeypatch.setenv("CYLINDRIA_API_KEY", "from-env")
    monkeypatch.setenv("COMFYUI_BASE_URL", "http://127.0.0.1:1")
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    assert (await client.get("/serverstatus")).status == 200
    assert client.app[GPUS][0].url == cluster.base_url


async def test_registry_is_the_one_on_the_app(start_cylindria):
    client = await start_cylindria()
    await put_job(client, "r", workflows.quick())
    assert client.app[REGISTRY].get("r") is not None


async def test_readyz_says_whether_a_gpu_can_take_a_job(start_cylindria, start_sims):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster, api_key="k")
    resp = await client.get("/readyz")  # open, like /healthz: no key
    assert resp.status == 200
    assert await resp.json() == {"status": "ready", "usable_gpus": [0, 1], "reasons": {}}
    assert (await client.post("/gpus/0/drain", headers={"X-API-Key": "k"})).status == 200
    await cluster.servers[1].close()

    async def not_ready():
        resp = await client.get("/readyz")
        return await resp.json() if resp.status == 503 else None
    body = await wait_until(not_ready, what="no usable GPU")
    assert body["status"] == "not_ready" and body["usable_gpus"] == []
    assert body["reasons"]["0"] == "drained"
    assert body["reasons"]["1"] in ("ComfyUI unreachable", "ComfyUI's event socket not connected")
    assert "127.0.0.1" not in str(body)
    healthz = await client.get("/healthz")
    assert healthz.status == 200
