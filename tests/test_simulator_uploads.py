"""The simulated ComfyUI's uploads, input folder and loader nodes, over loopback HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from PIL import Image

from cylindria.simulator import ComfySimulator, SimSettings

from simulator_support import wait_until

INTERNAL_ERROR = "500 Internal Server Error\n\nServer got itself in trouble"


def png(rgb: tuple[int, ...], size: tuple[int, int] = (8, 8)) -> bytes:
    """A PNG written by Pillow (not by the simulator): RGB, or RGBA given four values."""
    out = io.BytesIO()
    Image.new("RGBA" if len(rgb) == 4 else "RGB", size, rgb).save(out, format="PNG")
    return out.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Sim:
    sim: ComfySimulator
    client: TestClient

    async def upload(self, data: bytes | str, filename: str = "in.png",
                     path: str = "/upload/image", content_type: str = "image/png",
                     **fields: str) -> tuple[int, Any]:
        form = aiohttp.FormData()
        if isinstance(data, str):
            form.add_field("image", data)
        else:
            # A stream, as aiohttp warns about large bodies given as bytes.
            form.add_field("image", io.BytesIO(data), filename=filename,
                           content_type=content_type)
        for name, value in fields.items():
            form.add_field(name, value)
        return await self.post_form(path, form)

    async def post_form(self, path: str, form: aiohttp.FormData) -> tuple[int, Any]:
        resp = await self.client.post(path, data=form)
        body = await resp.read()
        if resp.content_type == "application/json":
            return resp.status, json.loads(body)
        return resp.status, body

    async def upload_raw(self, filename: str, data: bytes, **fields: str) -> tuple[int, Any]:
        """An upload whose file name is sent as it is: aiohttp's own forms percent-encode
        a "/" in it, as browsers do not all do."""
        boundary = "simulatorboundary"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                 f"{value}\r\n".encode() for name, value in fields.items()]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                     f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'.encode()
                     + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        resp = await self.client.post("/upload/image", data=body, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"})
        raw = await resp.read()
        return resp.status, json.loads(raw) if resp.content_type == "application/json" else raw

    async def submit(self, prompt: dict[str, Any], status: int = 200) -> dict[str, Any]:
        resp = await self.client.post("/prompt", data=json.dumps({"prompt": prompt}))
        body = await resp.json()
        assert resp.status == status, body
        return body

    async def run(self, prompt: dict[str, Any], outcome: str = "success") -> dict[str, Any]:
        """Submit, wait for the job's history entry, and return it."""
        prompt_id = (await self.submit(prompt))["prompt_id"]
        await wait_until(lambda: prompt_id in self.sim.history)
        entry = self.sim.history[prompt_id]
        assert entry["status"]["status_str"] == outcome, entry["status"]
        return entry

    def saved(self, entry: dict[str, Any], node: str = "3") -> Image.Image:
        record = entry["outputs"][node]["images"][0]
        assert self.sim.output_dir is not None
        image = Image.open(self.sim.output_dir / record["subfolder"] / record["filename"])
        image.load()
        return image

    async def inputs(self) -> dict[str, Any]:
        resp = await self.client.get("/_sim/inputs")
        assert resp.status == 200
        return await resp.json()


@pytest.fixture
def make_sim(aiohttp_client, tmp_path) -> Callable[..., Awaitable[Sim]]:
    async def make(gpu: int = 0, **options: Any) -> Sim:
        sim = ComfySimulator(SimSettings(step_seconds=0, output_dir=tmp_path / f"out{gpu}",
                                         **options), gpu)
        return Sim(sim, await aiohttp_client(sim.create_app()))
    return make


@pytest.fixture
async def env(make_sim) -> Sim:
    return await make_sim()


