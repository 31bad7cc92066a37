"""Nodes sharing one PostgreSQL database: a job held by one node cancelled through another
(passed on as a request the holding node reads at once, or at its next heartbeat), and
refused when the holding node is not alive; its outputs fetched, its retry passed on and
its events followed through another node."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable

import aiohttp
import psycopg
import pytest
from aiohttp import web
from test_cluster_nodes import HEARTBEAT, SLOW_STEPS, Cluster, Node, column
from test_cluster_nodes import cluster as cluster  # the fixture

from cylindria.core.registry import Registry
from cylindria.errors import BackendUnavailable
from cylindria.nodes import NodeInfo
from cylindria.store.journal import open_journal
from cylindria.upstream.peers import FORWARDED, PeerClient
from cylindria.web import render
from cylindria.web.eventhub import EventHub

import workflows
from helpers import wait_until

PENDING = "SELECT job_id FROM cancel_requests ORDER BY job_id"


async def post(cluster: Cluster, node: Node, path: str) -> tuple[int, dict]:
    async with cluster.session.post(node.url + path) as resp:
        return resp.status, await resp.json()


async def read_events(resp, until: Callable[[dict], bool], timeout: float = 10) -> list[dict]:
    """Server-sent events of `resp`, parsed, up to the first for which `until` holds."""
    events: list[dict] = []
    current: dict = {}
    async with asyncio.timeout(timeout):
        while True:
            line = (await resp.content.readline()).decode()
            assert line, f"the stream ended after {events}"
            line = line.rstrip("\n")
            if line.startswith(":"):
                continue
            if line:
                key, _, value = line.partition(": ")
                current[key] = value
                continue
            if "data" in current:
                # A passing change (progress) has no id: the last one stays.
                event = {"id": int(current["id"]) if "id" in current else None,
                         "event": current["event"], "data": json.loads(current["data"])}
                events.append(event)
                if until(event):
                    return events
            current = {}


async def streams_open(cluster: Cluster, node: Node) -> int:
    async with cluster.session.get(node.url + "/metrics") as resp:
        text = await resp.text()
    line = next(line for line in text.splitlines()
                if line.startswith("cylindria_event_streams_open "))
    return int(float(line.split()[1]))


async def retried_through(cluster: Cluster) -> None:
    """A failed job of B, retried through A: passed to B, which runs it again."""
    a, b = cluster.a, cluster.b
    await cluster.put(b, "fails-b", workflows.fails_at_runtime(), gpu=1)
    first = await cluster.until_state(b, "fails-b", "failed", timeout=5)
    status, body = await post(cluster, a, "/retryjob/fails-b/")
    assert status == 202, body
    assert (body["job_id"], body["accepted"], body["attempt"], body["gpu_id"]) == (
        "fails-b", True, 2, 1)

    async def second_attempt_ended():
        _, job = await cluster.get(b, "/jobstatus/fails-b/")
        return job if job["attempt"] == 2 and job["state"] == "failed" else None
    again = await wait_until(second_attempt_ended, 5, "the retried job to run again on B")
    assert again["prompt_id"] not in (None, first["prompt_id"])
    url = f"http://127.0.0.1:{b.sim_port + 1}/history/{again['prompt_id']}"
    async with cluster.session.get(url) as resp:
        assert again["prompt_id"] in await resp.json()  # B's GPU ran it
    assert "fails-b" not in await cluster.job_ids(a, held_by="gpu-a")
    # Unknown everywhere: 404 as on one node; a request passed on is answered locally.
    status, body = await post(cluster, a, "/retryjob/nowhere/")
    assert (status, body["error"]["code"], body["accepted"]) == (404, "job_not_found", False)
    async with cluster.session.post(a.url + "/retryjob/fails-b/",
                                    headers={FORWARDED: "gpu-b"}) as resp:
        assert (resp.status, (await resp.json())["error"]["code"]) == (404, "job_not_found")


async def events_through(cluster: Cluster) -> None:
    """B's job's events through A: B's stream passed through, with the database's ids
    (its progress without), resumed with Last-Event-ID; a client leaving A closes A's
    stream from B."""
    a, b = cluster.a, cluster.b
    await cluster.put(b, "ev-b", workflows.txt2img(steps=20), gpu=1)
    path = "/events/?job_id=ev-b"
    async with cluster.session.get(a.url + path) as resp:
        assert resp.status == 200
        assert (resp.headers["Content-Type"], resp.headers["Cache-Control"],
                resp.headers["X-Accel-Buffering"]) == ("text/event-stream", "no-cache", "no")
        seen = await read_events(resp, lambda e: e["data"]["progress"] > 0
                                 and e["data"]["state"] == "running")
    assert {e["data"]["job_id"] for e in seen} == {"ev-b"}
    # Its last lasting change so far (the progress sent has no id; the change may have
    # come before the stream began).
    last = column(a.database_url, "SELECT MAX(id) FROM job_events WHERE job_id = 'ev-b'")[0]
    assert all(e["id"] is None or e["id"] <= last for e in seen), (last, seen)
    async with cluster.session.get(a.url + path, headers={"Last-Event-ID": str(last)}) as resp:
        later = await read_events(resp, lambda e: e["data"]["state"] == "completed")
    ids = [e["id"] for e in later if e["id"] is not None]
    assert ids and all(i > last for i in ids), (last, later)
    # A stream that waits (the job is done): counted on A and on B while it is open,
    # and B's ends soon after the client leaves A.
    resp = await cluster.session.get(a.url + path, headers={"Last-Event-ID": str(ids[-1])})
    assert resp.status == 200
    assert await resp.content.readline() == b"retry: 2000\n"

    async def counted(on_a: int, on_b: int) -> bool:
        return (await streams_open(cluster, a), await streams_open(cluster, b)) == (on_a, on_b)
    # The streams before it end within a presence check of their client leaving.
    await wait_until(lambda: counted(1, 1), 5, "one stream open on A, and one on B")
    resp.close()
    left = time.monotonic()

    await wait_until(lambda: counted(0, 0), 5, "B's stream to end once the client left A")
    print(f"B's stream ended {time.monotonic() - left:.3f}s after the client left A")


async def interrupted_on_sim(cluster: Cluster, node: Node, gpu: int, prompt_id: str) -> bool:
    """Whether the simulated ComfyUI behind `node`'s GPU ended the prompt as interrupted."""
    url = f"http://127.0.0.1:{node.sim_port + gpu}/history/{prompt_id}"
    async with cluster.session.get(url) as resp:
        entry = (await resp.json()).get(prompt_id)
    return entry is not None and any(
        event == "execution_interrupted" for event, _ in entry["status"]["messages"])


