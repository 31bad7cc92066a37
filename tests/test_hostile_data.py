"""Data an attacker or a faulty ComfyUI sends: NaN and Infinity, job ids made of dots,
retries without end. Every answer stays JSON that strict parsers read, and small."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from cylindria.core.answers import parse_frame
from cylindria.core.records import ATTEMPTS_SHOWN
from cylindria.jsonio import dumps, pretty

import workflows
from helpers import put_job, wait_state, wait_until, webhook_receiver, webhook_state


def strict(text: str | bytes) -> Any:
    """JSON as JavaScript's JSON.parse and Go read it: NaN and Infinity are errors."""
    def refuse(word: str) -> None:
        raise AssertionError(f"{word} is not JSON")
    return json.loads(text, parse_constant=refuse)


# What ComfyUI's Python writes for a bad value it was sent: bare NaN and Infinity.
NODE_ERRORS = {"1": {"errors": [{"type": "value_bigger_than_max", "message": "Value too big",
                                 "details": "color",
                                 "extra_info": {"input_name": "color",
                                                "received_value": math.nan,
                                                "bounds": [-math.inf, math.inf]}}],
                     "dependent_outputs": ["3"], "class_type": "EmptyImage"}}


@web.middleware
async def refuses_with_nan(request: web.Request, handler: Any) -> web.StreamResponse:
    """ComfyUI refusing every workflow, naming the bad value as Python's json writes it."""
    if request.method == "POST" and request.path in ("/prompt", "/api/prompt"):
        await request.read()
        text = json.dumps({"error": {"type": "prompt_outputs_failed_validation",
                                     "message": "Prompt outputs failed validation",
                                     "details": "", "extra_info": {}},
                           "node_errors": NODE_ERRORS})
        assert "NaN" in text and "-Infinity" in text
        return web.Response(status=400, text=text, content_type="application/json")
    return await handler(request)


@web.middleware
async def accepts_with_nan(request: web.Request, handler: Any) -> web.StreamResponse:
    """ComfyUI taking a workflow but reporting node errors that hold NaN and Infinity."""
    resp = await handler(request)
    if request.method == "POST" and request.path in ("/prompt", "/api/prompt"):
        answer = json.loads(resp.body)
        answer["node_errors"] = NODE_ERRORS
        return web.Response(status=resp.status, text=json.dumps(answer),
                            content_type="application/json")
    return resp


async def first_event(client, job_id: str) -> bytes:
    """The data of the first `job` event for `job_id`, replayed from the start."""
    resp = await client.get("/events/", params={"job_id": job_id},
                            headers={"Last-Event-ID": "0"})
    assert resp.status == 200
    try:
        async with asyncio.timeout(5):
            event = ""
            while True:
                line = (await resp.content.readline()).decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "job":
                    return line[6:].encode()
    finally:
        resp.close()


def journal_record(path: Path, job_id: str) -> str | None:
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT record FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return None if row is None else row[0]


def received_value(body: dict[str, Any]) -> Any:
    return body["node_errors"]["1"]["errors"][0]["extra_info"]["received_value"]


async def test_nan_from_comfyui_leaves_as_a_word_everywhere(start_cylindria, start_sims,
                                                            tmp_path):
    cluster = await start_sims(1, middlewares=(refuses_with_nan,))
    state = tmp_path / "state.sqlite3"
    client = await start_cylindria(cluster, state_file=state)
    resp = await client.put("/startjob/nan-2/", data=dumps(workflows.quick()))
    assert resp.status == 422
    refusal = strict(await resp.read())
    assert received_value(refusal) == "NaN"
    assert refusal["node_errors"]["1"]["errors"][0]["extra_info"]["bounds"] == [
        "-Infinity", "Infinity"]

    status = strict(await (await client.get("/jobstatus/nan-2/")).read())
    assert status["state"] == "rejected" and received_value(status) == "NaN"
    page = strict(await (await client.get("/jobs/")).read())
    assert received_value(page["jobs"][0]) == "NaN"
    assert received_value(strict(await first_event(client, "nan-2"))) == "NaN"
    feed = strict(await (await client.get("/dashboard/job/nan-2/state")).read())
    assert received_value(feed["status"]) == "NaN"
    assert received_value(strict(feed["status_json"])) == "NaN"
    assert '"received_value": "NaN"' in feed["node_errors"]["raw"]
    html = await (await client.get("/dashboard/job/nan-2")).text()
    assert "received_value&#34;: &#34;NaN&#34;" in html
    # The state file holds the word too: nothing non-finite was kept.
    record = await wait_until(lambda: journal_record(state, "nan-2"), what="the record")
    assert received_value(strict(record)) == "NaN"


