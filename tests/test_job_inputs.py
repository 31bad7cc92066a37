"""Jobs that carry input files: every way in, dedup per GPU, late binding, retries,
restarts of Cylindria and of ComfyUI, and the failures on the way."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import zlib
from pathlib import Path

import aiohttp
import pytest
import ujson
from aiohttp import web

from cylindria.appkeys import INPUTS

import workflows
from helpers import job_status, put_job, wait_state, wait_until

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def png(seed: int, size: int = 8) -> bytes:
    """A small real PNG whose pixels depend on `seed`."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    row = bytes([0] + [(seed * 37 + x) % 256 for x in range(size * 3)])
    raw = row * size
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG."""
    found, at = {}, 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            found[key.decode("latin-1")] = value.decode("latin-1")
        at += 12 + length
    return found


async def source_of(client, job_id: str) -> str:
    """What the job's first output says it was made from (the simulator writes it)."""
    body = await wait_state(client, job_id, "completed", "failed", "rejected")
    assert body["state"] == "completed", body
    resp = await client.get(body["outputs"][0]["url"])
    assert resp.status == 200
    return png_text(await resp.read())["source_sha256"]


async def stored(client, data: bytes, name: str = "photo.png") -> dict:
    resp = await client.post("/inputs/", params={"name": name}, data=data,
                             headers={"Content-Type": "image/png"})
    assert resp.status in (200, 201), await resp.text()
    return (await resp.json())["inputs"][0]


async def put_form(client, job_id, workflow, files, gpu=None):
    form = aiohttp.FormData()
    form.add_field("workflow", ujson.dumps(workflow), content_type="application/json")
    for name, data in files.items():
        form.add_field("file", data, filename=name, content_type="image/png")
    params = {} if gpu is None else {"GpuId": str(gpu)}
    resp = await client.put(f"/startjob/{job_id}/", data=form, params=params)
    return resp.status, await resp.json()


def sim_holds(sim, data: bytes) -> bool:
    return any(p.is_file() and sha(p.read_bytes()) == sha(data)
               for p in sim.input_dir.rglob("*"))


