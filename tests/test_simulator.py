"""The ComfyUI simulator's behaviours beyond the recorded scenarios, and its fault injection."""

from __future__ import annotations

import asyncio
import socket
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import ujson
from aiohttp.test_utils import TestClient

from cylindria import cli
from cylindria.simulator import DEFAULT_MODELS, ComfySimulator, SimSettings, engine, serve
from cylindria.simulator.vram import model_size

from simulator_support import WAIT, Listener, quick, streamed, txt2img, wait_until

INTERNAL_ERROR = "500 Internal Server Error\n\nServer got itself in trouble"


@dataclass
class Env:
    sim: ComfySimulator
    client: TestClient
    output: Path

    async def listen(self, client_id: str = "listener") -> Listener:
        listener = await Listener.connect(
            self.client.session, self.client.make_url("/ws").with_query(clientId=client_id))
        await listener.wait_message("status")
        return listener

    async def post(self, path: str, body: Any = None) -> aiohttp.ClientResponse:
        if body is None:
            return await self.client.post(path)
        return await self.client.post(path, data=ujson.dumps(body))

    async def submit(self, prompt: dict[str, Any], status: int = 200,
                     **fields: Any) -> dict[str, Any]:
        resp = await self.post("/prompt", {"prompt": prompt, **fields})
        body = await resp.json()
        assert resp.status == status, body
        return body

    async def get(self, path: str, **params: Any) -> Any:
        resp = await self.client.get(path, params=params)
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def history_of(self, prompt_id: str) -> dict[str, Any]:
        await wait_until(lambda: prompt_id in self.sim.history)
        return (await self.get(f"/history/{prompt_id}"))[prompt_id]

    async def blocked(self) -> str:
        async with asyncio.timeout(WAIT):
            return await self.sim.until_blocked()


@pytest.fixture
def make_env(aiohttp_client, tmp_path) -> Callable[..., Awaitable[Env]]:
    """A simulator with step_seconds=0 and the given other SimSettings fields."""
    async def make(**options: Any) -> Env:
        sim = ComfySimulator(SimSettings(step_seconds=0, output_dir=tmp_path / "output",
                                         **options))
        client = await aiohttp_client(sim.create_app())
        return Env(sim, client, tmp_path / "output")
    return make


@pytest.fixture
async def env(make_env) -> Env:
    return await make_env()


def types(listener: Listener, prompt_id: str | None = None) -> list[str]:
    out = []
    for frame in listener.frames:
        if frame.kind == "binary":
            out.append(f"binary{frame.event}")
        elif frame.msg is not None and frame.type != "progress_state" and (
                prompt_id is None or frame.msg["data"].get("prompt_id") in (prompt_id, None)):
            out.append(frame.msg["type"])
    return out


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --- execution ---------------------------------------------------------------------------

async def test_txt2img_reports_every_sampler_step(env):
    listener = await env.listen()
    body = await env.submit(txt2img(steps=5), client_id="listener")
    prompt_id = body["prompt_id"]
    await listener.wait_done(prompt_id)
    progress = listener.texts("progress")
    assert [(p["data"]["value"], p["data"]["max"]) for p in progress] == [
        (step, 5) for step in range(1, 6)]
    assert {p["data"]["node"] for p in progress} == {"3"}
    executing = [m["data"]["node"] for m in listener.texts("executing")]
    assert executing[-1] is None
    order = executing[:-1]
    assert sorted(order) == ["3", "4", "5", "6", "7", "8", "9"]
    for before, after in [("4", "6"), ("4", "7"), ("6", "3"), ("5", "3"), ("3", "8"),
                          ("8", "9"), ("4", "8")]:
        assert order.index(before) < order.index(after)
    # Default preview method is none: no binary frames from the sampler.
    assert not any(f.kind == "binary" for f in listener.frames)
    last_state = listener.texts("progress_state")[-1]["data"]["nodes"]
    assert last_state["3"]["value"] == 5 and last_state["3"]["state"] == "finished"
    history = await env.history_of(prompt_id)
    image = history["outputs"]["9"]["images"][0]
    assert image == {"filename": "txt2img_00001_.png", "subfolder": "cyl", "type": "output"}
    assert png_size((env.output / "cyl" / image["filename"]).read_bytes()) == (512, 512)


async def test_sampler_previews_when_the_job_asks_for_them(env):
    listener = await env.listen()
    body = await env.submit(txt2img(steps=3), client_id="listener",
                            extra_data={"preview_method": "auto"})
    await listener.wait_done(body["prompt_id"])
    kinds = types(listener)
    assert kinds.count("binary1") == 3
    first = kinds.index("progress")
    assert kinds[first + 1] == "binary1"
    frame = next(f for f in listener.frames if f.kind == "binary")
    assert frame.data[4:8] == struct.pack(">I", 2)
    assert png_size(frame.data[8:]) == (64, 64)