async def test_a_job_is_cancelled_through_another_node(cluster):
    a, b = cluster.a, cluster.b
    await cluster.start(a)
    await cluster.start(b)

    async def b_alive():
        seen = (await cluster.nodes(a)).get("gpu-b")
        return seen is not None and seen["alive"]
    await wait_until(b_alive, 5 * HEARTBEAT + 2, "gpu-a to see gpu-b alive")

    # A running job of B, cancelled through A: passed to B, which cancels it at once
    # (woken by the notification), as its own POST /canceljob would.
    await cluster.put(b, "slow-b", workflows.txt2img(steps=SLOW_STEPS))
    running = await cluster.until_state(b, "slow-b", "running")
    asked = time.monotonic()
    status, body = await post(cluster, a, "/canceljob/slow-b/")
    assert status == 202, body
    assert (body["job_id"], body["node"], body["node_alive"]) == ("slow-b", "gpu-b", True)
    assert body["state"] in ("queued", "running")
    assert "passed to node gpu-b" in body["message"]
    assert "GET /jobstatus/slow-b/" in body["message"]
    done = await cluster.until_state(b, "slow-b", "cancelled", timeout=5)
    print(f"cancelled through the other node in {time.monotonic() - asked:.3f}s")
    assert done["progress"] < 1
    assert await wait_until(lambda: interrupted_on_sim(cluster, b, 0, running["prompt_id"]),
                            5, "the simulator to show the prompt interrupted")
    assert column(a.database_url, PENDING) == []
    seen = await cluster.until_state(a, "slow-b", "cancelled", timeout=5)
    assert seen["node"] == "gpu-b"

    # A request that no notification announced (lost): read at B's next heartbeat.
    await cluster.put(b, "slow-b2", workflows.txt2img(steps=SLOW_STEPS), gpu=1)
    await cluster.until_state(b, "slow-b2", "running")
    with psycopg.connect(a.database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO cancel_requests (node, job_id, requested_by) "
                     "VALUES ('gpu-b', 'slow-b2', 'gpu-a')")
    await cluster.until_state(b, "slow-b2", "cancelled", timeout=5)
    assert column(a.database_url, PENDING) == []

    # An id held nowhere: 404, as for /jobstatus.
    status, body = await post(cluster, a, "/canceljob/nowhere/")
    assert (status, body["error"]["code"]) == (404, "job_not_found")

    # A finished job of B: the answer B itself gives (409 job_finished with the job),
    # with the node that holds it.
    await cluster.put(b, "done-b", workflows.quick())
    await cluster.until_state(b, "done-b", "completed")
    local_status, local = await post(cluster, b, "/canceljob/done-b/")
    status, body = await post(cluster, a, "/canceljob/done-b/")
    assert (status, body["error"]["code"]) == (local_status, local["error"]["code"]) == (
        409, "job_finished")
    assert (body["job_id"], body["state"], body["node"]) == ("done-b", "completed", "gpu-b")
    assert set(local) <= set(body)
    assert column(a.database_url, PENDING) == []

    # B's job's output, through A: streamed from B, byte for byte, with its headers. A
    # request one node passed on is never passed on again.
    path = "/joboutput/done-b/0"
    async with cluster.session.get(b.url + path) as resp:
        assert resp.status == 200
        own, own_headers = await resp.read(), resp.headers
    async with cluster.session.get(a.url + path) as resp:
        assert resp.status == 200
        assert await resp.read() == own and own[:4] == b"\x89PNG"
        for name in ("Content-Type", "Content-Length", "Cache-Control"):
            assert resp.headers.get(name) == own_headers.get(name), name
    async with cluster.session.get(a.url + path,
                                   headers={"X-Cylindria-Forwarded": "gpu-b"}) as resp:
        assert (resp.status, (await resp.json())["error"]["code"]) == (404, "job_not_found")
    async with cluster.session.get(a.url + "/joboutput/done-b/7") as resp:
        assert (resp.status, (await resp.json())["error"]["code"]) == (404,
                                                                       "output_not_found")

    await retried_through(cluster)
    await events_through(cluster)

    # B dead with a job in flight: A refuses to pass a cancel to it.
    await cluster.put(b, "slow-b3", workflows.txt2img(steps=SLOW_STEPS))
    await cluster.until_state(b, "slow-b3", "running")
    # Written to the database as running before B dies (A reads it from there).
    await cluster.until_state(a, "slow-b3", "running", timeout=5)
    assert b.proc.stop(signal.SIGKILL) == -signal.SIGKILL

    async def b_gone():
        return not (await cluster.nodes(a))["gpu-b"]["alive"]
    await wait_until(b_gone, 10 * HEARTBEAT + 2, "gpu-b to be seen as gone")
    status, body = await post(cluster, a, "/canceljob/slow-b3/")
    assert (status, body["error"]["code"], body["error"]["node"]) == (
        409, "node_not_alive", "gpu-b")
    assert "not alive" in body["error"]["message"]
    assert (body["job_id"], body["state"], body["node"]) == ("slow-b3", "running", "gpu-b")
    assert column(a.database_url, PENDING) == []
    # Its outputs cannot be fetched through A either: 502, naming the node.
    async with cluster.session.get(a.url + path) as resp:
        body = await resp.json()
    assert (resp.status, body["error"]["code"], body["error"]["node"]) == (
        502, "backend_unavailable", "gpu-b")
    assert "cannot be reached" in body["error"]["message"]
    # Nor a retry passed (409, as a cancel), nor its events followed (502 at once).
    status, body = await post(cluster, a, "/retryjob/slow-b3/")
    assert (status, body["error"]["code"], body["error"]["node"], body["node"]) == (
        409, "node_not_alive", "gpu-b", "gpu-b")
    async with cluster.session.get(a.url + "/events/?job_id=slow-b3") as resp:
        body = await resp.json()
    assert (resp.status, body["error"]["code"], body["error"]["node"]) == (
        502, "backend_unavailable", "gpu-b")


