"""The input store's routes: uploads, dedup, reading back, deleting, and every bad input."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import aiohttp
import pytest
import ujson

from cylindria.appkeys import INPUTS

import workflows
from helpers import with_timing

PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                    "0000000d4944415478da63f8cfc0f01f0005000201a5b1b7d50000000049454e44ae426082")


def ident(data: bytes) -> str:
    return "sha256-" + hashlib.sha256(data).hexdigest()


async def upload(client, data: bytes, media_type: str = "image/png", name: str = "a.png"):
    resp = await client.post("/inputs/", params={"name": name}, data=data,
                             headers={"Content-Type": media_type})
    return resp.status, await resp.json()


async def test_an_upload_is_stored_once_by_its_content(start_cylindria):
    client = await start_cylindria()
    status, body = await upload(client, PNG, name="photo.png")
    assert status == 201, body
    [entry] = body["inputs"]
    assert entry == {"id": ident(PNG), "size": len(PNG), "media_type": "image/png",
                     "name": "photo.png", "url": f"/inputs/{ident(PNG)}",
                     "ref": f"cylindria:{ident(PNG)}"}
    status, again = await upload(client, PNG, name="other-name.png")
    assert status == 200 and again["inputs"][0]["id"] == entry["id"]
    assert len(client.app[INPUTS]) == 1
    resp = await client.get(entry["url"])
    assert resp.status == 200 and await resp.read() == PNG
    assert resp.headers["Content-Type"] == "image/png"
    assert resp.headers["Content-Disposition"].startswith('inline; filename="photo.png"')


async def test_a_multipart_form_stores_each_file(start_cylindria):
    client = await start_cylindria()
    form = aiohttp.FormData()
    form.add_field("file", PNG, filename="one.png", content_type="image/png")
    form.add_field("file", b"RIFF....WAVEfmt ", filename="two.wav")
    resp = await client.post("/inputs/", data=form)
    body = await resp.json()
    assert resp.status == 201, body
    assert [(e["name"], e["media_type"]) for e in body["inputs"]] == [
        ("one.png", "image/png"), ("two.wav", "audio/x-wav")]
    resp = await client.get(body["inputs"][1]["url"])
    assert await resp.read() == b"RIFF....WAVEfmt "


async def test_deleting_an_input(start_cylindria):
    client = await start_cylindria()
    _, body = await upload(client, PNG)
    url = body["inputs"][0]["url"]
    assert (await client.delete(url)).status == 204
    resp = await client.get(url)
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "input_not_found"
    assert (await client.delete(url)).status == 404
    assert (await client.get("/inputs/..%2F..%2Fetc%2Fpasswd")).status == 404


async def test_a_job_in_flight_keeps_its_input(start_sims, start_cylindria):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    cluster.sims[0].pause(at="dequeue")
    _, body = await upload(client, PNG)
    entry = body["inputs"][0]
    resp = await client.put("/startjob/keep/", data=ujson.dumps(
        workflows.img2img(entry["ref"])))
    assert resp.status == 202, await resp.text()
    resp = await client.delete(entry["url"])
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "input_in_use"
    cluster.sims[0].resume()


# -- bad input -------------------------------------------------------------------------

async def test_an_upload_without_a_content_type_is_415(start_cylindria):
    client = await start_cylindria()
    for headers in ({}, {"Content-Type": "application/x-www-form-urlencoded"},
                    {"Content-Type": "multipart/mixed; boundary=x"}):
        resp = await client.post("/inputs/", data=PNG, headers=headers,
                                 skip_auto_headers=["Content-Type"])
        body = await resp.json()
        assert resp.status == 415, (headers, body)
        assert body["error"]["code"] == "unsupported_media_type"
        assert "Content-Type" in body["error"]["message"] or "multipart" in \
            body["error"]["message"]


async def test_a_file_over_the_cap_is_413_before_it_is_read(start_cylindria):
    client = await start_cylindria(input_max=1000)
    status, body = await upload(client, b"x" * 1001)
    assert status == 413 and body["error"]["code"] == "payload_too_large", body
    # Chunked, with no length to refuse it by: refused once the cap is passed.

    async def stream():
        for _ in range(10):
            yield b"y" * 300

    resp = await client.post("/inputs/", data=stream(), headers={"Content-Type": "image/png"})
    assert resp.status == 413
    assert len(client.app[INPUTS]) == 0
    assert not list((client.app[INPUTS].directory / "incoming").glob("*"))


async def test_names_that_escape_a_folder_are_refused(start_cylindria):
    client = await start_cylindria()
    for name in ("../up.png", "a/b.png", "..", "a\\b.png", "x\x01.png",
                 "cylindria:sha256-00"):
        status, body = await upload(client, PNG, name=name)
        assert status == 422, (name, body)
        assert body["error"]["code"] == "invalid_input"
    # Written by hand: aiohttp's form would quote the slashes.
    form = (b"--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"../../etc/x.png\""
            b"\r\nContent-Type: image/png\r\n\r\n" + PNG + b"\r\n--b--\r\n")
    resp = await client.post("/inputs/", data=form,
                             headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert resp.status == 422, await resp.text()
    assert len(client.app[INPUTS]) == 0


async def test_raw_non_ascii_bytes_in_a_name_header_are_a_clean_answer(start_cylindria):
    client = await start_cylindria()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"POST /inputs/ HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                 b"Content-Disposition: attachment; filename=\"\xff\xfe.png\"\r\n"
                 b"Content-Length: 4\r\nConnection: close\r\n\r\nabcd")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    status = int(answer.split(b" ", 2)[1])
    assert status in (201, 400, 422), answer[:300]


async def test_a_form_that_is_not_files_is_400(start_cylindria):
    client = await start_cylindria()
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("note", "just text")
    resp = await client.post("/inputs/", data=form)
    assert resp.status == 400, await resp.text()
    form = aiohttp.FormData()
    form.add_field("f", PNG, filename="same.png", content_type="image/png")
    form.add_field("g", b"other", filename="same.png", content_type="image/png")
    resp = await client.post("/inputs/", data=form)
    assert resp.status == 400
    assert "same.png" in (await resp.json())["error"]["message"]


async def test_a_client_that_goes_away_mid_upload_leaves_nothing(serve):
    served = await serve()
    _reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"POST /inputs/?name=cut.png HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: image/png\r\nContent-Length: 5000000\r\n\r\n")
    writer.write(b"z" * 2_000_000)
    await writer.drain()
    store = served.app[INPUTS]
    incoming = store.directory / "incoming"

    def arrived() -> bool:
        return any(p.stat().st_size > 0 for p in incoming.glob("*.part"))
    for _ in range(500):
        if incoming.exists() and arrived():
            break
        await asyncio.sleep(0.01)
    writer.close()
    for _ in range(500):
        if not list(incoming.glob("*")):
            break
        await asyncio.sleep(0.01)
    assert not list(incoming.glob("*")) and len(store) == 0


async def test_a_body_that_stops_arriving_is_408(serve):
    served = await serve(timing=with_timing(body_idle_timeout=0.3))
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"POST /inputs/?name=slow.png HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: image/png\r\nContent-Length: 1000\r\n\r\nabc")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body_timeout" in answer
    assert len(served.app[INPUTS]) == 0


@pytest.mark.parametrize("size", [0, 7])
async def test_the_store_evicts_the_least_recently_used(start_cylindria, size):
    client = await start_cylindria(input_max=200, input_store_max=250)
    first = [(await upload(client, bytes([n]) * 100 + bytes(size), name=f"{n}.bin",
                           media_type="application/octet-stream"))[1]["inputs"][0]
             for n in range(2)]
    # Using the first makes the second the least recently used.
    client.app[INPUTS].touch([first[0]["id"]])
    status, body = await upload(client, b"\x09" * 100, name="third.bin",
                                media_type="application/octet-stream")
    assert status == 201, body
    assert first[0]["id"] in client.app[INPUTS]
    assert first[1]["id"] not in client.app[INPUTS]


async def test_the_store_full_of_inputs_in_use_is_507(start_sims, start_cylindria):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster, input_max=100, input_store_max=150)
    cluster.sims[0].pause(at="dequeue")
    _, body = await upload(client, b"\x01" * 100, name="a.png")
    ref = body["inputs"][0]["ref"]
    resp = await client.put("/startjob/holds/", data=ujson.dumps(workflows.img2img(ref)))
    assert resp.status == 202, await resp.text()
    status, body = await upload(client, b"\x02" * 100, name="b.png")
    assert status == 507, body
    assert body["error"]["code"] == "input_store_full"
    cluster.sims[0].resume()


async def test_a_reference_to_no_stored_input_is_422_naming_node_and_input(start_cylindria):
    client = await start_cylindria()
    missing = "cylindria:" + ident(b"never uploaded")
    resp = await client.put("/startjob/unknown/", data=ujson.dumps(
        workflows.img2img(missing)))
    body = await resp.json()
    assert resp.status == 422, body
    assert body["error"]["code"] == "unknown_input"
    assert body["error"]["node_id"] == "1" and body["error"]["input_name"] == "image"
    assert "POST /inputs/" in body["error"]["message"]
    assert (await client.get("/jobstatus/unknown/")).status == 404


async def test_bad_base64_and_bad_inputs_objects_are_422(start_cylindria):
    client = await start_cylindria()
    cases = [
        {"photo.png": {"base64": "not base64!"}},
        {"photo.png": {"base64": ""}},
        {"photo.png": {"file": "x"}},
        {"photo.png": "abc"},
        {"../photo.png": {"base64": base64.b64encode(PNG).decode()}},
        [],
    ]
    for n, inputs in enumerate(cases):
        body = {"prompt": workflows.img2img("photo.png"), "inputs": inputs}
        resp = await client.put(f"/startjob/b64-{n}/", data=ujson.dumps(body))
        answer = await resp.json()
        assert resp.status == 422, (inputs, answer)
        assert answer["error"]["code"] == "invalid_input"
    assert len(client.app[INPUTS]) == 0


async def test_an_input_no_node_uses_is_422(start_cylindria):
    client = await start_cylindria()
    body = {"prompt": workflows.quick(),
            "inputs": {"photo.png": {"base64": base64.b64encode(PNG).decode()}}}
    resp = await client.put("/startjob/unused/", data=ujson.dumps(body))
    answer = await resp.json()
    assert resp.status == 422 and "no node uses it" in answer["error"]["message"], answer


async def test_a_multipart_job_without_a_workflow_or_with_two_is_400(start_cylindria):
    client = await start_cylindria()
    form = aiohttp.FormData()
    form.add_field("photo", PNG, filename="photo.png", content_type="image/png")
    resp = await client.put("/startjob/noflow/", data=form)
    answer = await resp.json()
    assert resp.status == 400 and "'workflow'" in answer["error"]["message"], answer
    form = aiohttp.FormData()
    for _ in range(2):
        form.add_field("workflow", ujson.dumps(workflows.img2img("photo.png")),
                       content_type="application/json")
    form.add_field("photo", PNG, filename="photo.png", content_type="image/png")
    resp = await client.put("/startjob/twoflows/", data=form)
    assert resp.status == 400, await resp.text()
    form = aiohttp.FormData()
    form.add_field("workflow", ujson.dumps(workflows.img2img("photo.png")))
    form.add_field("photo", PNG, filename="photo.png", content_type="image/png")
    form.add_field("again", PNG, filename="photo.png", content_type="image/png")
    resp = await client.put("/startjob/twofiles/", data=form)
    assert resp.status == 400, await resp.text()
    resp = await client.put("/startjob/mixed/", data=b"--x--",
                            headers={"Content-Type": "multipart/mixed; boundary=x"})
    assert resp.status == 415, await resp.text()


async def test_a_part_with_raw_bytes_in_its_headers_is_400(start_cylindria):
    client = await start_cylindria()
    body = (b'--B\r\nContent-Disposition: form-data; name="]\xc3\xbc\x02Q\x0f3"\r\n\r\n'
            b"M\xffl|\r\n--B\r\nContent-Disposition: form-data; name=\"workflow\"\r\n\r\n("
            b"\r\n--B--\r\n")
    for path in ("/startjob/raw-bytes/", "/inputs/"):
        method = client.put if path.startswith("/startjob") else client.post
        resp = await method(path, data=body,
                            headers={"Content-Type": "multipart/form-data; boundary=B"})
        answer = await resp.json()
        assert resp.status == 400, answer
        assert "multipart form could not be read" in answer["error"]["message"]


async def test_more_inputs_than_a_job_may_carry_are_refused(start_cylindria):
    client = await start_cylindria()
    many = {f"{n}.png": {"base64": base64.b64encode(b"x").decode()} for n in range(65)}
    resp = await client.put("/startjob/many/", data=ujson.dumps(
        {"prompt": workflows.img2img("0.png"), "inputs": many}))
    answer = await resp.json()
    assert resp.status == 422 and "at most 64" in answer["error"]["message"], answer
    form = aiohttp.FormData()
    for n in range(65):
        form.add_field("f", b"x", filename=f"{n}.png", content_type="image/png")
    resp = await client.post("/inputs/", data=form)
    assert resp.status == 400 and "more than 64" in (await resp.json())["error"]["message"]
    assert len(client.app[INPUTS]) == 1  # the same byte, stored once before the refusal