def loaded(image_name: str, prefix: str = "cyl/loaded") -> dict[str, Any]:
    """LoadImage -> ImageInvert -> SaveImage, as in the recording."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": prefix}},
    }


def refusal(class_type: str, details: str, input_name: str) -> dict[str, Any]:
    """ComfyUI's answer to a loader whose file is not there."""
    return {"error": {"type": "prompt_outputs_failed_validation",
                      "message": "Prompt outputs failed validation", "details": "",
                      "extra_info": {}},
            "node_errors": {"1": {"errors": [{
                "type": "custom_validation_failed",
                "message": "Custom validation failed for node",
                "details": details, "extra_info": {"input_name": input_name}}],
                "dependent_outputs": ["3"], "class_type": class_type}}}


# --- POST /upload/image --------------------------------------------------------------------

async def test_same_bytes_are_reused_other_bytes_renamed_and_overwrite_replaces(env):
    red, blue, green = png((255, 0, 0)), png((0, 0, 255)), png((0, 255, 0))
    answers = []
    for data, fields in [(red, {}), (red, {}), (blue, {}), (blue, {}), (green, {}),
                         (green, {"overwrite": "true"}), (blue, {"overwrite": "1"}),
                         (red, {"overwrite": "True"})]:
        status, body = await env.upload(data, "x.png", subfolder="cyl", **fields)
        assert status == 200, body
        answers.append(body["name"])
        assert body == {"name": body["name"], "subfolder": "cyl", "type": "input"}
    # Blue is found again under its own new name; only "true" and "1" overwrite.
    assert answers == ["x.png", "x.png", "x (1).png", "x (1).png", "x (2).png", "x.png",
                       "x.png", "x (3).png"]
    assert env.sim.input_dir is not None
    assert (env.sim.input_dir / "cyl" / "x.png").read_bytes() == blue
    assert env.sim.uploads == 8
    listing = await env.inputs()
    assert listing == {"uploads": 8, "files": [
        {"name": name, "subfolder": "cyl", "type": "input", "size": len(data),
         "sha256": sha(data)}
        for name, data in [("x (1).png", blue), ("x (2).png", green), ("x (3).png", red),
                           ("x.png", blue)]]}
    status, body = await env.upload(red, "y.png", path="/api/upload/image")
    assert (status, body) == (200, {"name": "y.png", "subfolder": "", "type": "input"})


async def test_uploads_of_one_name_at_once_get_one_name_each(env):
    files = [png((n, n, n)) for n in range(5)]
    answers = await asyncio.gather(*(env.upload(data, "same.png") for data in files))
    assert sorted(body["name"] for _, body in answers) == [
        "same (1).png", "same (2).png", "same (3).png", "same (4).png", "same.png"]
    assert env.sim.input_dir is not None
    for (_, body), data in zip(answers, files, strict=True):
        assert (env.sim.input_dir / body["name"]).read_bytes() == data


async def test_paths_leaving_the_folder_and_a_missing_file_are_400_with_no_body(env):
    data = png((1, 2, 3))
    for filename, fields in [("../evil.png", {"subfolder": "../.."}),
                             ("evil.png", {"subfolder": "../.."}),
                             ("../../evil.png", {}),
                             ("evil.png", {"subfolder": "/tmp"}),
                             ("../evil.png", {"type": "temp"})]:
        assert await env.upload_raw(filename, data, **fields) == (400, b""), (filename, fields)
    form = aiohttp.FormData()
    form.add_field("subfolder", "cyl")
    assert await env.post_form("/upload/image", form) == (400, b"")
    assert await env.upload("", overwrite="true") == (400, b"")
    # ComfyUI's handler raises on a text field named image, and on an unknown type.
    assert await env.upload("not a file") == (500, INTERNAL_ERROR.encode())
    assert await env.upload(data, type="models") == (500, INTERNAL_ERROR.encode())
    assert env.sim.uploads == 0
    assert (await env.inputs())["files"] == []
    # A file name may climb out of its subfolder as long as it stays in the folder.
    status, body = await env.upload_raw("../top.png", data, subfolder="cyl")
    assert (status, body) == (200, {"name": "../top.png", "subfolder": "cyl",
                                    "type": "input"})
    assert env.sim.input_dir is not None and (env.sim.input_dir / "top.png").exists()


