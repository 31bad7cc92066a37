"""The Python client against the real service and simulated GPUs, over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cylindria.addresses import free_port_run
from cylindria.app import create_app
from cylindria.appkeys import GPUS, WAITERS
from cylindria.client import AsyncClient, Client, CylindriaError
from cylindria.client.files import output_name, safe_name, unique_path
from cylindria.config import Settings
from cylindria.simulator import ComfySimulator
from cylindria.web.serving import start_server

from helpers import FAST, running_demo, wait_until
from workflows import quick, txt2img

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class Service:
    url: str
    sim: ComfySimulator
    app: web.Application


@pytest.fixture
async def service(start_sims):
    """Cylindria on a real loopback port in front of one simulated GPU."""
    runners = []

    async def start(**settings: Any) -> Service:
        cluster = await start_sims(1)
        port = free_port_run(1)
        config = Settings(comfy_url=cluster.base_url, port=port, timing=FAST, **settings)
        app = create_app(config)
        runners.append(await start_server(app, config))
        await wait_until(lambda: all(g.listener_connected for g in app[GPUS]),
                         what="listeners to connect")
        return Service(f"http://127.0.0.1:{port}", cluster.sims[0], app)

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`cylindria demo` in a process of its own, for the blocking client."""
    with running_demo(tmp_path_factory.mktemp("demo"), "--numberOfGpus", "2",
                      "--step-seconds", "0.01", ready=b'"listeners_connected":2') as url:
        yield url


async def running(cy: AsyncClient, job_id: str) -> dict[str, Any]:
    async def check():
        body = await cy.status(job_id)
        return body if body["state"] == "running" else None
    return await wait_until(check, what=f"{job_id} to run")


# -- the async client ----------------------------------------------------------------

async def test_submit_wait_and_download_a_job(service, tmp_path):
    svc = await service()
    async with AsyncClient(svc.url) as cy:
        reply = await cy.submit("c-1", quick(), gpu=0)
        assert reply["accepted"] is True and reply["gpu_id"] == 0
        final = await cy.wait("c-1", timeout=10)
        assert final["state"] == "completed"
        files = await cy.download("c-1", tmp_path / "out")
        assert [f.parent for f in files] == [tmp_path / "out"]
        assert files[0].read_bytes().startswith(PNG)
        assert list((tmp_path / "out").iterdir()) == files  # no partial file left
        page = await cy.jobs(state=["completed"], gpu=0, limit=5)
        assert [j["job_id"] for j in page["jobs"]] == ["c-1"]
        assert (await cy.server_status(0))["reachable"] is True
        assert (await cy.gpus())["gpus"][0]["gpu_id"] == 0


async def test_a_workflow_file_and_input_files_go_as_one_form(service, tmp_path):
    svc = await service()
    async with AsyncClient(svc.url) as cy:
        await cy.submit("img-1", EXAMPLES / "img2img.json",
                        inputs={"photo.png": EXAMPLES / "photo.png"}, priority=5)
        final = await cy.wait("img-1", timeout=10)
        assert final["state"] == "completed", final
        assert [i["name"] for i in final["inputs"]] == ["photo.png"]
        # Bytes do as well as a path; the same bytes under the same id are the same job.
        again = await cy.submit("img-1", EXAMPLES / "img2img.json",
                                inputs={"photo.png": (EXAMPLES / "photo.png").read_bytes()})
        assert again["accepted"] is True and again["state"] == "completed"


