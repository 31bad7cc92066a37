"""Replays the recorded ComfyUI 0.8.0 exchanges against the simulator and compares."""

from __future__ import annotations

import asyncio
import io
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import ujson
from aiohttp.test_utils import TestServer
from PIL import Image

from cylindria.simulator import ComfySimulator, SimSettings

from simulator_support import WAIT, Frame, Listener

TRANSCRIPTS = Path(__file__).parent / "transcripts"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Numbers worth comparing; the others are timestamps and queue numbers that depend on
# what the recorded server had done before.
COMPARED_NUMBERS = {"queue_remaining", "value", "max", "outputs_count", "offset", "limit",
                    "total"}
# How a recording describes an uploaded file: "<name, 93 bytes png>".
RECORDED_FILE = re.compile(r"<(?P<name>.+), (?P<size>\d+) bytes (?P<kind>\w+)>")


@dataclass
class Transcript:
    name: str
    header: dict[str, Any]
    events: list[dict[str, Any]]

    @classmethod
    def load(cls, name: str) -> Transcript:
        lines = (TRANSCRIPTS / f"{name}.jsonl").read_text().splitlines()
        rows = [ujson.loads(line) for line in lines if line.strip()]
        return cls(name, rows[0], rows[1:])

    @property
    def http(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == "http"]

    def frames(self, socket: str, client_id: str) -> list[Frame]:
        """The socket's frames, with the recorded client id replaced by `client_id`."""
        frames = []
        for event in self.events:
            if event["kind"] != "ws" or event["socket"] != socket:
                continue
            if event["frame"] == "text":
                frames.append(Frame("text", substitute(event["msg"], self.client_id,
                                                       client_id)))
            elif event["frame"] == "binary":
                binary = event["binary"]
                frames.append(Frame("binary", data=binary["event"].to_bytes(4, "big")
                                    + binary.get("image_format", 0).to_bytes(4, "big")))
            else:
                frames.append(Frame("closed"))
        return frames

    @property
    def client_id(self) -> str:
        first = next(e for e in self.events if e["kind"] == "ws")
        return first["msg"]["data"]["sid"]