async def file_server(aiohttp_server, files: dict[str, bytes]):
    """A loopback server for input URLs: /f/<name> serves a file, /to/<path> redirects."""
    async def serve(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files:
            return web.Response(status=404)
        return web.Response(body=files[name], content_type="image/png")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    app = web.Application()
    app.router.add_get("/f/{name}", serve)
    app.router.add_get("/to", redirect)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


# -- every way in -------------------------------------------------------------------------

async def test_each_way_in_brings_the_right_bytes_to_the_gpu(start_sims, start_cylindria,
                                                             aiohttp_server):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    pictures = [png(n) for n in range(4)]
    base = await file_server(aiohttp_server, {"four.png": pictures[3]})

    entry = await stored(client, pictures[0])
    status, body = await put_job(client, "by-ref", workflows.img2img(entry["ref"]), "auto")
    assert status == 202, body
    assert not body["detail"].startswith("Putting"), body  # says where the job is now

    status, body = await put_form(client, "by-form", workflows.img2img("mine.png"),
                                  {"mine.png": pictures[1]}, "auto")
    assert status == 202, body

    envelope = {"prompt": workflows.img2img("b64.png"),
                "inputs": {"b64.png": {"base64": base64.b64encode(pictures[2]).decode()}}}
    status, body = await put_job(client, "by-base64", envelope, "auto")
    assert status == 202, body

    envelope = {"prompt": workflows.img2img("url.png"),
                "inputs": {"url.png": {"url": f"{base}/f/four.png"}}}
    status, body = await put_job(client, "by-url", envelope, "auto")
    assert status == 202, body

    for job_id, data in zip(("by-ref", "by-form", "by-base64", "by-url"), pictures,
                            strict=True):
        assert await source_of(client, job_id) == sha(data), job_id
        job = await job_status(client, job_id)
        [listed] = job["inputs"]
        assert listed["id"] == f"sha256-{sha(data)}" and listed["size"] == len(data)
        assert listed["media_type"] == "image/png"
        assert (await (await client.get(listed["url"])).read()) == data
        assert sim_holds(cluster.sims[job["gpu_id"]], data)
        assert job["attempts"][-1]["upload_seconds"] >= 0
    assert (await job_status(client, "by-form"))["inputs"][0]["name"] == "mine.png"


async def test_a_thousand_jobs_over_one_picture_upload_it_once_per_gpu(start_sims,
                                                                       start_cylindria):
    cluster = await start_sims(4)
    client = await start_cylindria(cluster)
    pictures = [png(10 + n) for n in range(3)]
    refs = [(await stored(client, data, f"{n}.png"))["ref"] for n, data in
            enumerate(pictures)]
    jobs = [f"many-{n}" for n in range(48)]
    answers = await asyncio.gather(*(
        put_job(client, job_id, workflows.img2img(refs[n % 3], prefix=f"m{n}"), "auto")
        for n, job_id in enumerate(jobs)))
    assert all(status == 202 for status, _ in answers), answers
    used: dict[int, set[str]] = {}
    for job_id in jobs:
        body = await wait_state(client, job_id, "completed", timeout=20)
        used.setdefault(body["gpu_id"], set()).add(body["inputs"][0]["id"])
    assert len(used) > 1  # the work spread over GPUs
    for gpu, ids in used.items():
        assert cluster.sims[gpu].uploads == len(ids), (gpu, cluster.sims[gpu].uploads)
    metrics = await (await client.get("/metrics")).text()
    counted = sum(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("cylindria_input_uploads_total{"))
    assert counted == sum(len(ids) for ids in used.values())
    assert "cylindria_input_upload_bytes_total{" in metrics


# -- late binding, retries, restarts -------------------------------------------------------

async def test_a_held_job_takes_its_input_to_the_gpu_that_frees(start_sims, start_cylindria):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    for sim in cluster.sims:
        sim.pause(at="dequeue")
    for gpu in (0, 1):
        status, body = await put_job(client, f"busy-{gpu}", workflows.quick(), gpu)
        assert status == 202, body
    picture = png(20)
    status, body = await put_form(client, "late", workflows.img2img("late.png"),
                                  {"late.png": picture}, "auto")
    assert status == 202 and body["held"], body
    cluster.sims[1].resume()
    assert await source_of(client, "late") == sha(picture)
    assert (await job_status(client, "late"))["gpu_id"] == 1
    assert sim_holds(cluster.sims[1], picture) and not sim_holds(cluster.sims[0], picture)
    cluster.sims[0].resume()


async def test_a_retry_on_another_gpu_uploads_its_input_there(start_sims, start_cylindria):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    cluster.sims[0].pause(at="dequeue")
    picture = png(30)
    envelope = {"prompt": workflows.img2img("r.png"),
                "inputs": {"r.png": {"base64": base64.b64encode(picture).decode()}}}
    status, body = await put_job(client, "again", envelope, 0)
    assert status == 202, body
    assert (await client.post("/canceljob/again/")).status == 202
    await wait_state(client, "again", "cancelled")
    resp = await client.post("/retryjob/again/", params={"GpuId": "1"})
    assert resp.status == 202, await resp.text()
    assert await source_of(client, "again") == sha(picture)
    assert cluster.sims[1].uploads == 1
    cluster.sims[0].resume()


async def test_a_restart_between_acceptance_and_dispatch_keeps_the_input(
        start_sims, start_cylindria, tmp_path):
    cluster = await start_sims(1)
    state = tmp_path / "state.sqlite3"
    client = await start_cylindria(cluster, state_file=state)
    cluster.sims[0].pause(at="dequeue")
    status, body = await put_job(client, "busy", workflows.quick(), 0)
    assert status == 202, body
    picture = png(40)
    envelope = {"prompt": workflows.img2img("kept.png"),
                "inputs": {"kept.png": {"base64": base64.b64encode(picture).decode()}}}
    status, body = await put_job(client, "kept", envelope, "auto")
    assert status == 202 and body["held"], body
    assert cluster.sims[0].uploads == 0
    await client.close()

    client = await start_cylindria(cluster, state_file=state)
    assert (tmp_path / "state-inputs" / f"sha256-{sha(picture)}").exists()
    cluster.sims[0].resume()
    assert await source_of(client, "kept") == sha(picture)
    # The same job again is the same job: nothing is sent a second time.
    status, body = await put_job(client, "kept", envelope, "auto")
    assert status == 200, body
    other = {**envelope, "inputs": {"kept.png": {"base64": base64.b64encode(png(41))
                                                 .decode()}}}
    status, body = await put_job(client, "kept", other, "auto")
    assert status == 409 and body["error"]["code"] == "job_id_conflict", body


async def test_a_comfyui_restart_that_empties_its_inputs_gets_them_again(
        start_sims, start_cylindria):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    entry = await stored(client, png(50))
    status, body = await put_job(client, "before", workflows.img2img(entry["ref"]), 0)
    assert status == 202, body
    await wait_state(client, "before", "completed")
    assert sim.uploads == 1

    await sim.restart(wipe_inputs=True)
    await wait_until(lambda: client.app[INPUTS] is not None and sim.open_sockets > 0,
                     what="the listener to come back")
    status, body = await put_job(client, "after", workflows.img2img(entry["ref"],
                                                                    prefix="after"), 0)
    assert status == 202, body
    assert await source_of(client, "after") == entry["id"].removeprefix("sha256-")
    assert sim.uploads == 2


async def test_inputs_lost_without_a_restart_are_uploaded_again_once(start_sims,
                                                                     start_cylindria):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    entry = await stored(client, png(60))
    status, body = await put_job(client, "one", workflows.img2img(entry["ref"]), 0)
    assert status == 202, body
    await wait_state(client, "one", "completed")
    for path in sim.input_dir.rglob("*"):
        if path.is_file():
            path.unlink()
    status, body = await put_job(client, "two", workflows.img2img(entry["ref"],
                                                                  prefix="two"), 0)
    assert status == 202, body
    assert await source_of(client, "two") == entry["id"].removeprefix("sha256-")
    assert sim.uploads == 2


# -- failures on the way ----------------------------------------------------------------

async def test_an_upload_comfyui_refuses_is_a_failed_submission(start_sims, start_cylindria):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    entry = await stored(client, png(70))
    sim.fail_next(1, "/upload/image")
    status, body = await put_job(client, "pinned", workflows.img2img(entry["ref"]), 0)
    assert status == 502, body
    assert "upload" in body["detail"]
    assert (await job_status(client, "pinned"))["state"] == "rejected"

    sim.fail_next(1, "/upload/image")
    status, body = await put_job(client, "held", workflows.img2img(entry["ref"],
                                                                   prefix="h"), "auto")
    assert status == 202, body
    # Back in line after the refused upload, then sent again once the GPU rested.
    assert await source_of(client, "held") == entry["id"].removeprefix("sha256-")


async def test_input_urls_that_cannot_be_fetched_are_422_saying_why(
        start_sims, start_cylindria, aiohttp_server):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster, input_max=1000)
    base = await file_server(aiohttp_server, {"big.png": b"x" * 2000, "ok.png": png(1)})
    closed = aiohttp_server  # a port nothing listens on: the server is made and stopped
    gone = await closed(web.Application())
    dead = f"http://127.0.0.1:{gone.port}/x.png"
    await gone.close()
    cases = {
        f"{base}/f/missing.png": "HTTP 404",
        f"{base}/f/big.png": "more than 1000 bytes",
        dead: "could not be fetched",
        f"{base}/to?to={cluster.base_url}/view": "GPU 0's ComfyUI",
        "ftp://127.0.0.1/x.png": "not an http",
        f"http://user:pw@127.0.0.1:{gone.port}/x.png": "user name or password",
    }
    for n, (url, why) in enumerate(cases.items()):
        envelope = {"prompt": workflows.img2img("u.png"), "inputs": {"u.png": {"url": url}}}
        status, body = await put_job(client, f"url-{n}", envelope, 0)
        assert status == 422, (url, body)
        assert body["error"]["code"] == "input_unavailable", body
        assert "'u.png'" in body["error"]["message"] and why in body["error"]["message"], \
            (url, body["error"]["message"])
    assert cluster.sims[0].uploads == 0
    # Loopback is closed unless the operator's allow list opens it.
    shut = await start_cylindria(cluster, callback_allow=())
    envelope = {"prompt": workflows.img2img("u.png"),
                "inputs": {"u.png": {"url": f"{base}/f/ok.png"}}}
    status, body = await put_job(shut, "url-closed", envelope, 0)
    assert status == 422 and "loopback" in body["error"]["message"], body