async def test_temp_uploads_go_to_temp_and_a_restart_empties_it(env):
    data = png((9, 9, 9))
    status, body = await env.upload(data, "tmp.png", type="temp")
    assert (status, body) == (200, {"name": "tmp.png", "subfolder": "", "type": "temp"})
    assert env.sim.temp_dir is not None and (env.sim.temp_dir / "tmp.png").read_bytes() == data
    resp = await env.client.get("/view", params={"filename": "tmp.png", "type": "temp"})
    assert resp.status == 200 and await resp.read() == data
    status, body = await env.upload(data, "out.png", type="output", subfolder="up")
    assert (status, body) == (200, {"name": "out.png", "subfolder": "up", "type": "output"})
    assert env.sim.output_dir is not None
    assert (env.sim.output_dir / "up" / "out.png").read_bytes() == data
    assert (await env.inputs())["files"] == []
    await env.sim.restart()
    assert not (env.sim.temp_dir / "tmp.png").exists()
    assert (env.sim.output_dir / "up" / "out.png").exists()


async def test_uploads_stream_to_disk_within_the_size_limit(make_sim):
    env = await make_sim(max_upload_size=256 * 1024)
    assert (await (await env.client.get("/features")).json())["max_upload_size"] == 256 * 1024
    data = os.urandom(200 * 1024)
    status, body = await env.upload(data, "noise.bin", content_type="application/octet-stream")
    assert status == 200, body
    resp = await env.client.post("/upload/image", data=_form(os.urandom(3 << 20)))
    assert resp.status == 413
    assert env.sim.uploads == 1
    assert [f["name"] for f in (await env.inputs())["files"]] == ["noise.bin"]
    assert env.sim.input_dir is not None
    staging = Path(env.sim.input_dir).parent / "uploading"
    # The part received before the limit was hit is gone by the time the 413 is sent.
    assert not any(staging.iterdir())


async def test_a_large_upload_arrives_whole(env):
    data = os.urandom(5 << 20)
    status, body = await env.upload(data, "big.bin", subfolder="cyl",
                                    content_type="application/octet-stream")
    assert status == 200, body
    (entry,) = (await env.inputs())["files"]
    assert (entry["size"], entry["sha256"]) == (len(data), sha(data))


def _form(data: bytes, filename: str = "big.png") -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("image", io.BytesIO(data), filename=filename, content_type="image/png")
    return form


# --- POST /upload/mask ---------------------------------------------------------------------

async def test_a_mask_is_stored_as_the_original_with_the_masks_alpha(env):
    original = png((10, 20, 30), (12, 6))
    assert (await env.upload(original, "photo.png", subfolder="cyl"))[0] == 200
    mask = png((0, 0, 0, 64), (12, 6))
    ref = json.dumps({"filename": "photo.png", "subfolder": "cyl", "type": "input"})
    status, body = await env.upload(mask, "mask.png", path="/upload/mask", subfolder="cyl",
                                    original_ref=ref)
    assert (status, body) == (200, {"name": "mask.png", "subfolder": "cyl", "type": "input"})
    assert env.sim.input_dir is not None
    stored = Image.open(env.sim.input_dir / "cyl" / "mask.png")
    assert (stored.mode, stored.size) == ("RGBA", (12, 6))
    assert stored.getpixel((0, 0)) == (10, 20, 30, 64)
    # What is stored is not what was sent, so the same mask again gets a new name.
    status, body = await env.upload(mask, "mask.png", path="/api/upload/mask",
                                    subfolder="cyl", original_ref=ref)
    assert (status, body["name"]) == (200, "mask (1).png")
    assert env.sim.uploads == 3