async def test_nan_in_an_accepted_job_reaches_its_webhook_as_a_word(start_cylindria,
                                                                    start_sims,
                                                                    aiohttp_server):
    cluster = await start_sims(1, middlewares=(accepts_with_nan,))
    url, calls = await webhook_receiver(aiohttp_server, fail_first=0)
    client = await start_cylindria(cluster)
    resp = await client.put("/startjob/hooked/", data=dumps(workflows.quick()),
                            headers={"X-Callback-Url": url})
    assert resp.status == 202
    assert received_value(strict(await resp.read())) == "NaN"
    await wait_state(client, "hooked", "completed")
    await wait_until(lambda: webhook_state(client, "hooked", "delivered"), what="delivery")
    sent = strict(calls[0][0])
    assert sent["state"] == "completed" and received_value(sent) == "NaN"


@pytest.mark.parametrize("written", ["NaN", "Infinity", "-Infinity", "1e999", "-1E400"])
async def test_a_workflow_holding_nan_or_infinity_is_400(start_cylindria, start_sims,
                                                         written):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    text = dumps(workflows.quick(color=7)).replace('"color":7', f'"color":{written}')
    assert written in text
    resp = await client.put("/startjob/nan-2/", data=text)
    assert resp.status == 400
    body = strict(await resp.read())
    error = body["error"]
    assert error["code"] == "bad_request"
    assert (error["node_id"], error["input_name"]) == ("1", "color")
    assert "Node '1' (EmptyImage) input 'color' holds" in error["message"]
    assert "Send a finite number" in error["message"]
    word = "NaN" if written == "NaN" else "-Infinity" if written[0] == "-" else "Infinity"
    assert error["value"] == word
    # Refused before anything was kept or sent on.
    assert cluster.count(0, "POST", "/prompt") == 0
    assert (await client.get("/jobstatus/nan-2/")).status == 404


async def test_non_finite_numbers_elsewhere_in_the_body_are_named(start_cylindria):
    client = await start_cylindria()
    workflow = workflows.quick()
    text = dumps({"prompt": workflow, "extra_data": {"extra_pnginfo": {"x": [1]}}})
    resp = await client.put("/startjob/deep/", data=text.replace("[1]", "[1,NaN]"))
    assert resp.status == 400
    assert "'extra_data' holds NaN" in strict(await resp.read())["error"]["message"]
    workflow["2"]["_meta"] = {"title": "x", "scale": 2.0}
    resp = await client.put("/startjob/deep/",
                            data=dumps(workflow).replace("2.0", "Infinity"))
    error = strict(await resp.read())["error"]
    assert resp.status == 400 and error["node_id"] == "2"
    assert "Node '2' (ImageInvert) field '_meta' holds Infinity" in error["message"]


def test_the_encoder_writes_no_nan_and_keeps_its_fast_path():
    # A record from an older state file may still hold a NaN.
    legacy = {"progress": math.nan, "deep": [{"x": (math.inf, -math.inf)}], "url": "/a/b"}
    assert strict(dumps(legacy)) == {"progress": "NaN", "url": "/a/b",
                                     "deep": [{"x": ["Infinity", "-Infinity"]}]}
    assert strict(pretty(legacy))["progress"] == "NaN"
    assert dumps({"url": "/joboutput/x/0", "n": 2**70}) == (
        '{"url":"/joboutput/x/0","n":1180591620717411303424}')