async def test_api_errors_carry_their_code_and_sentence(service):
    svc = await service()
    async with AsyncClient(svc.url) as cy:
        with pytest.raises(CylindriaError) as missing:
            await cy.status("nobody")
        assert (missing.value.status, missing.value.code) == (404, "job_not_found")
        assert "PUT /startjob/nobody/" in missing.value.message
        assert missing.value.body["error"]["code"] == "job_not_found"
        with pytest.raises(CylindriaError) as slashed:
            await cy.status("c-2/../../jobs")
        assert (slashed.value.status, slashed.value.code) == (400, "bad_request")
        await cy.submit("c-2", quick(), gpu=0)
        with pytest.raises(CylindriaError) as reused:
            await cy.submit("c-2", quick(), gpu=0)
        assert (reused.value.status, reused.value.code) == (409, "job_id_conflict")
        with pytest.raises(CylindriaError) as bad_gpu:
            await cy.server_status(7)
        assert (bad_gpu.value.status, bad_gpu.value.code) == (400, "unknown_gpu")
        with pytest.raises(CylindriaError) as unreadable:
            await cy.submit("c-3", "/nonexistent/flow.json")
        assert unreadable.value.code == "bad_workflow"


async def test_a_wrong_key_is_401_and_the_right_one_passes(service):
    svc = await service(api_key="s3cret-key-for-tests")
    async with AsyncClient(svc.url, key="wrong") as cy:
        with pytest.raises(CylindriaError) as refused:
            await cy.jobs()
        assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    async with AsyncClient(svc.url, key="s3cret-key-for-tests") as cy:
        assert (await cy.jobs())["jobs"] == []


async def test_an_unreachable_service_is_one_error():
    url = f"http://127.0.0.1:{free_port_run(1)}"
    async with AsyncClient(url, timeout=2) as cy:
        with pytest.raises(CylindriaError) as down:
            await cy.status("x")
    assert (down.value.status, down.value.code) == (0, "unreachable")
    assert url in down.value.message


async def test_last_status_is_the_http_status_of_the_last_answer(service):
    svc = await service()
    async with AsyncClient(svc.url) as cy:
        assert cy.last_status == 0
        workflow = quick()
        await cy.submit("s-1", workflow, gpu=0)
        assert cy.last_status == 202
        await cy.submit("s-1", workflow, gpu=0)
        assert cy.last_status == 200
        with pytest.raises(CylindriaError):
            await cy.status("nobody")
        assert cy.last_status == 404
    with Client(f"http://127.0.0.1:{free_port_run(1)}", timeout=2) as down:
        with pytest.raises(CylindriaError):
            down.gpus()
        assert down.last_status == 0