async def test_a_cancel_request_wakes_the_node_it_names(database_url, tmp_path):
    """The journal's side: a request is a row for the node it names, and a notification
    that wakes that node's listener at once; without nodes there are none."""
    a, _ = await open_journal(None, 100, Registry().saved, database_url=database_url,
                              node=NodeInfo("a", "http://a.lan:8000"))
    b, _ = await open_journal(None, 100, Registry().saved, database_url=database_url,
                              node=NodeInfo("b", "http://b.lan:8000"))
    woken = asyncio.Event()
    listener = b.cancel_listener(woken.set)
    listener.start()
    try:
        # Woken once as it starts listening (requests may have come before).
        await asyncio.wait_for(woken.wait(), 5)
        woken.clear()
        await a.request_cancel("b", "job-1")
        await a.request_cancel("b", "job-1")  # asked twice: one request
        await asyncio.wait_for(woken.wait(), 5)
        assert await b.pending_cancels() == ["job-1"]
        assert await a.pending_cancels() == []
        await b.drop_cancels(["job-1"])
        assert await b.pending_cancels() == []
    finally:
        await listener.stop()
        await a.close()
        await b.close()
    journal, _ = await open_journal(tmp_path / "state.sqlite3", 100, Registry().saved)
    try:
        assert await journal.pending_cancels() == []
        assert journal.cancel_listener(woken.set) is None
    finally:
        await journal.close()