async def test_preview_metadata_clients_get_event_4_before_progress(env):
    listener = await env.listen("meta")
    await listener.ws.send_str(ujson.dumps(
        {"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    reply = await listener.wait_message("feature_flags")
    assert reply["data"]["supports_preview_metadata"] is True
    body = await env.submit(streamed(batch=2), client_id="meta")
    await listener.wait_done(body["prompt_id"])
    kinds = types(listener)
    assert kinds.count("binary4") == 2 and "binary1" not in kinds
    assert kinds.index("binary4") < kinds.index("progress")
    frame = next(f for f in listener.frames if f.kind == "binary")
    (length,) = struct.unpack(">I", frame.data[4:8])
    meta = ujson.loads(frame.data[8:8 + length])
    assert meta["prompt_id"] == body["prompt_id"] and meta["node_id"] == "2"
    assert meta["image_type"] == "image/png"
    assert png_size(frame.data[8 + length:]) == (16, 16)


async def test_later_feature_flags_are_ignored(env):
    listener = await env.listen("late")
    await listener.ws.send_str(ujson.dumps({"type": "hello", "data": {}}))
    await listener.ws.send_str(ujson.dumps({"type": "feature_flags", "data": {}}))
    body = await env.submit(quick(), client_id="late")
    await listener.wait_done(body["prompt_id"])
    assert not listener.texts("feature_flags")


async def test_image_scale_and_invert_shape_the_saved_png(env):
    prompt = quick(color=0x102030, batch=2)
    prompt["4"] = {"class_type": "ImageScale", "inputs": {
        "image": ["2", 0], "upscale_method": "bilinear", "width": 40, "height": 0,
        "crop": "disabled"}}
    prompt["3"]["inputs"]["images"] = ["4", 0]
    body = await env.submit(prompt)
    history = await env.history_of(body["prompt_id"])
    images = history["outputs"]["3"]["images"]
    assert [i["filename"] for i in images] == ["ok_00001_.png", "ok_00002_.png"]
    resp = await env.client.get("/view", params=images[0])
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "image/png"
    assert resp.headers["Content-Disposition"] == 'filename="ok_00001_.png"'
    data = await resp.read()
    assert png_size(data) == (40, 40)
    # The colour went through ImageInvert.
    idat = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[idat - 4:idat])
    raw = zlib.decompress(data[idat + 4:idat + 4 + length])
    assert raw[:4] == b"\x00" + bytes([0xEF, 0xDF, 0xCF])


async def test_save_outside_output_folder_fails_at_run_time(env):
    listener = await env.listen()
    body = await env.submit(quick(prefix="../escape"), client_id="listener")
    await listener.wait_done(body["prompt_id"])
    error = listener.texts("execution_error")[0]["data"]
    assert error["node_id"] == "3" and error["node_type"] == "SaveImage"
    assert error["exception_type"] == "Exception"
    assert error["exception_message"].startswith(
        "**** ERROR: Saving image outside the output folder is not allowed.")
    assert error["exception_message"].endswith("\n")
    assert error["executed"] == ["1", "2"]
    assert list(error["current_inputs"]) == ["images", "filename_prefix", "prompt",
                                             "extra_pnginfo"]
    assert isinstance(error["traceback"], list) and error["traceback"]
    kinds = types(listener, body["prompt_id"])
    assert kinds[-4:] == ["executing", "execution_error", "status", "executing"]
    history = await env.history_of(body["prompt_id"])
    assert history["status"]["status_str"] == "error"
    assert history["status"]["completed"] is False
    assert history["outputs"] == {} and history["meta"] == {}


async def test_regex_error_is_reported_as_re_error(env):
    listener = await env.listen()
    prompt = {"1": {"class_type": "RegexReplace",
                    "inputs": {"string": "abc", "regex_pattern": "(", "replace": "x"}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    body = await env.submit(prompt, client_id="listener")
    await listener.wait_done(body["prompt_id"])
    error = listener.texts("execution_error")[0]["data"]
    assert error["exception_type"] == "re.error"
    assert error["exception_message"] == "missing ), unterminated subpattern at position 0\n"
    prompt["1"]["inputs"]["regex_pattern"] = "b"
    body = await env.submit(prompt, client_id="listener")
    history = await env.history_of(body["prompt_id"])
    assert history["outputs"]["2"] == {"text": ["axc"]}


async def test_job_without_client_id_only_broadcasts(env):
    listener = await env.listen()
    body = await env.submit(streamed(batch=2))
    await wait_until(lambda: body["prompt_id"] in env.sim.history)
    await listener.wait_for(lambda frames: sum(
        1 for f in frames if f.type == "status") >= 4)
    assert types(listener) == ["status", "status", "status", "progress", "binary1",
                               "progress", "binary1", "status"]
    assert listener.texts("progress_state")


async def test_interrupted_job_without_client_id_is_broadcast(env):
    listener = await env.listen()
    env.sim.pause("tick")
    body = await env.submit(streamed(batch=3))
    await env.blocked()
    await env.post("/interrupt", {"prompt_id": body["prompt_id"]})
    env.sim.resume()
    message = await listener.wait_message("execution_interrupted")
    assert message["data"]["node_id"] == "2"
    assert message["data"]["executed"] == ["1"]
    history = await env.history_of(body["prompt_id"])
    assert history["status"]["messages"][-1][0] == "execution_interrupted"


async def test_interrupt_names_the_node_about_to_run(env):
    listener = await env.listen()
    env.sim.pause("node")
    body = await env.submit(quick(color=5), client_id="listener")
    assert await env.blocked() == "node:1"
    env.sim.resume()
    env.sim.pause("node")
    assert await env.blocked() == "node:2"
    # Another prompt id, pending or unknown, is not interrupted.
    await env.post("/interrupt", {"prompt_id": "someone-else"})
    env.sim.resume()
    env.sim.pause("node")
    assert await env.blocked() == "node:3"
    resp = await env.post("/interrupt", {"prompt_id": body["prompt_id"]})
    assert resp.status == 200 and await resp.read() == b""
    assert "Content-Type" not in resp.headers
    env.sim.resume()
    await listener.wait_done(body["prompt_id"])
    data = listener.texts("execution_interrupted")[0]["data"]
    assert (data["node_id"], data["node_type"], data["executed"]) == ("3", "SaveImage",
                                                                      ["1", "2"])
    jobs = await env.get(f"/api/jobs/{body['prompt_id']}")
    assert jobs["status"] == "failed" and "execution_error" not in jobs


async def test_idle_interrupt_does_not_leak_into_the_next_job(env):
    listener = await env.listen()
    resp = await env.client.post("/interrupt")
    assert resp.status == 200
    body = await env.submit(quick(color=6), client_id="listener")
    await listener.wait_done(body["prompt_id"])
    assert "execution_success" in types(listener)


async def test_global_interrupt_with_an_empty_body(env):
    listener = await env.listen()
    env.sim.pause("tick")
    body = await env.submit(streamed(batch=2), client_id="listener")
    await env.blocked()
    await env.client.post("/interrupt", data=b"")
    env.sim.resume()
    await listener.wait_done(body["prompt_id"])
    assert listener.texts("execution_interrupted")


# --- validation ---------------------------------------------------------------------------

async def test_unknown_checkpoint_is_value_not_in_list(env):
    body = await env.submit(txt2img(ckpt="nope.safetensors"), status=400)
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["error"]["details"] == ""
    error = body["node_errors"]["4"]["errors"][0]
    assert error["type"] == "value_not_in_list"
    assert error["details"] == f"ckpt_name: 'nope.safetensors' not in {list(DEFAULT_MODELS)}"
    assert error["extra_info"]["input_config"][0] == list(DEFAULT_MODELS)
    assert body["node_errors"]["4"]["dependent_outputs"] == ["9"]
    assert body["node_errors"]["4"]["class_type"] == "CheckpointLoaderSimple"


async def test_long_option_lists_are_not_echoed(env):
    prompt = txt2img()
    prompt["3"]["inputs"]["sampler_name"] = "magic"
    body = await env.submit(prompt, status=400)
    error = body["node_errors"]["3"]["errors"][0]
    assert error["type"] == "value_not_in_list"
    assert error["extra_info"]["input_config"] is None
    assert error["details"].startswith("sampler_name: 'magic' not in (list of length ")


async def test_input_errors_of_every_kind(env):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": "wide", "height": 99999,
                                                      "batch_size": 1}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                           "batch_size": 1}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": "x"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["1"], "filename_prefix": "x"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
        "6": {"class_type": "ImageInvert", "inputs": {"image": ["404", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        "8": {"class_type": "PreviewImage"},
    }
    body = await env.submit(prompt, status=400)
    errors = {node: [e["type"] for e in v["errors"]] for node, v in body["node_errors"].items()}
    assert errors["1"] == ["invalid_input_type", "value_bigger_than_max",
                           "required_input_missing"]
    assert errors["3"] == ["return_type_mismatch"]
    assert errors["4"] == ["bad_linked_input"]
    assert errors["5"] == ["required_input_missing"]
    assert errors["6"] == ["exception_during_inner_validation"]
    assert errors["8"] == ["exception_during_validation"]
    assert "7" not in errors
    assert body["node_errors"]["1"]["class_type"] == "EmptyImage"
    details = body["error"]["details"].split("\n")
    assert details[0] == ("Return type mismatch between linked nodes: images, "
                          "received_type(LATENT) mismatch input_type(IMAGE)")


async def test_partial_validity_runs_the_good_outputs(env):
    prompt = quick(color=7)
    prompt["4"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0],
                                                         "filename_prefix": "bad"}}
    prompt["5"] = {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8,
                                                          "batch_size": 1, "color": 0}}
    body = await env.submit(prompt)
    assert body["node_errors"]["5"]["dependent_outputs"] == ["4"]
    history = await env.history_of(body["prompt_id"])
    assert history["prompt"][4] == ["3"]
    assert list(history["outputs"]) == ["3"]


async def test_partial_execution_targets(env):
    prompt = quick(color=8)
    prompt["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    body = await env.submit(prompt, partial_execution_targets=["4"])
    history = await env.history_of(body["prompt_id"])
    assert history["prompt"][4] == ["4"]
    preview = history["outputs"]["4"]["images"][0]
    assert preview["type"] == "temp" and preview["subfolder"] == ""
    assert preview["filename"].startswith("ComfyUI_temp_")
    resp = await env.client.get("/view", params=preview)
    assert resp.status == 200
    body = await env.submit(prompt, status=400, partial_execution_targets=["9"])
    assert body["error"]["type"] == "prompt_no_outputs"


async def test_prompt_level_errors(env):
    body = await env.submit({"1": {"class_type": "EmptyImage", "inputs": {}}}, status=400)
    assert body == {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs",
                              "details": "", "extra_info": {}}, "node_errors": {}}
    body = await env.submit({"7": {"inputs": {}}}, status=400)
    assert body["error"]["type"] == "invalid_prompt"
    assert body["error"]["details"] == "Node ID '#7'"
    resp = await env.post("/prompt", {"client_id": "x"})
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "no_prompt"
    for bad in ({"prompt": [1, 2]}, {"prompt": {"last_node_id": 9}}):
        resp = await env.post("/prompt", bad)
        assert resp.status == 500
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert await resp.text() == INTERNAL_ERROR


async def test_counter_advances_even_on_refused_prompts(env):
    assert (await env.submit(quick(color=1)))["number"] == 0
    await env.submit({"1": {"class_type": "Nope", "inputs": {}}}, status=400)
    resp = await env.client.post("/prompt", data=b"{not json")
    assert resp.status == 500
    assert (await env.submit(quick(color=2)))["number"] == 2
    assert env.sim.number == 3


async def test_huge_values_are_reported_not_crashed_on(env):
    prompt = txt2img()
    prompt["3"]["inputs"]["seed"] = 2**70
    body = await env.submit(prompt, status=400)
    error = body["node_errors"]["3"]["errors"][0]
    assert error["type"] == "value_bigger_than_max"
    assert error["extra_info"]["received_value"] == 2**70


async def test_duplicate_number_and_id_is_500_but_still_queued(env):
    env.sim.pause()
    await env.submit(quick(color=13), prompt_id="dup", number=5)
    resp = await env.post("/prompt", {"prompt": quick(color=14), "prompt_id": "dup",
                                      "number": 5})
    assert resp.status == 500
    assert len((await env.get("/queue"))["queue_pending"]) == 2
    env.sim.resume()
    await wait_until(lambda: env.sim.queue_remaining == 0 and "dup" in env.sim.history)
    assert list(env.sim.history) == ["dup"]


async def test_values_are_coerced_and_ids_stringified(env):
    prompt = quick(color=9)
    prompt["1"]["inputs"]["width"] = "32"
    body = await env.submit(prompt, prompt_id=12345)
    assert body["prompt_id"] == "12345"
    history = await env.history_of("12345")
    assert history["prompt"][2]["1"]["inputs"]["width"] == 32
    body = await env.submit(quick(color=10), prompt_id=None)
    assert body["prompt_id"] == "None"


async def test_client_id_overrides_extra_data_and_secrets_are_hidden(env):
    env.sim.pause("dequeue")
    body = await env.submit(quick(color=11), client_id="real", extra_data={
        "client_id": "stale", "api_key_comfy_org": "secret", "extra_pnginfo": {
            "workflow": {"id": "wf-1"}}})
    queue = await env.get("/queue")
    item = queue["queue_pending"][0]
    assert len(item) == 5
    assert item[3]["client_id"] == "real"
    assert "api_key_comfy_org" not in item[3] and isinstance(item[3]["create_time"], int)
    job = await env.get(f"/api/jobs/{body['prompt_id']}")
    assert job == {"id": body["prompt_id"], "status": "pending", "priority": 0,
                   "create_time": item[3]["create_time"], "outputs_count": 0,
                   "workflow_id": "wf-1"}
    env.sim.resume()
    await env.history_of(body["prompt_id"])


# --- queue ---------------------------------------------------------------------------------

async def test_front_and_number_ordering(env):
    listener = await env.listen()
    env.sim.pause("dequeue")
    ids = {}
    for name, fields in [("a", {}), ("b", {}), ("c", {}), ("front", {"front": True}),
                         ("float", {"number": "3.5"}), ("seven", {"number": 7})]:
        body = await env.submit(quick(color=len(ids) + 100), prompt_id=name,
                                client_id="listener", **fields)
        ids[name] = body["number"]
    assert ids == {"a": 0, "b": 1, "c": 2, "front": -3, "float": 3.5, "seven": 7.0}
    assert isinstance(ids["seven"], float)
    queue = await env.get("/queue")
    raw = [item[0] for item in queue["queue_pending"]]
    assert raw != sorted(raw)
    assert sorted(raw) == [-3, 0, 1, 2, 3.5, 7.0]
    assert queue["queue_running"] == []
    env.sim.resume()
    for name in ids:
        await listener.wait_done(name)
    finished = [m["data"]["prompt_id"] for m in listener.texts("execution_success")]
    assert finished == ["front", "a", "b", "c", "float", "seven"]


async def test_queue_clear_and_delete_touch_only_pending_jobs(env):
    listener = await env.listen()
    env.sim.pause("tick")
    running = await env.submit(streamed(batch=2), client_id="listener")
    await env.blocked()
    for name in ("p1", "p2", "p3"):
        await env.submit(quick(color=hash(name) & 0xFFFF), prompt_id=name,
                         client_id="listener")
    assert env.sim.queue_remaining == 4
    resp = await env.post("/queue", {"delete": ["p2", "unknown", running["prompt_id"]]})
    assert resp.status == 200 and await resp.read() == b""
    assert env.sim.pending_prompt_ids == ["p1", "p3"]
    await env.post("/queue", {"clear": True})
    assert env.sim.pending_prompt_ids == []
    statuses = [m["data"]["status"]["exec_info"]["queue_remaining"]
                for m in await listener.wait_for(
                    lambda f: len([x for x in f if x.type == "status"]) >= 8
                    and [x.msg for x in f if x.type == "status"])]
    assert statuses[-2:] == [3, 1]
    env.sim.resume()
    await listener.wait_done(running["prompt_id"])
    for name in ("p1", "p2", "p3"):
        assert await env.get(f"/history/{name}") == {}
        resp = await env.client.get(f"/api/jobs/{name}")
        assert resp.status == 404
        assert await resp.json() == {"error": "Job not found"}


async def test_get_prompt_counts_running_and_pending(env):
    env.sim.pause("tick")
    await env.submit(streamed(batch=2))
    await env.blocked()
    await env.submit(quick(color=12))
    assert await env.get("/prompt") == {"exec_info": {"queue_remaining": 2}}
    queue = await env.get("/api/queue")
    assert len(queue["queue_running"]) == 1 and len(queue["queue_pending"]) == 1
    env.sim.resume()
    await wait_until(lambda: env.sim.queue_remaining == 0)


# --- cache ---------------------------------------------------------------------------------

async def test_cache_keeps_only_the_previous_prompt(env):
    listener = await env.listen()

    async def run(prompt: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        body = await env.submit(prompt, client_id="listener")
        await listener.wait_done(body["prompt_id"])
        cached = next(m for m in listener.texts("execution_cached")
                      if m["data"]["prompt_id"] == body["prompt_id"])["data"]["nodes"]
        history = await env.history_of(body["prompt_id"])
        return cached, history["outputs"]["3"]["images"][0]

    a, b = quick(color=1), quick(color=2)
    assert await run(a) == ([], {"filename": "ok_00001_.png", "subfolder": "cyl",
                                 "type": "output"})
    cached, image = await run(a)
    assert cached == ["1", "2", "3"] and image["filename"] == "ok_00001_.png"
    assert not (env.output / "cyl" / "ok_00002_.png").exists()
    assert (await run(b))[0] == []
    cached, image = await run(a)
    assert cached == [] and image["filename"] == "ok_00003_.png"
    # Same upstream, another prefix: only the shared nodes come from cache.
    assert (await run(quick(color=1, prefix="cyl/other")))[0] == ["1", "2"]
    resp = await env.post("/free", {"free_memory": True})
    assert resp.status == 200 and await resp.read() == b""
    assert env.sim.cache_size == 0
    assert (await run(quick(color=1, prefix="cyl/other")))[0] == []


async def test_streamed_output_is_never_cached(env):
    listener = await env.listen()
    for _ in range(2):
        body = await env.submit(streamed(batch=1), client_id="listener")
        await listener.wait_done(body["prompt_id"])
    cached = [m["data"]["nodes"] for m in listener.texts("execution_cached")]
    assert cached == [[], ["1"]]
    assert types(listener).count("binary1") == 2


# --- history and jobs ----------------------------------------------------------------------

async def test_history_eviction_and_paging(env, monkeypatch):
    monkeypatch.setattr(engine, "MAXIMUM_HISTORY_SIZE", 2)
    for n in range(5):
        body = await env.submit(quick(color=200 + n), prompt_id=f"h{n}")
        await env.history_of(body["prompt_id"])
    assert list(env.sim.history) == ["h2", "h3", "h4"]
    assert list(await env.get("/history", max_items=2)) == ["h3", "h4"]
    assert list(await env.get("/history", offset=1)) == ["h3", "h4"]
    assert list(await env.get("/history", max_items=1, offset=1)) == ["h3"]
    resp = await env.client.get("/history", params={"max_items": "x"})
    assert resp.status == 500
    await env.post("/history", {"delete": ["h3"]})
    assert list(await env.get("/history")) == ["h2", "h4"]
    await env.post("/history", {"clear": True})
    assert await env.get("/history") == {}


async def test_api_jobs_lists_every_status(env):
    listener = await env.listen()
    done = await env.submit(quick(color=300), prompt_id="done", client_id="listener")
    await listener.wait_done(done["prompt_id"])
    failed = await env.submit(quick(color=301, prefix="../x"), prompt_id="failed",
                              client_id="listener")
    await listener.wait_done(failed["prompt_id"])
    env.sim.pause("tick")
    await env.submit(streamed(), prompt_id="running")
    await env.blocked()
    await env.submit(quick(color=302), prompt_id="pending")
    body = await env.get("/api/jobs")
    assert {(j["id"], j["status"]) for j in body["jobs"]} == {
        ("pending", "pending"), ("running", "in_progress"), ("failed", "failed"),
        ("done", "completed")}
    times = [j["create_time"] for j in body["jobs"]]
    assert times == sorted(times, reverse=True)
    assert body["pagination"] == {"offset": 0, "limit": None, "total": 4, "has_more": False}
    body = await env.get("/api/jobs", status="completed,failed", sort_order="asc", limit="1")
    assert [j["id"] for j in body["jobs"]] == ["done"]
    assert body["pagination"]["has_more"] is True
    job = body["jobs"][0]
    assert job["preview_output"]["nodeId"] == "3"
    assert job["preview_output"]["mediaType"] == "images"
    assert "outputs" not in job
    for bad in ({"status": "bogus"}, {"limit": "0"}, {"sort_by": "name"},
                {"sort_order": "up"}, {"offset": "x"}):
        resp = await env.client.get("/api/jobs", params=bad)
        assert resp.status == 400
        assert "error" in await resp.json()
    detail = await env.get("/api/jobs/failed")
    assert detail["execution_error"]["node_type"] == "SaveImage"
    assert list(detail)[-3:] == ["outputs", "execution_status", "workflow"]
    assert (await env.get("/api/jobs/running"))["status"] == "in_progress"
    assert (await env.client.get("/jobs")).status == 404
    assert (await env.client.get("/api/api/jobs")).status == 200
    env.sim.resume()


# --- websockets ---------------------------------------------------------------------------

async def test_duplicate_client_id_mutes_both_sockets(env):
    older = await env.listen("twin")
    newer = await env.listen("twin")
    first = await env.submit(quick(color=400), client_id="twin")
    await newer.wait_done(first["prompt_id"])
    assert older.texts() == [older.texts()[0]]
    await older.close()
    await wait_until(lambda: env.sim.registered_clients == [])
    body = await env.submit(quick(color=401), client_id="twin")
    await wait_until(lambda: body["prompt_id"] in env.sim.history)
    bystander = await env.listen("bystander")
    await env.submit(quick(color=402), client_id="bystander")
    await bystander.wait_for(lambda f: any(x.type == "execution_success" for x in f))
    assert not newer.closed
    # The newer socket heard the first job only, and no broadcast after the older closed.
    assert {m["data"]["prompt_id"] for m in newer.texts() if "prompt_id" in m["data"]} == {
        first["prompt_id"]}
    assert len(newer.texts("status")) == 1 + 3


async def test_socket_without_client_id_gets_a_generated_sid(env):
    listener = await Listener.connect(env.client.session, env.client.make_url("/api/ws"))
    first = await listener.wait_message("status")
    assert len(first["data"]["sid"]) == 32
    assert first["data"]["status"] == {"exec_info": {"queue_remaining": 0}}


async def test_reconnect_hint_names_the_running_node(env):
    listener = await env.listen("hint")
    env.sim.pause("tick")
    body = await env.submit(streamed(batch=2), client_id="hint")
    await env.blocked()
    await listener.close()
    again = await env.listen("hint")
    hint = await again.wait_message("executing")
    assert hint == {"type": "executing", "data": {"node": "2"}}
    assert again.texts()[0]["data"]["status"]["exec_info"]["queue_remaining"] == 1
    other = await env.listen("other")
    env.sim.resume()
    await again.wait_done(body["prompt_id"])
    assert not other.texts("executing")


# --- fault injection ------------------------------------------------------------------------

async def test_restart_forgets_everything(env):
    listener = await env.listen()
    done = await env.submit(quick(color=500), client_id="listener")
    await listener.wait_done(done["prompt_id"])
    env.sim.pause("tick")
    victim = await env.submit(streamed(batch=3), client_id="listener")
    await env.blocked()
    await env.submit(quick(color=501), client_id="listener")
    await env.sim.restart()
    async with asyncio.timeout(WAIT):
        await listener.task
    assert listener.closed
    assert "execution_interrupted" not in types(listener)
    assert "execution_error" not in types(listener)
    assert env.sim.queue_remaining == 0 and env.sim.history == {}
    assert await env.get(f"/history/{victim['prompt_id']}") == {}
    assert (await env.client.get(f"/api/jobs/{victim['prompt_id']}")).status == 404
    env.sim.resume()
    fresh = await env.listen()
    body = await env.submit(quick(color=500), client_id="listener")
    assert body["number"] == 0
    await fresh.wait_done(body["prompt_id"])
    # The cache went too, and file numbering carries on from the disk.
    assert fresh.texts("execution_cached")[0]["data"]["nodes"] == []
    history = await env.history_of(body["prompt_id"])
    assert history["outputs"]["3"]["images"][0]["filename"] == "ok_00002_.png"


async def test_drop_sockets_closes_every_socket(env):
    first, second = await env.listen("a"), await env.listen("b")
    await env.sim.drop_sockets()
    async with asyncio.timeout(WAIT):
        await asyncio.gather(first.task, second.task)
    assert first.closed and second.closed
    assert env.sim.open_sockets == 0
    again = await env.listen("a")
    assert not again.closed


async def test_refused_websockets_answer_503(env):
    env.sim.refuse_websockets(True)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await env.client.ws_connect("/ws?clientId=x")
    assert info.value.status == 503
    assert (await env.client.get("/system_stats")).status == 200
    env.sim.refuse_websockets(False)
    await env.listen("x")


async def test_hang_next_holds_requests_until_released(env):
    env.sim.hang_next(1, path="/system_stats")
    held = asyncio.create_task(env.client.get("/api/system_stats"))
    await wait_until(lambda: env.sim.held_requests == 1)
    assert (await env.client.get("/system_stats")).status == 200
    assert (await env.client.get("/queue")).status == 200
    assert not held.done()
    env.sim.release_hangs()
    async with asyncio.timeout(WAIT):
        resp = await held
    assert resp.status == 200
    assert env.sim.held_requests == 0


async def test_hung_requests_are_released_on_shutdown(aiohttp_server, tmp_path):
    sim = ComfySimulator(SimSettings(step_seconds=0, output_dir=tmp_path))
    server = await aiohttp_server(sim.create_app())
    sim.hang_next()
    async with aiohttp.ClientSession() as session:
        held = asyncio.create_task(session.get(server.make_url("/queue")))
        await wait_until(lambda: sim.held_requests == 1)
        async with asyncio.timeout(WAIT):
            await server.close()
            resp = await held
        resp.release()
        assert resp.status == 200


async def test_fail_next_answers_the_default_500(env):
    env.sim.fail_next(2, path="/prompt")
    for path in ("/prompt", "/api/prompt"):
        resp = await env.client.post(path, data=ujson.dumps({"prompt": quick()}))
        assert resp.status == 500
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert await resp.text() == INTERNAL_ERROR
    assert (await env.client.get("/queue")).status == 200
    assert (await env.submit(quick(color=600)))["number"] == 0


async def test_pause_at_dequeue_keeps_jobs_pending(env):
    listener = await env.listen()
    env.sim.pause()
    body = await env.submit(quick(color=700), client_id="listener")
    queue = await env.get("/queue")
    assert queue["queue_running"] == [] and len(queue["queue_pending"]) == 1
    assert (await env.get(f"/api/jobs/{body['prompt_id']}"))["status"] == "pending"
    assert env.sim.running_prompt_id is None
    env.sim.resume()
    await listener.wait_done(body["prompt_id"])


async def test_pause_at_tick_holds_the_job_and_the_queue(env):
    listener = await env.listen()
    env.sim.pause("tick")
    first = await env.submit(streamed(batch=3), client_id="listener")
    assert await env.blocked() == "tick:2"
    second = await env.submit(quick(color=701), client_id="listener")
    progress = await listener.wait_message("progress")
    assert progress["data"]["value"] == 0
    assert env.sim.running_prompt_id == first["prompt_id"]
    assert env.sim.pending_prompt_ids == [second["prompt_id"]]
    stats = await env.get("/system_stats")
    device = stats["devices"][0]
    assert device["vram_free"] < device["vram_total"]
    env.sim.resume()
    await listener.wait_done(second["prompt_id"])
    assert [m["data"]["value"] for m in listener.texts("progress")] == [0, 1, 2]


async def test_pause_at_tick_while_quick_jobs_run_holds_the_next(env):
    listener = await env.listen()
    env.sim.pause("tick")
    first = await env.submit(quick(color=702), client_id="listener")
    second = await env.submit(quick(color=703), client_id="listener")
    await listener.wait_done(first["prompt_id"])
    assert env.sim.pending_prompt_ids == [second["prompt_id"]]
    env.sim.resume()
    await listener.wait_done(second["prompt_id"])


async def test_sim_http_controls(env):
    async def control(name: str, body: Any = None) -> None:
        resp = await env.post(f"/_sim/{name}", body)
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"ok": True}

    env.sim.fail_next()  # any path, but control routes are exempt
    await control("fail", {"count": 1, "path": "/history"})
    assert (await env.client.get("/queue")).status == 500
    assert (await env.client.get("/history")).status == 500
    assert (await env.client.get("/history")).status == 200
    await control("hang", {"count": 1, "path": "/queue"})
    held = asyncio.create_task(env.client.get("/queue"))
    await wait_until(lambda: env.sim.held_requests == 1)
    await control("release")
    assert (await held).status == 200
    await control("refuse_websockets", {"refuse": True})
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await env.client.ws_connect("/ws")
    await control("refuse_websockets", {"refuse": False})
    listener = await env.listen()
    await control("pause", {"at": "dequeue"})
    body = await env.submit(quick(color=800), client_id="listener")
    state = await env.get("/_sim/state")
    assert state["pending"] == [body["prompt_id"]] and state["paused"] == "dequeue"
    await control("resume")
    await listener.wait_done(body["prompt_id"])
    await control("drop_sockets")
    async with asyncio.timeout(WAIT):
        await listener.task
    await control("restart")
    assert env.sim.history == {}
    assert (await env.post("/_sim/pause", {"at": "never"})).status == 400
    assert (await env.client.post("/api/_sim/restart")).status == 404


# --- information endpoints ------------------------------------------------------------------

async def test_system_stats_shape(aiohttp_client, tmp_path):
    sim = ComfySimulator(SimSettings(step_seconds=0, output_dir=tmp_path, vram_total=8 << 30),
                         gpu_index=3)
    client = await aiohttp_client(sim.create_app())
    resp = await client.get("/system_stats")
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    body = await resp.json()
    assert list(body["system"]) == [
        "os", "ram_total", "ram_free", "comfyui_version", "required_frontend_version",
        "installed_templates_version", "required_templates_version", "python_version",
        "pytorch_version", "embedded_python", "argv"]
    assert body["system"]["comfyui_version"] == "0.8.0"
    (device,) = body["devices"]
    assert device["name"] == "cuda:3 Simulated GPU"
    assert (device["type"], device["index"], device["vram_total"]) == ("cuda", 3, 8 << 30)
    for key in ("vram_free", "torch_vram_total", "torch_vram_free"):
        assert isinstance(device[key], int)
    assert (await (await client.get("/api/features")).json())[
        "supports_preview_metadata"] is True


async def test_object_info_shapes(env):
    info = await env.get("/object_info")
    for name in ("EmptyImage", "ImageInvert", "ImageScale", "SaveImage", "PreviewImage",
                 "SaveImageWebsocket", "CheckpointLoaderSimple", "CLIPTextEncode",
                 "EmptyLatentImage", "KSampler", "VAEDecode", "PreviewAny", "RegexReplace"):
        assert list(info[name]) == ["input", "input_order", "output", "output_is_list",
                                    "output_name", "name", "display_name", "description",
                                    "python_module", "category", "output_node"]
    sampler = info["KSampler"]
    assert sampler["input_order"]["required"][:3] == ["model", "seed", "steps"]
    assert "euler" in sampler["input"]["required"]["sampler_name"][0]
    assert "normal" in sampler["input"]["required"]["scheduler"][0]
    assert sampler["output"] == ["LATENT"] and sampler["output_node"] is False
    assert info["SaveImage"]["output_node"] is True
    assert info["SaveImage"]["input"]["required"]["filename_prefix"][1]["default"] == "ComfyUI"
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == list(
        DEFAULT_MODELS)
    assert info["EmptyImage"]["input"]["required"]["color"][1]["max"] == 0xFFFFFF
    one = await env.get("/object_info/KSampler")
    assert one == {"KSampler": sampler}
    assert await env.get("/api/object_info/NoSuchNode") == {}


async def test_view_error_codes(env):
    body = await env.submit(quick(color=900))
    image = (await env.history_of(body["prompt_id"]))["outputs"]["3"]["images"][0]
    cases = [
        ({}, 404),
        ({"filename": "../secret.png"}, 400),
        ({"filename": "/etc/passwd"}, 400),
        ({"filename": image["filename"], "type": "bogus"}, 400),
        ({"filename": image["filename"], "subfolder": "../.."}, 403),
        ({"filename": image["filename"]}, 404),
        ({"filename": "missing.png", "subfolder": "cyl"}, 404),
    ]
    for params, status in cases:
        resp = await env.client.get("/view", params=params)
        assert resp.status == status, params
        assert await resp.read() == b"", params
    resp = await env.client.get("/view", params={"filename": f"{image['filename']} [output]",
                                                 "subfolder": "cyl", "type": "temp"})
    assert resp.status == 200
    resp = await env.client.get("/api/view", params=image, headers={"Range": "bytes=0-7"})
    assert resp.status == 206
    assert await resp.read() == b"\x89PNG\r\n\x1a\n"


async def test_cross_origin_requests_to_loopback_are_refused(env):
    resp = await env.client.get("/queue", headers={"Origin": "https://proxy.example"})
    assert resp.status == 403 and await resp.read() == b""
    host = env.client.make_url("/").host
    port = env.client.make_url("/").port
    resp = await env.client.get("/queue", headers={"Origin": f"http://{host}:{port}"})
    assert resp.status == 200


# --- several GPUs in one process -----------------------------------------------------------

def free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        try:
            with socket.socket() as second:
                second.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


async def test_serve_runs_one_simulator_per_gpu(tmp_path, caplog):
    base = free_port_pair()
    settings = SimSettings(step_seconds=0, output_dir=tmp_path)
    with caplog.at_level("INFO", logger="cylindria.simulator.server"):
        task = asyncio.create_task(serve("127.0.0.1", base, 2, settings))
        async with aiohttp.ClientSession() as session:
            async def stats(port: int) -> Any:
                async with asyncio.timeout(WAIT):
                    while True:
                        try:
                            async with session.get(
                                    f"http://127.0.0.1:{port}/system_stats") as resp:
                                return await resp.json()
                        except aiohttp.ClientConnectionError:
                            await asyncio.sleep(0.01)

            first = await stats(base)
            second = await stats(base + 1)
            assert first["devices"][0]["index"] == 0
            assert second["devices"][0]["index"] == 1
            async with session.post(f"http://127.0.0.1:{base + 1}/prompt",
                                    json={"prompt": quick(color=1)}) as resp:
                prompt_id = (await resp.json())["prompt_id"]

            async def done() -> bool:
                async with session.get(f"http://127.0.0.1:{base + 1}/history/{prompt_id}") \
                        as resp:
                    return bool(await resp.json())

            async with asyncio.timeout(WAIT):
                while True:
                    if await done():
                        break
                    await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert (tmp_path / "gpu1" / "cyl" / "ok_00001_.png").exists()
    assert not (tmp_path / "gpu0" / "cyl").exists()
    urls = [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()]
    assert len(urls) == 2 and f"http://127.0.0.1:{base + 1}" in urls[1]


async def test_the_ledger_keeps_what_ran_across_a_restart(env):
    """GET /_sim/ledger: every prompt begun, its runs and outcome; a restart cuts the
    running one short (outcome null) and forgets the queue, never the ledger."""
    done = await env.submit(quick(color=510))
    await env.history_of(done["prompt_id"])
    env.sim.pause("tick")
    cut = await env.submit(streamed(batch=3))
    await env.blocked()
    waiting = await env.submit(quick(color=511))
    await env.sim.restart()
    env.sim.resume()
    ledger = await env.get("/_sim/ledger")
    finished, short = ledger[done["prompt_id"]], ledger[cut["prompt_id"]]
    assert (finished["runs"], finished["outcome"]) == (1, "success")
    assert finished["began"] <= finished["ended"] <= short["began"]
    assert (short["runs"], short["outcome"], short["ended"]) == (1, None, None)
    assert waiting["prompt_id"] not in ledger


# --- model files in VRAM --------------------------------------------------------------------

SD15 = DEFAULT_MODELS[0]


def loads(ckpt: str) -> dict[str, Any]:
    """A checkpoint loader whose MODEL is shown by PreviewAny: a model load and little else."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}


async def run_to_end(env: Env, prompt: dict[str, Any]) -> dict[str, Any]:
    """Run a prompt; its ledger entry with `cached`, the nodes served from cache."""
    body = await env.submit(prompt)
    history = await env.history_of(body["prompt_id"])
    cached = next(data["nodes"] for event, data in history["status"]["messages"]
                  if event == "execution_cached")
    return {**env.sim.ledger[body["prompt_id"]], "cached": cached}


async def test_first_use_of_a_model_file_loads_it_and_takes_the_load_time(make_env):
    env = await make_env(model_load_seconds=0.1)
    assert await env.get("/_sim/models") == {"loaded": [], "loads": 0, "load_seconds": 0}
    first = await run_to_end(env, txt2img(seed=1))
    assert first["loads"] == [SD15] and first["outcome"] == "success"
    assert first["ended"] - first["began"] >= 0.09
    assert await env.get("/_sim/models") == {"loaded": [SD15], "loads": 1, "load_seconds": 0.1}
    # Another checkpoint runs its loader; back on the first, the loader runs again (the
    # cache holds only the previous prompt) but finds its file still in VRAM.
    other = await run_to_end(env, txt2img(seed=1, ckpt=DEFAULT_MODELS[1]))
    assert other["loads"] == [DEFAULT_MODELS[1]]
    again = await run_to_end(env, txt2img(seed=2))
    assert "4" not in again["cached"] and again["loads"] == []
    assert await env.get("/_sim/models") == {
        "loaded": [DEFAULT_MODELS[1], SD15], "loads": 2, "load_seconds": 0.2}
    stats = (await env.get("/system_stats"))["devices"][0]
    assert stats["vram_total"] - stats["vram_free"] == 600 * 1024**2 + sum(
        model_size("checkpoints", name) for name in (SD15, DEFAULT_MODELS[1]))


async def test_a_loader_served_from_cache_loads_nothing(make_env):
    env = await make_env(model_load_seconds=0.05)
    assert (await run_to_end(env, txt2img(seed=1)))["loads"] == [SD15]
    await env.post("/free", {"unload_models": True})
    assert env.sim.models["loaded"] == []
    # The loader's output is still cached, so nothing runs it and nothing loads.
    second = await run_to_end(env, txt2img(seed=2))
    assert "4" in second["cached"] and second["loads"] == []
    assert env.sim.models == {"loaded": [], "loads": 1, "load_seconds": 0.05}


async def test_the_vram_budget_unloads_the_least_recently_used(make_env):
    names = ("a.safetensors", "b.safetensors", "c.safetensors")
    size = model_size("checkpoints", names[0])
    # Room for two of them, not three.
    env = await make_env(models=names, vram_budget_gib=2.5 * size / 1024**3)
    for name, loaded in [("a", []), ("b", []), ("a", None), ("c", ["b"]), ("b", ["a"])]:
        ran = await run_to_end(env, loads(f"{name}.safetensors"))
        assert ran["cached"] == []
        assert ran["loads"] == ([] if loaded is None else [f"{name}.safetensors"])
    assert await env.get("/_sim/models") == {
        "loaded": ["c.safetensors", "b.safetensors"], "loads": 4, "load_seconds": 0}
    stats = (await env.get("/system_stats"))["devices"][0]
    assert stats["vram_total"] - stats["vram_free"] == 600 * 1024**2 + 2 * size


async def test_without_a_budget_every_model_file_stays(env):
    for name in DEFAULT_MODELS:
        await run_to_end(env, loads(name))
    assert env.sim.models["loaded"] == list(DEFAULT_MODELS)


async def test_restart_and_free_empty_the_vram(env):
    await run_to_end(env, loads(SD15))
    await env.sim.restart()
    assert await env.get("/_sim/models") == {"loaded": [], "loads": 1, "load_seconds": 0}
    assert (await run_to_end(env, loads(SD15)))["loads"] == [SD15]
    for name, body in [(DEFAULT_MODELS[1], {"unload_models": True}),
                       (DEFAULT_MODELS[2], {"free_memory": True})]:
        assert (await run_to_end(env, loads(name)))["loads"] == [name]
        assert env.sim.models["loaded"] != []
        resp = await env.post("/free", body)
        assert resp.status == 200
        assert env.sim.models["loaded"] == [], body
    # While a job runs, ComfyUI unloads only once it has ended.
    env.sim.pause("tick")
    running = await env.submit(txt2img(seed=3))
    await env.blocked()
    assert env.sim.models["loaded"] == [SD15]
    await env.post("/free", {"unload_models": True})
    assert env.sim.models["loaded"] == [SD15]
    env.sim.resume()
    await env.history_of(running["prompt_id"])
    assert env.sim.models == {"loaded": [], "loads": 5, "load_seconds": 0}


async def test_a_load_runs_to_its_end_and_the_interrupt_lands_on_the_next_node(make_env):
    env = await make_env(model_load_seconds=0.2)
    body = await env.submit(loads(SD15))
    await wait_until(lambda: env.sim.loading_model == SD15)
    assert (await env.get("/_sim/state"))["loading_model"] == SD15
    await env.post("/interrupt", {"prompt_id": body["prompt_id"]})
    history = await env.history_of(body["prompt_id"])
    interrupted = next(data for event, data in history["status"]["messages"]
                       if event == "execution_interrupted")
    assert (interrupted["node_id"], interrupted["executed"]) == ("2", ["1"])
    assert env.sim.ledger[body["prompt_id"]]["loads"] == [SD15]
    assert env.sim.models["loaded"] == [SD15]


async def test_a_restart_cuts_a_load_short_and_counts_nothing(make_env):
    env = await make_env(model_load_seconds=60)
    body = await env.submit(loads(SD15))
    await wait_until(lambda: env.sim.loading_model == SD15)
    await env.sim.restart()
    assert env.sim.loading_model is None
    assert env.sim.models == {"loaded": [], "loads": 0, "load_seconds": 0}
    entry = env.sim.ledger[body["prompt_id"]]
    assert (entry["outcome"], entry["loads"]) == (None, [])


def test_simulate_and_demo_take_the_model_flags(capsys):
    parser = cli.build_parser()
    for command in ("simulate", "demo"):
        ns = parser.parse_args([command, "--model-load-seconds", "1.5", "--vram-gb", "12"])
        assert cli.sim_costs(ns) == {"model_load_seconds": 1.5, "vram_budget_gib": 12.0}
        assert cli.sim_costs(parser.parse_args([command])) == {}
    assert cli.main(["simulate", "--vram-gb", "-1"]) == 2
    assert "--vram-gb must be 0 or more" in capsys.readouterr().err
