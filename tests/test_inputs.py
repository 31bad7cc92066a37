"""Odd and large inputs: every one gets a clear 4xx or goes through, none a 500."""

from __future__ import annotations

import gzip
import io

import pytest
import ujson

from cylindria.appkeys import GPUS, REGISTRY
from cylindria.web import render

import workflows
from helpers import job_status, put_job, wait_state, wait_until


async def put_raw(client, job_id, data, headers=None):
    if isinstance(data, str):
        data = data.encode()
    resp = await client.put(f"/startjob/{job_id}/", data=io.BytesIO(data), headers=headers)
    return resp.status, await resp.json()


async def test_a_body_that_is_not_what_its_encoding_says_is_400(start_cylindria):
    client = await start_cylindria()
    status, body = await put_raw(client, "b21", b"not gzip at all",
                                 {"Content-Encoding": "gzip"})
    assert status == 400, body
    assert "Content-Encoding" in body["detail"] and body["accepted"] is False
    packed = gzip.compress(ujson.dumps(workflows.quick()).encode())
    status, body = await put_raw(client, "b22", packed, {"Content-Encoding": "gzip"})
    assert status == 202, body
    status, body = await put_raw(client, "b21", b"not gzip either",
                                 {"Content-Encoding": "deflate"})
    assert status == 400, body


async def test_a_lone_surrogate_is_400(start_cylindria):
    client = await start_cylindria()
    raw = b'{"\\ud800": {"class_type": "EmptyImage", "inputs": {}}}'
    status, body = await put_raw(client, "surrogate", raw)
    assert status == 400 and "surrogate" in body["detail"]
    raw = b'{"1": {"class_type": "EmptyImage", "inputs": {"x": "\\udfff"}}}'
    assert (await put_raw(client, "surrogate", raw))[0] == 400


async def test_deep_nesting_and_huge_numbers_are_answered(start_cylindria):
    client = await start_cylindria()
    deep = b"[" * 100_000 + b"]" * 100_000
    status, body = await put_raw(client, "deep", deep)
    assert status == 400 and "JSON" in body["detail"]
    workflow = workflows.quick()
    workflow["1"]["inputs"]["color"] = 10 ** 400
    status, body = await put_raw(client, "huge", ujson.dumps(workflow))
    assert status in (202, 422), body  # ComfyUI's validation decides


async def test_too_many_nodes_is_413_and_recorded(start_cylindria):
    client = await start_cylindria()
    graph = {str(n): {"class_type": "EmptyImage", "inputs": {}} for n in range(20_001)}
    status, body = await put_raw(client, "huge-graph", ujson.dumps(graph))
    assert status == 413, body
    assert body["error"]["code"] == "too_many_nodes" and "20000" in body["detail"]
    recorded = await job_status(client, "huge-graph")
    assert recorded["state"] == "rejected" and recorded["gpu_id"] is None
    assert recorded["error"]["code"] == "too_many_nodes"