@pytest.mark.parametrize("how", ["form", "base64"])
async def test_an_inline_input_over_the_cap_is_413_and_nothing_is_kept(start_cylindria, how):
    client = await start_cylindria(input_max=100)
    big = png(80, size=32)
    if how == "form":
        status, body = await put_form(client, "big", workflows.img2img("b.png"),
                                      {"b.png": big})
    else:
        envelope = {"prompt": workflows.img2img("b.png"),
                    "inputs": {"b.png": {"base64": base64.b64encode(big).decode()}}}
        status, body = await put_job(client, "big", envelope)
    assert status == 413, body
    assert body["error"]["code"] == "payload_too_large"
    assert len(client.app[INPUTS]) == 0
    assert (await client.get("/jobstatus/big/")).status == 404


async def test_the_documented_img2img_and_inpainting_examples_run(start_sims, start_cylindria):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    examples = EXAMPLES
    photo = (examples / "photo.png").read_bytes()
    mask = (examples / "mask.png").read_bytes()
    img2img = ujson.loads((examples / "img2img.json").read_text())
    inpaint = ujson.loads((examples / "inpaint.json").read_text())
    status, body = await put_form(client, "doc-img2img", img2img, {"photo.png": photo},
                                  "auto")
    assert status == 202, body
    status, body = await put_form(client, "doc-inpaint", inpaint,
                                  {"photo.png": photo, "mask.png": mask}, "auto")
    assert status == 202, body
    assert await source_of(client, "doc-img2img") == sha(photo)
    assert await source_of(client, "doc-inpaint") == ",".join(sorted((sha(photo),
                                                                      sha(mask))))
    names = [i["name"] for i in (await job_status(client, "doc-inpaint"))["inputs"]]
    assert sorted(names) == ["mask.png", "photo.png"]