async def test_a_mask_without_its_original_answers_but_stores_nothing(env):
    mask = png((0, 0, 0, 0))
    for ref in [{"filename": "gone.png", "subfolder": "cyl", "type": "input"},
                {"filename": "../photo.png", "type": "input"},
                # Without a type the original is looked for among the outputs.
                {"filename": "photo.png", "subfolder": "cyl"}]:
        assert (await env.upload(png((5, 5, 5)), "photo.png", subfolder="cyl"))[0] == 200
        status, body = await env.upload(mask, "lost.png", path="/upload/mask",
                                        original_ref=json.dumps(ref))
        assert (status, body) == (200, {"name": "lost.png", "subfolder": "", "type": "input"})
        assert env.sim.input_dir is not None
        assert not (env.sim.input_dir / "lost.png").exists()
    assert await env.upload(mask, "m.png", path="/upload/mask") == (
        500, INTERNAL_ERROR.encode())
    assert await env.upload(mask, "m.png", path="/upload/mask", original_ref="{") == (
        500, INTERNAL_ERROR.encode())
    ref = json.dumps({"filename": "photo.png", "subfolder": "cyl", "type": "input"})
    assert await env.upload(png((0, 0, 0, 0), (3, 3)), "m.png", path="/upload/mask",
                            original_ref=ref) == (500, INTERNAL_ERROR.encode())


# --- the input folder seen through /view and /object_info ----------------------------------

async def test_view_serves_an_uploaded_input_with_its_subfolder(env):
    data = png((7, 8, 9))
    await env.upload(data, "seen.png", subfolder="cyl/deep")
    params = {"filename": "seen.png", "subfolder": "cyl/deep", "type": "input"}
    resp = await env.client.get("/view", params=params)
    assert resp.status == 200 and resp.content_type == "image/png"
    assert await resp.read() == data
    resp = await env.client.get("/api/view", params={**params, "subfolder": ""})
    assert resp.status == 404 and await resp.read() == b""
    resp = await env.client.get("/view", params={"filename": "seen.png [input]",
                                                 "subfolder": "cyl/deep"})
    assert resp.status == 200


async def test_loader_options_are_the_top_level_files_of_their_kind(env):
    for name, subfolder, kind in [("a.png", "", "image/png"), ("b.png", "cyl", "image/png"),
                                  ("clip.mp4", "", "video/mp4"),
                                  ("sound.wav", "", "audio/wav"),
                                  ("notes.txt", "", "text/plain")]:
        status, _ = await env.upload(b"bytes of " + name.encode(), name, subfolder=subfolder,
                                     content_type=kind)
        assert status == 200
    info = (await (await env.client.get("/object_info/LoadImage")).json())["LoadImage"]
    assert info["input"] == {"required": {"image": [["a.png"], {"image_upload": True}]}}
    assert (info["output"], info["output_name"]) == (["IMAGE", "MASK"], ["IMAGE", "MASK"])
    assert (info["python_module"], info["category"], info["output_node"]) == (
        "nodes", "image", False)
    everything = await (await env.client.get("/api/object_info")).json()
    assert everything["LoadImage"] == info
    options = {name: everything[name]["input"]["required"][field][0] for name, field in [
        ("LoadImageMask", "image"), ("LoadVideo", "file"), ("LoadAudio", "audio")]}
    assert options == {"LoadImageMask": ["a.png", "clip.mp4", "notes.txt", "sound.wav"],
                       "LoadVideo": ["clip.mp4"], "LoadAudio": ["clip.mp4", "sound.wav"]}
    assert everything["LoadImageMask"]["input"]["required"]["channel"][0] == [
        "alpha", "red", "green", "blue"]
    assert everything["LoadVideo"]["output"] == ["VIDEO"]
    assert everything["LoadAudio"]["output"] == ["AUDIO"]


# --- loader nodes --------------------------------------------------------------------------

async def test_load_image_output_carries_the_files_digest_size_and_colour(env):
    data = png((10, 200, 30), (16, 12))
    assert (await env.upload(data, "in.png", subfolder="cyl"))[0] == 200
    entry = await env.run(loaded("cyl/in.png"))
    saved = env.saved(entry)
    assert saved.size == (16, 12)
    assert saved.convert("RGB").getpixel((0, 0)) == (245, 55, 225)
    assert saved.text["source_sha256"] == sha(data)
    again = await env.run(loaded("cyl/in.png"))
    cached = dict(again["status"]["messages"])["execution_cached"]["nodes"]
    assert sorted(cached) == ["1", "2", "3"]
    # Overwritten with other bytes, the file is loaded again, as its digest changed.
    other = png((0, 0, 0), (4, 4))
    await env.upload(other, "in.png", subfolder="cyl", overwrite="true")
    entry = await env.run(loaded("cyl/in.png"))
    assert dict(entry["status"]["messages"])["execution_cached"]["nodes"] == []
    saved = env.saved(entry)
    assert (saved.size, saved.text["source_sha256"]) == ((4, 4), sha(other))


