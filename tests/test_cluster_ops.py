"""Nodes sharing one PostgreSQL database: a job held by one node cancelled through another
(passed on as a request the holding node reads at once, or at its next heartbeat), and
refused when the holding node is not alive; its outputs fetched through another node."""

from __future__ import annotations

import asyncio
import signal
import time

import psycopg
from test_cluster_nodes import HEARTBEAT, SLOW_STEPS, Cluster, Node, column
from test_cluster_nodes import cluster as cluster  # the fixture

from cylindria.core.registry import Registry
from cylindria.nodes import NodeInfo
from cylindria.store.journal import open_journal

import workflows
from helpers import wait_until

PENDING = "SELECT job_id FROM cancel_requests ORDER BY job_id"


async def post(cluster: Cluster, node: Node, path: str) -> tuple[int, dict]:
    async with cluster.session.post(node.url + path) as resp:
        return resp.status, await resp.json()


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

    # B dead with a job in flight: A refuses to pass a cancel to it.
    await cluster.put(b, "slow-b3", workflows.txt2img(steps=SLOW_STEPS))
    await cluster.until_state(b, "slow-b3", "running")
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
