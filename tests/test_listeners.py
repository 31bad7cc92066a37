"""Listening to ComfyUI: reconnection, lost events settled by polling, bad frames."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import random
import time
from types import SimpleNamespace
from typing import Any

import ujson
from aiohttp import web

from cylindria.appkeys import GPUS
from cylindria.core.reading import WorkflowReader
from cylindria.core.records import JobState
from cylindria.core.registry import Registry
from cylindria.core.workflow import MAX_NODES
from cylindria.upstream.listeners import Dispatcher, backoff_delays

import workflows
from helpers import job_status, put_job, start_paused, wait_state, wait_until, with_timing


async def test_listener_reconnects_after_comfyui_drops_it(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    gpu = client.app[GPUS][0]
    sockets_before = cluster.count(0, "GET", "/ws")
    await cluster.sims[0].drop_sockets()
    await wait_until(lambda: cluster.count(0, "GET", "/ws") > sockets_before,
                     what="a new websocket")
    await wait_until(lambda: gpu.listener_connected, what="reconnection")
    status, _ = await put_job(client, "after-drop", workflows.quick())
    assert status == 202
    await wait_state(client, "after-drop", "completed")


def test_backoff_delays_grow_to_the_cap_with_jitter():
    random.seed(7)
    delays = list(itertools.islice(backoff_delays(0.1, 2.0), 40))
    assert all(0.05 <= d <= 2.0 for d in delays)
    # Each delay is drawn below its ceiling: 0.1, 0.2, 0.4 ... then the cap.
    assert all(d <= min(2.0, 0.1 * 2 ** n) for n, d in enumerate(delays))
    assert max(delays[10:]) > 1.0


async def test_listener_backs_off_while_comfyui_refuses(start_cylindria, start_sims):
    attempts: list[float] = []

    @web.middleware
    async def stamp(request, handler):
        if request.path == "/ws":
            attempts.append(time.monotonic())
        return await handler(request)

    cluster = await start_sims(1, middlewares=(stamp,))
    client = await start_cylindria(cluster, timing=with_timing(reconnect_initial=0.1,
                                                               reconnect_max=0.4))
    sim = cluster.sims[0]
    sim.refuse_websockets(True)
    await sim.drop_sockets()
    gpu = client.app[GPUS][0]
    await wait_until(lambda: not gpu.listener_connected, what="disconnect")
    start = len(attempts)
    await wait_until(lambda: len(attempts) >= start + 4, what="four refused reconnects")
    gaps = [b - a for a, b in itertools.pairwise(attempts[start:])]
    # Never a busy loop: every retry waits at least half the initial delay.
    assert min(gaps) >= 0.05, gaps
    body = await (await client.get("/serverstatus")).json()
    assert body["status"] == "degraded" and body["reachable"] is True
    sim.refuse_websockets(False)
    await wait_until(lambda: gpu.listener_connected, what="reconnection")


async def test_job_finishing_while_listener_is_away_is_settled_by_polling(start_cylindria,
                                                                          start_sims):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    gpu = client.app[GPUS][0]
    await start_paused(client, sim, "unseen", workflows.txt2img(steps=3))
    sim.refuse_websockets(True)
    await sim.drop_sockets()
    await wait_until(lambda: not gpu.listener_connected, what="disconnect")
    sim.resume()
    body = await wait_state(client, "unseen", "completed")
    assert not gpu.listener_connected
    assert body["progress"] == 1.0
    assert body["outputs"][0]["node_id"] == "9"
    assert body["outputs"][0]["filename"].endswith(".png")
    sim.refuse_websockets(False)


async def test_job_failing_while_listener_is_away_is_settled_by_polling(start_cylindria,
                                                                        start_sims):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    sim.pause(at="dequeue")
    await put_job(client, "unseen-fail", workflows.fails_at_runtime())
    sim.refuse_websockets(True)
    await sim.drop_sockets()
    await wait_until(lambda: not client.app[GPUS][0].listener_connected, what="disconnect")
    sim.resume()
    body = await wait_state(client, "unseen-fail", "failed")
    assert body["error"]["node_type"] == "SaveImage"


async def test_comfyui_restart_mid_job_fails_the_job_clearly(start_cylindria, start_sims):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    sim.pause(at="tick")
    await put_job(client, "victim", workflows.txt2img(steps=5))
    await put_job(client, "queued-victim", workflows.quick())
    await wait_state(client, "victim", "running")
    await sim.restart()
    sim.resume()
    for job_id in ("victim", "queued-victim"):
        body = await wait_state(client, job_id, "failed")
        assert "restarted" in body["detail"]
        assert body["error"]["type"] == "lost"
        # The running one may have got further than Cylindria heard: it says so.
        assert ("had started running" in body["detail"]) == (job_id == "victim")
    await wait_until(lambda: client.app[GPUS][0].listener_connected, what="reconnect")
    status, _ = await put_job(client, "after-restart", workflows.quick())
    assert status == 202
    await wait_state(client, "after-restart", "completed")


async def test_reconnect_hint_keeps_tracking_the_running_job(start_cylindria, start_sims):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    gpu = client.app[GPUS][0]
    await start_paused(client, sim, "hinted", workflows.txt2img(steps=3))
    await sim.drop_sockets()
    await wait_until(lambda: not gpu.listener_connected, what="disconnect")
    await wait_until(lambda: gpu.listener_connected, what="reconnect")
    sim.resume()
    body = await wait_state(client, "hinted", "completed")
    assert body["progress"] == 1.0


# -- the dispatcher, fed frames directly ------------------------------------------------

def make_dispatcher() -> tuple[Dispatcher, Registry, Any]:
    registry = Registry()
    # The dispatcher reads a GPU's number and writes its queue length and message
    # counts, nothing else.
    gpu = SimpleNamespace(index=0, queue_remaining=None, messages=collections.Counter())
    return (Dispatcher(gpu, registry, asyncio.Event(), WorkflowReader(MAX_NODES)), registry,
            gpu)


async def test_malformed_frames_are_logged_and_skipped(caplog):
    dispatcher, registry, gpu = make_dispatcher()
    job = registry.begin("j", 0, "p", "f", ["1", "2"])
    registry.confirm(job)
    with caplog.at_level(logging.WARNING):
        for frame in ("not json", "[]", '{"no_type": 1}', '{"type": "status", "data": 5}',
                      '{"type": "status", "data": {"status": {}}}',
                      '{"type": "progress", "data": {"prompt_id": "p"}}',
                      '{"type": "executed", "data": {"prompt_id": "p"}}'):
            await dispatcher.handle_text(frame)
    assert caplog.text.count("skipping") == 7
    await dispatcher.handle_text(ujson.dumps({"type": "execution_start",
                                              "data": {"prompt_id": "p"}}))
    await dispatcher.handle_text(ujson.dumps({"type": "status", "data": {
        "status": {"exec_info": {"queue_remaining": 3}}}}))
    assert job.state is JobState.RUNNING and gpu.queue_remaining == 3


async def test_execution_blocked_notice_does_not_end_the_job():
    dispatcher, registry, _ = make_dispatcher()
    job = registry.begin("j", 0, "p", "f", ["1"])
    dispatcher.dispatch("execution_error", {"prompt_id": "p", "exception_type":
                                            "ExecutionBlocked", "exception_message": "x"})
    assert job.state is JobState.QUEUED
    dispatcher.dispatch("execution_success", {"prompt_id": "p"})
    assert job.state is JobState.COMPLETED


async def test_frames_over_four_mib_do_not_break_the_listener(start_cylindria, aiohttp_server):
    """A ComfyUI that sends a big preview (SaveImageWebsocket does) keeps its listener."""
    sent = asyncio.Event()

    async def ws_handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(ujson.dumps({"type": "status", "data": {
            "status": {"exec_info": {"queue_remaining": 0}}, "sid": "x"}}))
        await ws.send_bytes(b"\x00\x00\x00\x01\x00\x00\x00\x02" + b"\x89" * (9 * 1024 * 1024))
        await ws.send_str("x" * (5 * 1024 * 1024))
        await ws.send_str(ujson.dumps({"type": "status", "data": {
            "status": {"exec_info": {"queue_remaining": 7}}}}))
        sent.set()
        async for _ in ws:
            pass
        return ws

    async def system_stats(request):
        return web.json_response({"system": {"comfyui_version": "0.8.0"}, "devices": []})

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/system_stats", system_stats)
    server = await aiohttp_server(app)
    client = await start_cylindria(comfy_url=f"http://127.0.0.1:{server.port}", num_gpus=1,
                                   connect=False)
    gpu = client.app[GPUS][0]
    await wait_until(lambda: gpu.queue_remaining == 7, what="the frame after the big ones")
    assert gpu.listener_connected
    body = await job_status_or_none(client)
    assert body is None


async def job_status_or_none(client):
    resp = await client.get("/jobstatus/none/")
    return None if resp.status == 404 else await resp.json()


async def test_job_status_shows_queued_detail(start_cylindria, start_sims):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    sim.pause(at="dequeue")
    await put_job(client, "waiting", workflows.quick())
    body = await wait_until(lambda: _if_pos(client, "waiting"), what="position")
    assert body["state"] == "queued" and "position 1" in body["detail"]
    sim.resume()
    await wait_state(client, "waiting", "completed")


async def _if_pos(client, job_id):
    body = await job_status(client, job_id)
    return body if body["queue_position"] == 1 else None


async def waiting_job(start_cylindria, start_sims, tmp_path, job_id, gpu):
    """One simulated GPU that takes nothing from its queue, a Cylindria that runs lost
    jobs again once, and `job_id` waiting in ComfyUI's queue."""
    cluster = await start_sims(1)
    state = tmp_path / "state.sqlite3"
    client = await start_cylindria(cluster, state_file=state, retry_lost=1,
                                   timing=with_timing(lost_grace=0.2))
    cluster.sims[0].pause(at="dequeue")
    status, _ = await put_job(client, job_id, workflows.quick(), gpu=gpu)
    assert status == 202
    return cluster, client, state