def substitute(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return new if value == old else value
    if isinstance(value, list):
        return [substitute(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, old, new) for k, v in value.items()}
    return value


def _normalize(text: str) -> str:
    return re.sub(r"_\d{5}_\.png", "_NNNNN_.png", text)


def assert_like(expected: Any, actual: Any, path: str = "$") -> None:
    """Same structure, key order and JSON types; strings equal after normalising output
    filenames; only meaningful numbers compared; lists of ids compared as multisets."""
    key = path.rsplit(".", 1)[-1]
    if isinstance(expected, str) and re.fullmatch(r"<\d+ bytes elided>", expected):
        return
    if key == "traceback":
        assert isinstance(actual, list) and all(isinstance(x, str) for x in actual), path
        return
    if key == "exception_message":
        assert isinstance(actual, str) and actual.endswith("\n"), path
        assert actual.split("\n")[0] == expected.split("\n")[0], path
        return
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: {actual!r}"
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        if "current_inputs" in path:
            return
        for k in expected:
            assert_like(expected[k], actual[k], f"{path}.{k}")
        return
    if isinstance(expected, list):
        assert isinstance(actual, list), f"{path}: {actual!r}"
        assert len(actual) == len(expected), f"{path}: {len(actual)} != {len(expected)}"
        if expected and all(isinstance(x, str) for x in expected):
            assert sorted(map(_normalize, actual)) == sorted(map(_normalize, expected)), path
            return
        for index, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_like(e, a, f"{path}[{index}]")
        return
    assert type(actual) is type(expected), f"{path}: {actual!r} vs recorded {expected!r}"
    if isinstance(expected, str):
        assert _normalize(actual) == _normalize(expected), f"{path}: {actual!r} != {expected!r}"
    elif isinstance(expected, bool) or expected is None:
        assert actual == expected, path
    elif key in COMPARED_NUMBERS:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


# --- turning frames into comparable tokens ------------------------------------------------

def token(frame: Frame) -> tuple[Any, ...]:
    if frame.kind == "closed":
        return ("closed",)
    if frame.kind == "binary":
        return ("binary", frame.event, int.from_bytes(frame.data[4:8], "big"))
    msg = frame.msg
    assert msg is not None
    kind, data = msg["type"], msg["data"]
    if kind == "status":
        return (kind, data["status"]["exec_info"]["queue_remaining"], "sid" in data)
    if kind == "executing":
        return (kind, data["node"], data.get("prompt_id"))
    if kind == "executed":
        return (kind, data["node"], _normalize(ujson.dumps(data["output"])))
    if kind == "execution_cached":
        return (kind, tuple(data["nodes"]), data["prompt_id"])
    if kind in ("execution_error", "execution_interrupted"):
        return (kind, data["node_id"], data["node_type"], tuple(sorted(data["executed"])),
                data.get("exception_type"), data["prompt_id"])
    if kind == "progress":
        return (kind, data["node"], data["value"], data["max"], data["prompt_id"])
    if kind == "progress_state":
        # repr keeps 1 and 1.0 apart, as the recordings do.
        return (kind, data["prompt_id"], tuple(
            (n, s["state"], repr(s["value"]), repr(s["max"])) for n, s in data["nodes"].items()))
    return (kind, data.get("prompt_id"))


def is_tick(frame: Frame) -> bool:
    if frame.kind == "binary":
        return True
    msg = frame.msg
    if msg is None:
        return False
    if msg["type"] == "progress":
        return True
    return msg["type"] == "progress_state" and any(
        s["state"] == "running" and not isinstance(s["value"], float)
        for s in msg["data"]["nodes"].values())


def streams(frames: list[Frame], collapse_ticks: bool
            ) -> tuple[list[tuple[Any, Frame | None]], list[tuple[Any, Frame]]]:
    """(job stream, status stream). Status messages are compared apart because their
    interleaving with job events depends on timing."""
    job: list[tuple[Any, Frame | None]] = []
    status: list[tuple[Any, Frame]] = []
    for frame in frames:
        if frame.type == "status":
            status.append((token(frame), frame))
        elif collapse_ticks and is_tick(frame):
            if not job or job[-1][0] != ("ticks",):
                job.append((("ticks",), None))
        else:
            job.append((token(frame), frame))
    return job, status


def compare_frames(recorded: list[Frame], actual: list[Frame], collapse_ticks: bool) -> None:
    rec_job, rec_status = streams(recorded, collapse_ticks)
    act_job, act_status = streams(actual, collapse_ticks)
    assert [t for t, _ in act_job] == [t for t, _ in rec_job]
    assert [t for t, _ in act_status] == [t for t, _ in rec_status]
    for (_, rec), (_, act) in zip(rec_job + rec_status, act_job + act_status, strict=True):
        if rec is not None and act is not None and rec.msg is not None:
            assert act.msg is not None
            assert_like(rec.msg, act.msg, f"$<{rec.type}>")
    # The job's end: its final status, then `executing` null, back to back.
    texts = [f.msg for f in actual if f.msg is not None]
    for index, msg in enumerate(texts):
        if msg["type"] == "executing" and msg["data"]["node"] is None:
            assert texts[index - 1]["type"] == "status"


# --- replay ------------------------------------------------------------------------------

@dataclass
class Replay:
    transcript: Transcript
    sim: ComfySimulator
    server: TestServer
    session: aiohttp.ClientSession
    client_id: str = field(default_factory=lambda: f"cylindria-rec-{secrets.token_hex(4)}")
    listeners: dict[str, Listener] = field(default_factory=dict)
    current: str = "listener"
    # Jobs accepted and not deleted: each must end with `executing` null.
    expected: list[str] = field(default_factory=list)
    # The bytes of each recorded upload, by file name, in the order they were sent (the
    # recordings keep only names and sizes).
    uploads: dict[str, list[bytes]] = field(default_factory=dict)

    def url(self, path: str) -> Any:
        return self.server.make_url(path)

    async def listen(self, name: str) -> Listener:
        listener = await Listener.connect(
            self.session, self.url("/ws").with_query(clientId=self.client_id))
        self.listeners[name] = listener
        self.current = name
        await listener.wait_message("status")
        return listener

    async def settle(self) -> None:
        listener = self.listeners[self.current]
        for prompt_id in self.expected:
            await listener.wait_done(prompt_id)

    async def perform(self, exchange: dict[str, Any]) -> None:
        method, path = exchange["method"], exchange["path"]
        request = substitute(exchange.get("request"), self.transcript.client_id,
                             self.client_id)
        kwargs: dict[str, Any] = {}
        if isinstance(request, str) and request.startswith("<raw bytes: "):
            kwargs["data"] = request[len("<raw bytes: "):-1].encode()
        elif isinstance(request, dict) and "multipart" in request:
            kwargs["data"] = self.form(request["multipart"])
        elif request is not None:
            kwargs["json"] = request
        if "query" in exchange:
            kwargs["params"] = exchange["query"]
        async with self.session.request(method, self.url(path), **kwargs) as resp:
            body = await resp.read()
            content_type = resp.headers.get("Content-Type", "")
            status = resp.status
        where = f"{method} {path}"
        assert status == exchange["status"], where
        assert content_type == exchange["content_type"], where
        expected = substitute(exchange["response"], self.transcript.client_id, self.client_id)
        if content_type.startswith("application/json"):
            actual = ujson.loads(body)
            assert_like(expected, actual, where)
            if method == "POST" and path == "/prompt" and status == 200:
                self.expected.append(actual["prompt_id"])
        elif content_type == "image/png":
            assert body.startswith(PNG_SIGNATURE), where
        else:
            assert body.decode() == expected, where
        if method == "POST" and path == "/queue" and isinstance(request, dict):
            for prompt_id in request.get("delete", []):
                self.expected.remove(prompt_id)

    def form(self, fields: dict[str, str]) -> aiohttp.FormData:
        form = aiohttp.FormData()
        for name, value in fields.items():
            match = RECORDED_FILE.fullmatch(value)
            if match is None:
                form.add_field(name, value)
                continue
            data = self.uploads[match["name"]].pop(0)
            form.add_field(name, io.BytesIO(data), filename=match["name"],
                           content_type=f"image/{match['kind']}")
        return form

    async def run(self, before: Callable[[int, dict[str, Any]], Awaitable[bool]] | None = None,
                  after: Callable[[int, dict[str, Any]], Awaitable[None]] | None = None
                  ) -> None:
        await self.listen("listener")
        for index, exchange in enumerate(self.transcript.http):
            # By default every request waits for the jobs before it to end, as recorded.
            if before is None or not await before(index, exchange):
                await self.settle()
            await self.perform(exchange)
            if after is not None:
                await after(index, exchange)
        await self.settle()
        for listener in self.listeners.values():
            if not listener.closed:
                await listener.close()

    def compare(self, collapse_ticks: bool = False) -> None:
        sockets = {e["socket"] for e in self.transcript.events if e["kind"] == "ws"}
        assert sockets == set(self.listeners)
        for name in sorted(sockets):
            compare_frames(self.transcript.frames(name, self.client_id),
                           self.listeners[name].frames,
                           collapse_ticks)


@pytest.fixture
async def replay_for(aiohttp_server, tmp_path):
    sessions: list[aiohttp.ClientSession] = []

    async def make(name: str) -> Replay:
        sim = ComfySimulator(SimSettings(step_seconds=0, output_dir=tmp_path / "output"))
        server = await aiohttp_server(sim.create_app())
        session = aiohttp.ClientSession()
        sessions.append(session)
        return Replay(Transcript.load(name), sim, server, session)

    yield make
    for session in sessions:
        await session.close()


@pytest.mark.parametrize("name", ["success", "cached", "execution_error", "validation_errors"])
async def test_sequential_scenarios_match_the_recording(replay_for, name):
    replay = await replay_for(name)
    await replay.run()
    replay.compare()


async def test_delete_pending_matches_the_recording(replay_for):
    replay = await replay_for("delete_pending")
    sim = replay.sim
    # The first job holds at its first streamed frame while the others queue behind it.
    sim.pause("tick")

    async def before(index: int, exchange: dict[str, Any]) -> bool:
        return index <= 5

    async def after(index: int, exchange: dict[str, Any]) -> None:
        if index == 0:
            async with asyncio.timeout(WAIT):
                assert (await sim.until_blocked()).startswith("tick:")
        if index == 5:
            sim.resume()

    await replay.run(before, after)
    replay.compare()
    assert [h["method"] + h["path"] for h in replay.transcript.http[3:6]] == [
        "GET/queue", "POST/queue", "GET/queue"]


async def test_interrupt_running_matches_the_recording(replay_for):
    replay = await replay_for("interrupt_running")
    sim = replay.sim
    sim.pause("tick")

    async def before(index: int, exchange: dict[str, Any]) -> bool:
        return exchange["path"] in ("/queue", "/interrupt")

    async def after(index: int, exchange: dict[str, Any]) -> None:
        if index == 0:
            async with asyncio.timeout(WAIT):
                await sim.until_blocked()
            await replay.listeners["listener"].wait_message("progress")
        if exchange["path"] == "/interrupt":
            sim.resume()

    await replay.run(before, after)
    # The recording got a few more frames out before the interrupt landed; that lag is
    # timing, so runs of progress ticks are compared as one.
    replay.compare(collapse_ticks=True)
    interrupted = replay.listeners["listener"].texts("execution_interrupted")
    assert interrupted[0]["data"]["node_id"] == "3"


async def test_reconnect_mid_job_matches_the_recording(replay_for):
    replay = await replay_for("reconnect_mid_job")
    sim = replay.sim
    sim.pause("node")

    async def after(index: int, exchange: dict[str, Any]) -> None:
        if index != 0:
            return
        listener = replay.listeners["listener"]
        await listener.wait_message("executing", node="1")
        await listener.close()
        # Step the job, unseen, into node 2 (the order is 1, 4, 2, 3), as in the recording.
        for node in ("4", "2"):
            sim.resume()
            sim.pause("node")
            async with asyncio.timeout(WAIT):
                assert await sim.until_blocked() == f"node:{node}"
        reconnected = await replay.listen("listener-reconnected")
        await reconnected.wait_message("executing", node="2")
        sim.resume()

    await replay.run(after=after)
    replay.compare()


def solid_png(rgba: tuple[int, ...], size: tuple[int, int] = (8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA" if len(rgba) == 4 else "RGB", size, rgba).save(out, format="PNG")
    return out.getvalue()


async def test_upload_and_load_matches_the_recording(replay_for):
    replay = await replay_for("upload_and_load")
    # The recorded server's input folder held the example.png ComfyUI ships with.
    assert replay.sim.input_dir is not None
    (replay.sim.input_dir / "example.png").write_bytes(solid_png((128, 128, 128)))
    first, other = solid_png((10, 20, 30)), solid_png((200, 100, 50))
    # Sent: the image (overwrite), the same bytes again, other bytes (renamed), other
    # bytes with overwrite; then a path escape, a temp file and the mask.
    replay.uploads = {"in-2e5c7c.png": [first, first, other, other],
                      "../evil-2e5c7c.png": [first], "tmp-2e5c7c.png": [first],
                      "mask-2e5c7c.png": [solid_png((0, 0, 0, 0))]}
    await replay.run()
    replay.compare()
    assert all(not files for files in replay.uploads.values())
    assert replay.sim.uploads == 6