def test_frames_from_comfyui_come_in_with_words_for_nan():
    kind, data = parse_frame(b'{"type": "progress", "data": {"value": NaN, "max": '
                             b'Infinity, "node": "3", "prompt_id": "p"}}')
    assert kind == "progress" and (data["value"], data["max"]) == ("NaN", "Infinity")
    # A frame without them is taken as it is.
    assert parse_frame(b'{"type": "status", "data": {"x": 1.5}}') == ("status", {"x": 1.5})


# -- job ids made of dots ----------------------------------------------------------------


@pytest.mark.parametrize("raw", ["...", "%2E", "%2E%2E", ".%2E", "%2e%2e%2e"])
async def test_job_ids_made_only_of_dots_are_400(start_cylindria, raw):
    client = await start_cylindria()
    base = str(client.make_url("/")).rstrip("/")
    async with aiohttp.ClientSession() as session:
        for method, path in (("PUT", f"/startjob/{raw}/"), ("GET", f"/jobstatus/{raw}/"),
                             ("POST", f"/canceljob/{raw}/"), ("POST", f"/retryjob/{raw}/"),
                             ("GET", f"/events/?job_id={raw}")):
            url = URL(base + path, encoded=True)
            async with session.request(method, url, data=dumps(workflows.quick())) as resp:
                body = strict(await resp.read())
                assert resp.status == 400, (method, path, body)
                assert "only dots" in body["error"]["message"], body
    status, _ = await put_job(client, ".dotted.", workflows.quick())
    assert status == 202


# -- retries ---------------------------------------------------------------------------


async def test_retries_stop_at_the_limit_with_a_409(start_cylindria, tmp_path):
    client = await start_cylindria(state_file=tmp_path / "s.sqlite3", max_attempts=3)
    status, _ = await put_job(client, "again", workflows.below_min())
    assert status == 422
    for attempt in (2, 3):
        resp = await client.post("/retryjob/again/")
        body = await resp.json()
        assert resp.status == 422 and body["error"]["code"] == "validation_failed"
        assert (await wait_state(client, "again", "rejected"))["attempt"] == attempt
    resp = await client.post("/retryjob/again/")
    assert resp.status == 409
    body = await resp.json()
    assert body["error"]["code"] == "attempts_exhausted"
    assert body["error"]["attempts"] == 3 and body["error"]["max_attempts"] == 3
    assert "CYLINDRIA_MAX_ATTEMPTS=3" in body["error"]["message"]
    assert "new job_id" in body["error"]["message"]
    status = await wait_state(client, "again", "rejected")
    assert status["attempt"] == status["attempts_total"] == 3
    assert len(status["attempts"]) == 3


async def test_answers_list_the_last_attempts_and_count_them_all(start_cylindria, tmp_path):
    state = tmp_path / "s.sqlite3"
    total = ATTEMPTS_SHOWN + 5
    client = await start_cylindria(state_file=state, max_attempts=total)
    await put_job(client, "many", workflows.below_min())
    for _ in range(total - 1):
        assert (await client.post("/retryjob/many/")).status == 422
    assert (await client.post("/retryjob/many/")).status == 409
    status = await wait_state(client, "many", "rejected")
    assert status["attempts_total"] == total
    assert [a["attempt"] for a in status["attempts"]] == list(
        range(total - ATTEMPTS_SHOWN + 1, total + 1))
    feed = await (await client.get("/dashboard/job/many/state")).json()
    assert len(feed["attempts"]) == ATTEMPTS_SHOWN

    def journal_kept() -> list[Any] | None:
        record = journal_record(state, "many")
        loaded = json.loads(record) if record else {}
        return loaded.get("earlier_attempts") if loaded.get("attempt") == total else None

    earlier = await wait_until(journal_kept, what="the last attempt on disk")
    assert len(earlier) == ATTEMPTS_SHOWN - 1 and earlier[-1]["attempt"] == total - 1