async def test_an_image_from_two_files_lists_both_digests_in_order(env):
    first, second = png((0, 0, 0)), png((255, 255, 255))
    await env.upload(first, "a.png", subfolder="cyl")
    await env.upload(second, "b.png", subfolder="cyl")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cyl/b.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "cyl/a.png"}},
        "4": {"class_type": "ImageBlend", "inputs": {"image1": ["1", 0], "image2": ["2", 0],
                                                     "blend_factor": 0.5,
                                                     "blend_mode": "normal"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["4", 0],
                                                    "filename_prefix": "cyl/blend"}},
    }
    saved = env.saved(await env.run(prompt))
    assert saved.text["source_sha256"] == ",".join(sorted([sha(first), sha(second)]))
    assert saved.convert("RGB").getpixel((0, 0)) == (128, 128, 128)


async def test_img2img_output_names_its_input_through_the_sampler(env):
    data = png((90, 60, 30), (64, 48))
    await env.upload(data, "start.png", subfolder="cyl")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cyl/start.png"}},
        "2": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 2]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["2", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": 1, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["5", 0], "negative": ["6", 0],
            "latent_image": ["4", 0], "denoise": 0.6}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["2", 2]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["8", 0],
                                                    "filename_prefix": "cyl/i2i"}},
    }
    saved = env.saved(await env.run(prompt))
    assert (saved.size, saved.text["source_sha256"]) == ((64, 48), sha(data))


@pytest.mark.parametrize(("rgba", "channel", "level"), [
    ((200, 100, 50), "red", 200), ((200, 100, 50), "blue", 50), ((200, 100, 50), "alpha", 0),
    ((1, 2, 3, 64), "alpha", 191), ((1, 2, 3, 64), "green", 2)])
async def test_load_image_mask_reads_the_channel(env, rgba, channel, level):
    data = png(rgba, (5, 7))
    await env.upload(data, "mask.png", subfolder="cyl")
    prompt = {
        "1": {"class_type": "LoadImageMask", "inputs": {"image": "cyl/mask.png",
                                                        "channel": channel}},
        "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": "cyl/mask"}},
    }
    saved = env.saved(await env.run(prompt))
    assert saved.size == (5, 7)
    assert saved.convert("RGB").getpixel((0, 0)) == (level, level, level)
    assert saved.text["source_sha256"] == sha(data)


async def test_load_image_mask_output_is_the_inverted_alpha(env):
    data = png((1, 2, 3, 255 - 40), (6, 6))
    await env.upload(data, "rgba.png", subfolder="cyl")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cyl/rgba.png"}},
        "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 1]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": "cyl/alpha"}},
    }
    saved = env.saved(await env.run(prompt))
    assert (saved.size, saved.convert("RGB").getpixel((0, 0))) == ((6, 6), (40, 40, 40))