async def test_a_port_that_does_not_answer_in_http_is_unreachable():
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(banner, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server, AsyncClient(url, timeout=5) as cy:
        with pytest.raises(CylindriaError) as odd:
            await cy.gpus()
    assert (odd.value.status, odd.value.code) == (0, "unreachable")
    assert odd.value.message == (f"{url} did not answer in HTTP (Bad status line): is "
                                 "that Cylindria's address?")


async def test_cancel_retry_and_a_wait_that_runs_out(service):
    svc = await service()
    svc.sim.pause(at="tick")
    async with AsyncClient(svc.url) as cy:
        await cy.submit("c-4", txt2img(steps=3), gpu=0)
        await running(cy, "c-4")
        with pytest.raises(CylindriaError) as late:
            await cy.wait("c-4", timeout=0.3)
        assert late.value.code == "timeout" and late.value.body["state"] == "running"
        answer = await cy.cancel("c-4")
        assert answer["cancel_requested"] is True or answer["state"] == "cancelled"
        svc.sim.resume()
        assert (await cy.wait("c-4", timeout=10))["state"] == "cancelled"
        with pytest.raises(CylindriaError) as finished:
            await cy.cancel("c-4")
        assert (finished.value.status, finished.value.code) == (409, "job_finished")
        retried = await cy.retry("c-4", gpu=0)
        assert retried["attempt"] == 2
        assert (await cy.wait("c-4", timeout=10))["state"] == "completed"


async def test_wait_is_answered_by_the_service_when_the_job_ends(service):
    svc = await service(max_wait=2)
    svc.sim.pause(at="tick")
    async with AsyncClient(svc.url) as cy:
        await cy.submit("c-6", txt2img(steps=3), gpu=0)
        await running(cy, "c-6")
        # Rounds of up to a minute are asked; this service takes 2 s at most.
        waiting = asyncio.create_task(cy.wait("c-6", timeout=30))
        await wait_until(lambda: svc.app[WAITERS].count == 1, what="a wait on the service")
        svc.sim.resume()
        assert (await waiting)["state"] == "completed"


class Cutter:
    """A loopback TCP relay in front of the service whose connections can be cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.connections = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_events_resume_with_the_last_id_after_a_dropped_stream(service):
    svc = await service()
    port = int(svc.url.rsplit(":", 1)[1])
    cutter = Cutter(port)
    url = await cutter.start()
    svc.sim.pause(at="tick")
    try:
        async with AsyncClient(url) as cy, AsyncClient(svc.url) as direct:
            await direct.submit("c-5", txt2img(steps=3), gpu=0)
            # From the first event on: the job's changes so far are replayed.
            stream = cy.events(job_id="c-5", last_event_id="0")
            seen = []
            async with asyncio.timeout(10):
                while not seen or seen[-1].data["state"] != "running":
                    seen.append(await anext(stream))
                # Cut while the job is held at its first step; it finishes meanwhile.
                cutter.cut()
                svc.sim.resume()
                await direct.wait("c-5", timeout=10)
                while seen[-1].data["state"] != "completed":
                    seen.append(await anext(stream))
            await stream.aclose()
        ids = [int(e.id) for e in seen]
        assert ids == sorted(set(ids)), ids
        assert {e.event for e in seen} == {"job"}
        assert cutter.connections >= 2
    finally:
        await cutter.close()


def test_output_names_never_leave_the_folder(tmp_path):
    assert safe_name("../../etc/passwd", "x") == "passwd"
    assert safe_name("..", "x") == "x"
    assert safe_name("a\\b/.hidden png", "x") == "hidden png"
    assert safe_name("evil\x00\n.png", "x") == "evil_.png"
    assert output_name({"kind": "text", "text": "hi"}, "job-1", 2) == "job-1-2.txt"
    assert output_name({"kind": "image", "filename": "/abs/a.png"}, "j", 0) == "a.png"
    first = unique_path(tmp_path, "a.png", [])
    assert unique_path(tmp_path, "a.png", [first]) == tmp_path / "a-2.png"


def test_the_client_and_the_server_do_not_import_each_other():
    probe = ("import sys\n"
             "import cylindria.client\n"
             "print(sorted(m for m in sys.modules if m.startswith('cylindria.')))\n"
             "import cylindria.app, cylindria.cli\n"
             "print('rich' in sys.modules, 'cylindria.runner' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    assert all(m.startswith("cylindria.client") for m in eval(out[0])), out[0]
    assert out[1] == "False False"


# -- the blocking client -------------------------------------------------------------

def test_the_blocking_client_in_plain_code(demo, tmp_path):
    with Client(demo) as cy:
        cy.submit("sync-1", EXAMPLES / "quick.json", gpu="auto")
        assert cy.wait("sync-1", timeout=20)["state"] == "completed"
        files = cy.download("sync-1", tmp_path)
        assert len(files) == 1 and files[0].read_bytes().startswith(PNG)
        with pytest.raises(CylindriaError) as missing:
            cy.cancel("nobody")
        assert missing.value.code == "job_not_found"
    with pytest.raises(CylindriaError) as closed:
        cy.status("sync-1")
    assert closed.value.code == "closed"


def test_blocking_events_replay_from_an_id(demo):
    with Client(demo) as cy:
        cy.submit("sync-2", quick(), gpu=0)
        cy.wait("sync-2", timeout=20)
        stream = cy.events(job_id="sync-2", last_event_id="0")
        first = next(stream)
        stream.close()
        assert first.event == "job" and first.data["state"] == "completed"


async def test_the_blocking_client_works_where_a_loop_runs(demo):
    # As in a notebook: a loop runs in this thread, and the call still blocks and answers.
    with Client(demo) as cy:
        assert cy.gpus()["gpus"][1]["gpu_id"] == 1