def test_a_stream_passed_through_counts_toward_this_nodes_limits():
    """A stream of another node's job holds a slot of the hub (in all and for its client
    address), is fed nothing by it, and is ended with the others at shutdown or once its
    client has gone."""
    registry = Registry()
    hub = EventHub(100, lambda job: job.job_id.encode())
    registry.subscribe(hub.publish)
    present = [True]
    relay = hub.relay(alive=lambda: present[0], address="10.0.0.9")
    own, _, _ = hub.subscribe(None, None, address="10.0.0.9")
    assert (hub.streams, hub.streams_from("10.0.0.9"), hub.streams_from("10.0.0.8")) == (
        2, 2, 0)
    registry.begin("j0", 0, "p0", "f", ["1"])
    assert relay.queue.empty() and own.queue.qsize() == 1
    present[0] = False
    assert hub.streams == 1 and relay.dropped
    again = hub.relay(address="10.0.0.9")
    hub.close()
    assert again.dropped and hub.streams == 0


async def test_a_request_passed_on_carries_what_it_came_with(aiohttp_server):
    """What one node sends another for a retry (method, query, body, key, its own name)
    and what comes back (status, JSON body, Retry-After); an answer not in JSON is 502."""
    seen = []

    async def busy(request: web.Request) -> web.Response:
        seen.append((request.method, request.rel_url.raw_path_qs, request.headers,
                     await request.read()))
        return web.json_response({"error": {"code": "queue_full"}}, status=503,
                                 headers={"Retry-After": "7"})

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html></html>", content_type="text/html")
    app = web.Application()
    app.router.add_post("/retryjob/{job_id}/", busy)
    app.router.add_get("/page", page)
    server = await aiohttp_server(app)
    base = str(server.make_url("/"))
    async with aiohttp.ClientSession() as session:
        peers = PeerClient(session, "gpu-a", "k" * 20, 5)
        answer = await peers.call("POST", "gpu-b", base, "/retryjob/j1/?GpuId=auto&wait=3",
                                  {"Content-Type": "application/json"}, b"{}", wait=3)
        with pytest.raises(BackendUnavailable) as refused:
            await peers.call("GET", "gpu-b", base, "/page", {})
    method, path, headers, body = seen[0]
    assert (method, path, body) == ("POST", "/retryjob/j1/?GpuId=auto&wait=3", b"{}")
    assert (headers["X-API-Key"], headers[FORWARDED]) == ("k" * 20, "gpu-a")
    assert (answer.status, answer.retry_after) == (503, "7")
    resp = render.passed_back(answer)
    assert (resp.status, resp.headers["Retry-After"], resp.content_type) == (
        503, "7", "application/json")
    assert json.loads(resp.body)["error"]["code"] == "queue_full"
    assert refused.value.extra["node"] == "gpu-b" and "instead of JSON" in refused.value.message