async def test_workflows_refused_before_comfyui_are_recorded_and_can_be_replaced(
        start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    status, _ = await put_job(client, "ui", workflows.UI_EXPORT)
    assert status == 422
    recorded = await job_status(client, "ui")
    assert recorded["state"] == "rejected" and "Export (API)" in recorded["detail"]
    assert (await client.post("/retryjob/ui/")).status == 409
    status, _ = await put_job(client, "ui", workflows.quick())
    assert status == 202
    await wait_state(client, "ui", "completed")
    assert cluster.count(0, "POST", "/prompt") == 1


async def test_a_refused_body_never_replaces_an_accepted_job(start_cylindria):
    client = await start_cylindria()
    await put_job(client, "kept", workflows.quick())
    done = await wait_state(client, "kept", "completed")
    status, _ = await put_job(client, "kept", {"1": {"inputs": {}}})
    assert status == 422
    assert await job_status(client, "kept") == done


async def test_a_large_workflow_is_read_off_the_loop_and_runs(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    workflow = {"prompt": workflows.quick(),
                "extra_data": {"extra_pnginfo": {"note": "ü" * 600_000}}}
    status, body = await put_raw(client, "large", ujson.dumps(workflow))
    assert status == 202, body
    await wait_state(client, "large", "completed")
    # The same workflow with its keys in another order is the same job.
    again = {"extra_data": workflow["extra_data"], "prompt": dict(reversed(
        list(workflow["prompt"].items())))}
    status, body = await put_raw(client, "large", ujson.dumps(again))
    assert status == 200, body
    (sent,) = [entry for entry in cluster.sims[0].history.values()]
    # Sent to ComfyUI in slices (it is over 1 MiB), and whole.
    assert sent["prompt"][3]["extra_pnginfo"]["note"] == "ü" * 600_000


@pytest.mark.parametrize("way", ["socket", "history"])
async def test_a_large_text_output_arrives_whole_and_is_kept(start_cylindria, start_sims,
                                                             tmp_path, way):
    """A 6 MiB text crosses every large path: the body read in chunks and decoded in the
    worker, sent on in slices; ComfyUI's frame (or its /history answer, read in chunks)
    decoded in the worker; the journal's sliced encoding; and a restart."""
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    state = tmp_path / "state.sqlite3"
    client = await start_cylindria(cluster, state_file=state)
    text = "ß" * (3 << 20)
    workflow = {"1": {"class_type": "PreviewAny", "inputs": {"source": text}}}
    if way == "history":
        sim.pause(at="dequeue")
    status, _ = await put_raw(client, "talky", ujson.dumps(workflow))
    assert status == 202
    if way == "history":
        sim.refuse_websockets(True)
        await sim.drop_sockets()
        await wait_until(lambda: not client.app[GPUS][0].listener_connected,
                         what="the listener to go")
        sim.resume()
    body = await wait_state(client, "talky", "completed", timeout=20)
    assert body["outputs"][0]["truncated"] is True
    sim.refuse_websockets(False)
    for _ in range(2):
        resp = await client.get("/joboutput/talky/0")
        assert resp.status == 200 and await resp.text() == text
        await client.close()
        client = await start_cylindria(cluster, state_file=state)


async def test_a_chunked_body_over_the_limit_is_413(start_cylindria):
    client = await start_cylindria()

    async def chunks():
        for _ in range(33):
            yield b" " * (1 << 20)

    resp = await client.put("/startjob/endless/", data=chunks())
    assert resp.status == 413
    assert "32 MiB" in (await resp.json())["detail"]


async def test_long_text_outputs_are_cut_in_status_bodies(start_cylindria):
    client = await start_cylindria()
    registry = client.app[REGISTRY]
    job = registry.begin("talky", 0, "p-talky", "fp", ["1"])
    registry.confirm(job)
    text = "é" * 100_000
    registry.on_executed("p-talky", "1", {"text": [text, "short"]})
    registry.on_success("p-talky")
    body = await job_status(client, "talky")
    long_entry, short_entry = body["outputs"]
    assert long_entry["truncated"] is True and long_entry["url"] == "/joboutput/talky/0"
    assert len(long_entry["text"].encode()) <= render.TEXT_INLINE_BYTES
    assert text.startswith(long_entry["text"]) and len(long_entry["text"]) > 30_000
    assert short_entry == {"node_id": "1", "kind": "text", "text": "short"}
    resp = await client.get("/joboutput/talky/0")
    assert resp.status == 200 and await resp.text() == text


async def test_pages_of_jobs_are_bounded_in_bytes(start_cylindria, monkeypatch):
    monkeypatch.setattr(render, "PAGE_BYTES", 3000)
    client = await start_cylindria()
    registry = client.app[REGISTRY]
    for n in range(6):
        job = registry.begin(f"p{n}", 0, f"prompt-{n}", "fp", ["1"])
        registry.reject(job, "x" * 1000)
    first = await (await client.get("/jobs/", params={"limit": "6"})).json()
    assert 1 <= len(first["jobs"]) < 6 and first["next_before"] is not None
    seen = [j["job_id"] for j in first["jobs"]]
    while first["next_before"] is not None:
        first = await (await client.get("/jobs/", params={
            "limit": "6", "before": str(first["next_before"])})).json()
        seen += [j["job_id"] for j in first["jobs"]]
    assert seen == [f"p{n}" for n in range(5, -1, -1)]


async def test_the_node_limit_is_a_setting(start_cylindria):
    client = await start_cylindria(max_nodes=2)
    status, body = await put_job(client, "three", workflows.quick())
    assert status == 413 and "at most 2" in body["detail"]


async def test_a_job_refused_before_any_gpu_survives_a_restart(start_cylindria, start_sims,
                                                               tmp_path):
    cluster = await start_sims(1)
    state = tmp_path / "state.sqlite3"
    client = await start_cylindria(cluster, state_file=state)
    status, _ = await put_job(client, "nodeless", {"1": {"inputs": {}}})
    assert status == 422
    await client.close()
    client = await start_cylindria(cluster, state_file=state)
    recorded = await job_status(client, "nodeless")
    assert recorded["state"] == "rejected" and recorded["gpu_id"] is None