async def test_load_video_and_load_audio_take_uploaded_files_by_name(env):
    video, audio = b"\x00\x00\x00\x18ftypmp42 not really a video", b"RIFF....WAVEfmt "
    assert (await env.upload(video, "clip.mp4", subfolder="cyl",
                             content_type="video/mp4"))[0] == 200
    assert (await env.upload(audio, "sound.wav", subfolder="cyl",
                             content_type="audio/wav"))[0] == 200
    prompt = {
        "1": {"class_type": "LoadVideo", "inputs": {"file": "cyl/clip.mp4"}},
        "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": "cyl/frame"}},
    }
    assert env.saved(await env.run(prompt)).text["source_sha256"] == sha(video)
    prompt = {
        "1": {"class_type": "LoadAudio", "inputs": {"audio": "cyl/sound.wav"}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    entry = await env.run(prompt)
    assert "sample_rate" in entry["outputs"]["3"]["text"][0]


async def test_missing_files_are_refused_with_comfyuis_error(env):
    await env.upload(png((1, 1, 1)), "in.png", subfolder="cyl")
    for name in ["cyl/missing.png", "in.png", "../../../../../../etc/hostname", "/etc/hostname",
                 "cyl/../../outside.png"]:
        body = await env.submit(loaded(name), status=400)
        assert body == refusal("LoadImage", f"image - Invalid image file: {name}", "image")
    for class_type, field, kind, name in [("LoadVideo", "file", "video", "cyl/missing.mp4"),
                                          ("LoadAudio", "audio", "audio", "cyl/missing.wav")]:
        prompt = {"1": {"class_type": class_type, "inputs": {field: name}},
                  "3": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
        body = await env.submit(prompt, status=400)
        assert body == refusal(class_type, f"{field} - Invalid {kind} file: {name}", field)
    prompt = {
        "1": {"class_type": "LoadImageMask", "inputs": {"image": "nope.png", "channel": "x"}},
        "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": "cyl/m"}},
    }
    errors = (await env.submit(prompt, status=400))["node_errors"]["1"]["errors"]
    assert [(e["type"], e["details"]) for e in errors] == [
        ("value_not_in_list", "channel: 'x' not in ['alpha', 'red', 'green', 'blue']"),
        ("custom_validation_failed", "image - Invalid image file: nope.png")]
    # A folder may be named by its annotation, as in ComfyUI.
    await env.run(loaded("cyl/in.png [input]"))


async def test_a_file_gone_by_the_time_the_node_runs_is_an_execution_error(env):
    await env.upload(png((3, 3, 3)), "brief.png", subfolder="cyl")
    env.sim.pause("dequeue")
    prompt_id = (await env.submit(loaded("cyl/brief.png")))["prompt_id"]
    assert env.sim.input_dir is not None
    (env.sim.input_dir / "cyl" / "brief.png").unlink()
    env.sim.resume()
    await wait_until(lambda: prompt_id in env.sim.history)
    entry = env.sim.history[prompt_id]
    assert entry["status"]["status_str"] == "error"
    error = dict(entry["status"]["messages"])["execution_error"]
    assert (error["node_id"], error["node_type"], error["exception_type"]) == (
        "1", "LoadImage", "FileNotFoundError")
    assert error["exception_message"].startswith("[Errno 2] No such file or directory")


async def test_inputs_belong_to_one_simulated_gpu(make_sim):
    first, second = await make_sim(0), await make_sim(1)
    await first.upload(png((4, 4, 4)), "mine.png", subfolder="cyl")
    await first.run(loaded("cyl/mine.png"))
    body = await second.submit(loaded("cyl/mine.png"), status=400)
    assert body == refusal("LoadImage", "image - Invalid image file: cyl/mine.png", "image")
    assert (first.sim.uploads, second.sim.uploads) == (1, 0)


# --- restarts ------------------------------------------------------------------------------

async def test_restart_keeps_the_inputs_unless_told_to_wipe_them(env):
    data = png((6, 6, 6))
    await env.upload(data, "kept.png", subfolder="cyl")
    await env.sim.restart()
    assert [f["name"] for f in (await env.inputs())["files"]] == ["kept.png"]
    await env.run(loaded("cyl/kept.png"))
    resp = await env.client.post("/_sim/restart", data=json.dumps({"wipe_inputs": True}))
    assert resp.status == 200 and await resp.json() == {"ok": True}
    assert await env.inputs() == {"uploads": 1, "files": []}
    await env.submit(loaded("cyl/kept.png"), status=400)
    await env.upload(data, "again.png")
    await env.sim.restart(wipe_inputs=True)
    assert (await env.inputs())["files"] == []
    assert env.sim.uploads == 2
