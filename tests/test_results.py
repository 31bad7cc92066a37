"""Job outputs: the normalised list, and files streamed from ComfyUI through Cylindria."""

from __future__ import annotations

import os
import tracemalloc

import workflows
from helpers import job_status, put_job, wait_state


async def test_outputs_have_urls_that_serve_the_png(start_cylindria):
    client = await start_cylindria()
    await put_job(client, "pic", workflows.quick())
    body = await wait_state(client, "pic", "completed")
    (entry,) = body["outputs"]
    resp = await client.get(entry["url"])
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "image/png"
    assert entry["filename"] in resp.headers["Content-Disposition"]
    data = await resp.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int(resp.headers["Content-Length"]) == len(data)


async def test_range_requests_pass_through(start_cylindria):
    client = await start_cylindria()
    await put_job(client, "ranged", workflows.quick())
    body = await wait_state(client, "ranged", "completed")
    url = body["outputs"][0]["url"]
    whole = await (await client.get(url)).read()
    resp = await client.get(url, headers={"Range": "bytes=4-11"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 4-11/{len(whole)}"
    assert await resp.read() == whole[4:12]


async def test_cached_rerun_reports_reused_outputs(start_cylindria):
    client = await start_cylindria()
    wf = workflows.quick(color=777)
    await put_job(client, "orig", wf)
    first = await wait_state(client, "orig", "completed")
    await put_job(client, "again", wf)
    second = await wait_state(client, "again", "completed")
    assert first["outputs_reused"] is False
    assert second["outputs_reused"] is True and second["progress"] == 1.0
    assert [o["filename"] for o in second["outputs"]] == [o["filename"] for o in first["outputs"]]
    assert [e["filename"] for e in second["outputs"]] == [e["filename"] for e in first["outputs"]]
    assert second["outputs"][0]["url"] == "/joboutput/again/0"
    assert (await client.get(second["outputs"][0]["url"])).status == 200


async def test_text_outputs_carry_text(start_cylindria):
    client = await start_cylindria()
    wf = {"1": {"class_type": "PreviewAny", "inputs": {"source": "hello from a node"}}}
    await put_job(client, "text", wf)
    body = await wait_state(client, "text", "completed")
    assert body["outputs"] == [{"node_id": "1", "kind": "text", "text": "hello from a node"}]
    resp = await client.get("/joboutput/text/0")
    assert resp.status == 200 and await resp.text() == "hello from a node"


async def test_unknown_index_and_job_are_404_and_odd_indexes_400(start_cylindria):
    client = await start_cylindria()
    await put_job(client, "few", workflows.quick())
    await wait_state(client, "few", "completed")
    for url in ("/joboutput/few/1", "/joboutput/nobody/0"):
        resp = await client.get(url)
        assert resp.status == 404, url
        assert (await resp.json())["error"]["code"] in ("output_not_found", "job_not_found")
    for index in ("x", "%C2%B2", "+0", "00", "%EF%BC%90", "-0", "9" * 5000):
        resp = await client.get(f"/joboutput/few/{index}")
        assert resp.status == 400, index
        assert "plain digits" in (await resp.json())["error"]["message"]


async def test_comfyui_gone_is_502(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    await put_job(client, "orphan", workflows.quick())
    await wait_state(client, "orphan", "completed")
    await cluster.servers[0].close()
    resp = await client.get("/joboutput/orphan/0")
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "backend_unavailable"


async def test_output_needs_the_key(start_cylindria):
    client = await start_cylindria(api_key="k")
    await put_job(client, "locked", workflows.quick(), headers={"X-API-Key": "k"})
    assert (await client.get("/joboutput/locked/0")).status == 401


async def test_large_output_streams_with_bounded_memory(start_cylindria, start_sims):
    """A 384 MiB file crosses Cylindria in chunks: Python's peak allocation stays small."""
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    await put_job(client, "huge", workflows.quick())
    body = await wait_state(client, "huge", "completed")
    entry = body["outputs"][0]
    path = cluster.sims[0].output_dir / entry["subfolder"] / entry["filename"]
    size = 384 * 1024 * 1024
    os.truncate(path, size)  # sparse: no disk cost, real bytes on the wire
    tracemalloc.start()
    try:
        resp = await client.get(entry["url"])
        assert resp.status == 200
        assert int(resp.headers["Content-Length"]) == size
        received = 0
        async for chunk in resp.content.iter_chunked(1024 * 1024):
            received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        os.truncate(path, 0)
    assert received == size
    assert peak < 48 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    assert (await job_status(client, "huge"))["state"] == "completed"