async def test_a_lost_auto_job_waits_in_line_for_a_gpu_even_across_a_restart(
        start_cylindria, start_sims, tmp_path):
    """ComfyUI restarts and does not take websockets yet: the auto job it lost is run
    again by itself (CYLINDRIA_RETRY_LOST), held in Cylindria's queue until a GPU is
    ready, after Cylindria's own restart too."""
    cluster, client, state = await waiting_job(start_cylindria, start_sims, tmp_path,
                                               "again", "auto")
    sim = cluster.sims[0]
    sim.refuse_websockets(True)
    await sim.restart()
    sim.resume()

    async def held_again() -> dict[str, Any] | None:
        body = await job_status(client, "again")
        return body if body["attempt"] == 2 and body["gpu_id"] is None else None

    body = await wait_until(held_again, what="a second attempt, held", timeout=10)
    assert body["state"] == "queued" and body["attempts"][0]["error"]["type"] == "lost"
    await client.close()

    client = await start_cylindria(cluster, state_file=state, retry_lost=1, connect=False,
                                   timing=with_timing(lost_grace=0.2))
    assert (await job_status(client, "again"))["queue_position"] == 1
    sim.refuse_websockets(False)
    body = await wait_state(client, "again", "completed", timeout=15)
    assert body["attempt"] == 2
    assert sim.ledger[body["prompt_id"]]["outcome"] == "success"


