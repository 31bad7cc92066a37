"""Nodes: a node that dies. Another node settles its jobs in flight as lost once its
heartbeat is past the grace period and its session is gone; a node merely slow (its
lock held) or stopped cleanly is left alone; two rescuers settle each job once; the dead
node, back, keeps its lost jobs lost."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import psycopg
import pytest
import ujson
from test_cluster_nodes import GPUS, HEARTBEAT, SLOW_STEPS, Cluster, Node

from cylindria.core.registry import Registry
from cylindria.nodes import NodeInfo
from cylindria.store import rescue
from cylindria.store.journal import open_journal

import workflows
from helpers import Proc, clean_env, wait_until

GRACE = 0.5
AGED = "UPDATE nodes SET heartbeat_at = now() - interval '1 hour' WHERE name = %s"


def rows(url: str, node: str) -> dict[str, tuple[str, dict]]:
    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT job_id, state, record FROM jobs WHERE node = %s",
                             (node,)).fetchall()
    return {job_id: (state, ujson.loads(record)) for job_id, state, record in found}


async def open_node(url: str, name: str):
    registry = Registry()
    journal, loaded = await open_journal(None, 100, registry.saved, database_url=url,
                                         node=NodeInfo(name, f"http://{name}.lan:8000"))
    registry.subscribe(journal.note)
    return journal, registry, loaded


async def test_only_dead_nodes_are_rescued_and_each_job_once(database_url):
    b, b_jobs, _ = await open_node(database_url, "b")
    d, d_jobs, _ = await open_node(database_url, "d")
    a, _, _ = await open_node(database_url, "a")
    c, _, _ = await open_node(database_url, "c")
    try:
        queued = b_jobs.begin("queued", 0, "p-q", "f", ["1"])
        b_jobs.confirm(queued)
        running = b_jobs.begin("running", 1, "p-r", "f", ["1"])
        b_jobs.confirm(running)
        b_jobs.on_start("p-r")
        held = b_jobs.begin("held", None, "", "f", ["1"], auto=True)
        done = b_jobs.begin("done", 0, "p-d", "f", ["1"])
        b_jobs.confirm(done)
        b_jobs.on_success("p-d")
        for job in (queued, running, held, done):
            await b.durable(job)
        await d.durable(d_jobs.begin("d-job", 0, "p-x", "f", ["1"]))
        before = rows(database_url, "b")
        assert {k: v[0] for k, v in before.items()} == {
            "queued": "queued", "running": "running", "held": "queued", "done": "completed"}

        # Silent for an hour, but its session holds its lock: slow, never rescued. A
        # node stopped cleanly keeps its jobs for when it starts again.
        await d.leave()
        await d.close()
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(AGED, ("b",))
            admin.execute(AGED, ("d",))
        assert await a.rescue(GRACE) == []
        assert rows(database_url, "b") == before
        assert rows(database_url, "d")["d-job"][0] == "queued"

        # Its session gone (it died): two rescuers at once settle each job once.
        await b.close()
        with psycopg.connect(database_url, autocommit=True) as admin:
            (since,) = admin.execute(
                "UPDATE nodes SET heartbeat_at = now() - interval '1 hour' "
                "WHERE name = 'b' RETURNING heartbeat_at").fetchone()
        first, second = await asyncio.gather(a.rescue(GRACE), c.rescue(GRACE))
        rescued = [*first, *second]
        assert [(r.node, r.jobs, r.silent_since) for r in rescued] == [("b", 2, since)]
        after = rows(database_url, "b")
        # Its held job never depended on it: it stays in the nodes' one line.
        assert after["done"] == before["done"] and after["held"] == before["held"]
        stamp = since.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        for job_id in ("queued", "running"):
            state, record = after[job_id]
            assert (state, record["error"]["type"]) == ("failed", "lost")
            assert record["detail"] == record["error"]["message"]
            assert record["detail"].startswith(f"Node b stopped answering at {stamp}")
            assert f"POST /retryjob/{job_id}/ on node b" in record["detail"]
            assert record["finished_at"] >= since.timestamp()
        assert "while this job was running there: its outcome is unknown" in (
            after["running"][1]["detail"])
        # Nothing left to settle: the next round does nothing.
        assert await a.rescue(GRACE) == [] and rows(database_url, "b") == after
    finally:
        for journal in (a, c):
            await journal.close()

    # B back under its name: its lost jobs are finished jobs, none in flight.
    b, _, loaded = await open_node(database_url, "b")
    await b.close()
    assert {j.job_id: (j.state.value, j.error and j.error["type"]) for j in loaded.jobs} == {
        "queued": ("failed", "lost"), "running": ("failed", "lost"),
        "held": ("queued", None), "done": ("completed", None)}


async def test_a_row_changed_since_it_was_read_is_not_rewritten(database_url, monkeypatch):
    b, b_jobs, _ = await open_node(database_url, "b")
    a, _, _ = await open_node(database_url, "a")
    try:
        for job_id in ("one", "two"):
            await b.durable(b_jobs.begin(job_id, 0, f"p-{job_id}", "f", ["1"]))
        await b.close()
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(AGED, ("b",))
        lose = rescue.lose_on_dead_node

        def written_meanwhile(job, *args):
            # The row changes between the rescuer's read and its write.
            if job.job_id == "one":
                with psycopg.connect(database_url, autocommit=True) as other:
                    other.execute("UPDATE jobs SET record = record || ' ' "
                                  "WHERE node = 'b' AND job_id = 'one'")
            return lose(job, *args)
        monkeypatch.setattr(rescue, "lose_on_dead_node", written_meanwhile)
        (rescued,) = await a.rescue(GRACE)
        assert (rescued.node, rescued.jobs) == ("b", 1)
        assert {k: v[0] for k, v in rows(database_url, "b").items()} == {
            "one": "queued", "two": "failed"}
    finally:
        await a.close()


class RescuingNode(Node):
    def start(self) -> None:
        self.starts += 1
        self.proc = Proc(self.args(), clean_env(
            CYLINDRIA_HEARTBEAT_INTERVAL=str(HEARTBEAT), CYLINDRIA_POLL_INTERVAL="0.2",
            CYLINDRIA_LOST_GRACE="0.5", CYLINDRIA_NODE_GRACE=str(GRACE)),
            self.tmp / f"{self.name}-{self.starts}.log")


@pytest.fixture
async def cluster(tmp_path, database_url):
    async with aiohttp.ClientSession() as session:
        cluster = Cluster(tmp_path, session, database_url)
        cluster.a = RescuingNode("gpu-a", tmp_path, cluster.sim_port, database_url)
        cluster.b = RescuingNode("gpu-b", tmp_path, cluster.sim_port + GPUS, database_url)
        try:
            await cluster.start_sim()
            yield cluster
        finally:
            cluster.stop_all()


async def test_a_dead_nodes_job_is_lost_on_every_node_and_stays_lost(cluster):
    a, b = cluster.a, cluster.b
    await asyncio.gather(cluster.start(a), cluster.start(b))
    await cluster.put(b, "slow-b", workflows.txt2img(steps=SLOW_STEPS))
    running = await cluster.until_state(b, "slow-b", "running")
    assert b.proc.stop(signal.SIGKILL) == -signal.SIGKILL

    # A settles it within the grace period and a few heartbeats; any node answers it.
    lost = await cluster.until_state(a, "slow-b", "failed", timeout=10)
    assert (lost["node"], lost["error"]["type"]) == ("gpu-b", "lost")
    assert lost["detail"].startswith("Node gpu-b stopped answering at ")
    assert "its outcome is unknown" in lost["detail"]
    assert "node gpu-b stopped answering at" in a.proc.output()
    assert "1 job(s) it held in flight settled as lost" in a.proc.output()

    # ComfyUI finishes the prompt meanwhile; B, back, keeps the job lost (a finished
    # job never moves again), and its other work goes on.
    history = (f"http://127.0.0.1:{cluster.sim_port + GPUS}/history/"
               f"{running['prompt_id']}")

    async def finished_in_comfyui():
        async with cluster.session.get(history) as resp:
            return bool(await resp.json())
    await wait_until(finished_in_comfyui, 10, "ComfyUI to finish the prompt")
    await cluster.start(b)
    await cluster.put(b, "probe", workflows.quick())
    await cluster.until_state(b, "probe", "completed")
    status, body = await cluster.get(b, "/jobstatus/slow-b/")
    assert (status, body["state"], body["detail"]) == (200, "failed", lost["detail"])
    assert body["error"] == lost["error"] and "node" not in body
    assert rows(b.database_url, "gpu-b")["slow-b"][0] == "failed"