async def test_a_lost_job_whose_gpu_is_drained_owes_its_retry_until_undrained(
        start_cylindria, start_sims, tmp_path):
    """A job sent to one GPU is run again there: while that GPU is drained, the retry
    is owed (kept in the state file, said in the detail) and made once it is not."""
    cluster, client, state = await waiting_job(start_cylindria, start_sims, tmp_path,
                                               "owed", 0)
    sim = cluster.sims[0]
    assert (await client.post("/gpus/0/drain")).status == 200
    await sim.restart()
    sim.resume()
    body = await wait_until(lambda: _owed(client), what="the retry to be owed", timeout=10)
    assert body["state"] == "failed" and body["error"]["type"] == "lost"
    await client.close()

    client = await start_cylindria(cluster, state_file=state, retry_lost=1,
                                   timing=with_timing(lost_grace=0.2))
    body = await job_status(client, "owed")
    assert "automatically as soon as a GPU is ready" in body["detail"]
    # Drains are not kept across a restart: the GPU is open again, the debt is paid.
    body = await wait_state(client, "owed", "completed", timeout=15)
    assert body["attempt"] == 2 and body["gpu_id"] == 0


async def _owed(client) -> dict[str, Any] | None:
    body = await job_status(client, "owed")
    return body if "automatically as soon as a GPU is ready" in body["detail"] else None


async def test_outputs_made_while_the_listener_was_away_are_all_reported(start_sims,
                                                                         start_cylindria):
    cluster = await start_sims(1, step_seconds=0.01)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    gpu = client.app[GPUS][0]
    sim.refuse_websockets(True)
    await sim.drop_sockets()
    await wait_until(lambda: not gpu.listener_connected, what="the listener to drop")
    sim.pause(at="tick")
    status, body = await put_job(client, "away", workflows.two_saves(steps=4), gpu=0)
    assert status == 202, body
    async with asyncio.timeout(5):
        await sim.until_blocked()  # the early images are saved; no event reached us
    sim.refuse_websockets(False)
    await wait_until(lambda: gpu.listener_connected, what="the listener to come back")
    sim.resume()
    done = await wait_state(client, "away", "completed")
    history = sim.history[done["prompt_id"]]["outputs"]
    assert sorted(o["filename"] for o in done["outputs"]) == sorted(
        image["filename"] for output in history.values() for image in output["images"])
    assert len(done["outputs"]) == 3


async def test_a_long_queue_is_read_less_often_while_the_listener_is_connected(
        start_sims, start_cylindria):
    cluster = await start_sims(1)
    sim = cluster.sims[0]
    client = await start_cylindria(cluster)
    sim.pause(at="dequeue")
    for n in range(100):  # 100 jobs waiting: a whole reading every 0.5 s at most
        status, body = await put_job(client, f"long-{n}", workflows.quick(), gpu=0)
        assert status == 202, body
    before = cluster.count(0, "GET", "/queue")
    started = time.monotonic()
    await asyncio.sleep(1.0)  # the poll interval is 0.05 s: 20 readings without the rule
    reads = cluster.count(0, "GET", "/queue") - before
    assert 1 <= reads <= 1 + (time.monotonic() - started) / 0.5, reads
    # Without its listener, polling is all there is: the queue is read every interval.
    sim.refuse_websockets(True)
    await sim.drop_sockets()
    gpu = client.app[GPUS][0]
    await wait_until(lambda: not gpu.listener_connected, what="the listener to drop")
    before = cluster.count(0, "GET", "/queue")
    await asyncio.sleep(1.0)
    assert cluster.count(0, "GET", "/queue") - before >= 6
    sim.refuse_websockets(False)
    sim.resume()
    await wait_state(client, "long-99", "completed", timeout=10)
