"""Three nodes sharing one PostgreSQL database and one queue of `GpuId=auto` jobs: a job
held by one node runs on another node's free GPU; the line's order is the cluster's
(priority, then age); a killed node's held jobs run elsewhere and never again when it
comes back; a cancel reaches a held job wherever it waits; nothing runs twice (the
simulated GPUs' ledgers say what ran)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path

import aiohttp
import psycopg
import pytest
from test_cluster_nodes import CYLINDRIA, GPUS, HEARTBEAT, SLOW_STEPS, STEP_SECONDS, Cluster, Node

from cylindria.addresses import free_port_run
from cylindria.store.postgres import node_lock

import workflows
from helpers import Proc, clean_env, wait_until

NODES = ("gpu-a", "gpu-b", "gpu-c")


class RetryingNode(Node):
    """A node that settles dead nodes' jobs soon, and runs lost jobs once again."""

    retry_lost = "1"

    def start(self) -> None:
        self.starts += 1
        self.proc = Proc(self.args(), clean_env(
            CYLINDRIA_HEARTBEAT_INTERVAL=str(HEARTBEAT), CYLINDRIA_POLL_INTERVAL="0.2",
            CYLINDRIA_LOST_GRACE="0.5", CYLINDRIA_NODE_GRACE="1",
            CYLINDRIA_RETRY_LOST=self.retry_lost), self.tmp / f"{self.name}-{self.starts}.log")


class RescuingNode(RetryingNode):
    """A node that settles dead nodes' jobs soon, as lost."""

    retry_lost = "0"


class ThreeNodes(Cluster):
    """Nodes gpu-a, gpu-b and gpu-c, each with GPUS simulated GPUs of its own."""

    def __init__(self, tmp: Path, session: aiohttp.ClientSession, url: str,
                 kind: type[Node] = Node) -> None:
        super().__init__(tmp, session, url)
        self.sim_port = free_port_run(len(NODES) * GPUS)
        self.a, self.b, self.c = (kind(name, tmp, self.sim_port + n * GPUS, url)
                                  for n, name in enumerate(NODES))
        self.all = (self.a, self.b, self.c)

    async def start_sim(self) -> None:
        count = len(NODES) * GPUS
        self.sim = Proc([*CYLINDRIA, "simulate", "--gpus", str(count), "--base-port",
                         str(self.sim_port), "--step-seconds", STEP_SECONDS, "--output-dir",
                         str(self.tmp / "out")], clean_env(), self.tmp / "sim.log")
        for gpu in range(count):
            await self.sim.until_up(self.session,
                                    f"http://127.0.0.1:{self.sim_port + gpu}/system_stats")

    def stop_all(self) -> None:
        for proc in (*(node.proc for node in self.all), self.sim):
            if proc is not None:
                proc.stop()

    async def post(self, node: Node, path: str) -> tuple[int, dict]:
        async with self.session.post(node.url + path) as resp:
            return resp.status, await resp.json()

    async def drain(self, node: Node, drained: bool = True) -> None:
        for gpu in range(GPUS):
            status, body = await self.post(
                node, f"/gpus/{gpu}/{'drain' if drained else 'undrain'}")
            assert status == 200, body

    async def put_auto(self, node: Node, job_id: str, workflow: dict,
                       priority: int = 0) -> dict:
        async with self.session.put(f"{node.url}/startjob/{job_id}/", json=workflow,
                                    params={"GpuId": "auto",
                                            "priority": str(priority)}) as resp:
            body = await resp.json()
            assert resp.status == 202, body
            return body

    async def ledger(self) -> Counter[str]:
        """How many times each prompt id ran, over every simulated GPU."""
        runs: Counter[str] = Counter()
        for gpu in range(len(NODES) * GPUS):
            async with self.session.get(
                    f"http://127.0.0.1:{self.sim_port + gpu}/_sim/ledger") as resp:
                for prompt_id, entry in (await resp.json()).items():
                    runs[prompt_id] += entry["runs"]
        return runs

    async def ran_on(self) -> dict[str, str]:
        """Each prompt id the simulated GPUs ran, by the node whose GPU ran it."""
        found: dict[str, str] = {}
        for gpu in range(len(NODES) * GPUS):
            async with self.session.get(
                    f"http://127.0.0.1:{self.sim_port + gpu}/_sim/ledger") as resp:
                for prompt_id in await resp.json():
                    found[prompt_id] = NODES[gpu // GPUS]
        return found


@pytest.fixture(params=[Node])
async def three(request, tmp_path, database_url):
    async with aiohttp.ClientSession() as session:
        cluster = ThreeNodes(tmp_path, session, database_url, request.param)
        try:
            await cluster.start_sim()
            await asyncio.gather(*(cluster.start(node) for node in cluster.all))
            # Each node has read the others' heartbeats: it knows their GPUs.
            for node in cluster.all:
                async def all_seen(node: Node = node) -> bool:
                    seen = await cluster.nodes(node)
                    return set(seen) == set(NODES) and all(n["alive"] for n in seen.values())
                await wait_until(all_seen, 10, f"{node.name} to see every node")
            yield cluster
        finally:
            cluster.stop_all()


async def finished(cluster: ThreeNodes, node: Node, job_ids: list[str],
                   timeout: float = 20) -> dict[str, dict]:
    """Every job completed, as `node` answers for it (whichever node holds it)."""
    return {job_id: await cluster.until_state(node, job_id, "completed", timeout=timeout)
            for job_id in job_ids}


@pytest.mark.slow
async def test_held_jobs_run_on_any_nodes_free_gpu_in_the_clusters_order(three):
    a, b, c = three.a, three.b, three.c
    # Only C's GPUs take jobs: A's and B's are drained.
    await three.drain(a)
    await three.drain(b)
    # A's own GPUs take nothing, but the line takes its auto jobs to C's: ready (once
    # a heartbeat of B shows its GPUs drained too).
    async def only_c() -> dict | None:
        status, body = await three.get(a, "/readyz")
        return body if status == 200 and body["usable_elsewhere"] == GPUS else None
    body = await wait_until(only_c, 5, "A to count C's GPUs only")
    assert body["usable_gpus"] == [], body
    ids = [f"any-{n}" for n in range(6)]
    for n, job_id in enumerate(ids):
        await three.put_auto(a if n % 2 else b, job_id, workflows.quick())
    done = await finished(three, a, ids)
    for job_id, body in done.items():
        assert body["node"] == "gpu-c", body
        # The same answer through the node that took it, and through C itself.
        for node in (b, c):
            status, seen = await three.get(node, f"/jobstatus/{job_id}/")
            assert (status, seen["state"], seen["prompt_id"]) == (
                200, "completed", body["prompt_id"])
    ran = await three.ledger()
    assert sorted(ran[body["prompt_id"]] for body in done.values()) == [1] * len(ids)
    where = await three.ran_on()
    assert {where[body["prompt_id"]] for body in done.values()} == {"gpu-c"}
    # Claimed by C, each keeps its place in the nodes' one listing: newest first.
    status, body = await three.get(b, "/jobs/?limit=100")
    assert status == 200, body
    assert [job["job_id"] for job in body["jobs"] if job["job_id"] in done] == ids[::-1]

    # Every GPU drained: jobs wait in the one line, whoever took them. A higher
    # priority taken later by B goes before an older one A took; the oldest of equal
    # priority first. One GPU of C opens: it takes them in that order.
    await three.drain(c)

    async def not_ready() -> bool:  # once a heartbeat of C shows its GPUs drained
        return (await three.get(a, "/readyz"))[0] == 503
    await wait_until(not_ready, 5, "A to be not ready with every GPU drained")
    await three.put_auto(a, "low-a", workflows.quick(), priority=0)
    await three.put_auto(a, "low-a2", workflows.quick(), priority=0)
    await three.put_auto(b, "high-b", workflows.quick(), priority=5)
    for job_id in ("low-a", "low-a2", "high-b"):
        status, body = await three.get(c, f"/jobstatus/{job_id}/")
        assert (status, body["state"], body["gpu_id"]) == (200, "queued", None), body
    # A stream of low-a on A, and a wait for it there: once C takes it, A ends the
    # stream (a client that reconnects is passed C's) and answers the wait with the
    # job as C has it.
    stream = await three.session.get(f"{a.url}/events/", params={"job_id": "low-a"})
    assert stream.status == 200
    waited = asyncio.create_task(three.get(a, "/jobstatus/low-a/?wait=20"))
    status, body = await three.post(c, "/gpus/0/undrain")
    assert status == 200, body
    async with asyncio.timeout(10):
        while await stream.content.readline():
            pass
    stream.release()
    status, body = await waited
    assert (status, body["node"]) == (200, "gpu-c"), body
    done = await finished(three, a, ["low-a", "low-a2", "high-b"])
    order = sorted(done, key=lambda job_id: done[job_id]["started_at"])
    assert order == ["high-b", "low-a", "low-a2"]
    assert {body["node"] for body in done.values()} == {"gpu-c"}
    ran = await three.ledger()
    assert all(ran[body["prompt_id"]] == 1 for body in done.values())


@pytest.mark.slow
async def test_a_killed_nodes_held_jobs_run_elsewhere_and_never_twice(three):
    a, b, c = three.a, three.b, three.c
    for node in three.all:
        await three.drain(node)
    ids = [f"orphan-{n}" for n in range(4)]
    for job_id in ids:
        await three.put_auto(a, job_id, workflows.quick())
    # A cancel through another node reaches a held job where it waits.
    await three.put_auto(a, "unwanted", workflows.quick())
    status, body = await three.post(b, "/canceljob/unwanted/")
    assert status in (200, 202), body
    await three.until_state(a, "unwanted", "cancelled", timeout=5)

    # A dies with its jobs held: they never depended on it, and B's GPUs take them.
    assert a.proc.stop(signal.SIGKILL) == -signal.SIGKILL
    await three.drain(b, drained=False)
    done = await finished(three, c, ids)
    assert {body["node"] for body in done.values()} == {"gpu-b"}

    # A comes back: it holds none of them any more, runs none again, and answers
    # for them as B wrote them.
    await three.start(a)
    await three.drain(a, drained=False)
    for job_id, body in done.items():
        status, seen = await three.get(a, f"/jobstatus/{job_id}/")
        assert (status, seen["node"], seen["state"], seen["prompt_id"]) == (
            200, "gpu-b", "completed", body["prompt_id"])
    status, body = await three.get(a, "/jobstatus/unwanted/")
    assert (status, body["state"]) == (200, "cancelled")
    # A new job through the restarted A runs once, wherever a GPU has room.
    await three.put_auto(a, "after", workflows.quick())
    (after,) = (await finished(three, b, ["after"])).values()
    ran = await three.ledger()
    prompts = [body["prompt_id"] for body in (*done.values(), after)]
    assert [ran[p] for p in prompts] == [1] * len(prompts)
    assert sum(ran.values()) == len(prompts)  # the cancelled job never ran


@pytest.mark.slow
async def test_the_same_id_through_two_nodes_at_once_runs_once(three):
    """Ids are unique across nodes: the same PUT sent to every node at the same moment
    is one job (the others answer as repeats of it, or 409 when they lost the race)."""
    a, b, c = three.a, three.b, three.c
    workflow = workflows.quick()

    async def put(node: Node) -> tuple[int, dict]:
        async with three.session.put(f"{node.url}/startjob/once/", json=workflow,
                                     params={"GpuId": "0"}) as resp:
            return resp.status, await resp.json()

    answers = await asyncio.gather(*(put(node) for node in (a, b, c)))
    assert sum(status == 202 for status, _ in answers) == 1, answers
    assert all(status in (200, 202, 409) for status, _ in answers), answers
    body = await three.until_state(a, "once", "completed")
    ran = await three.ledger()
    assert ran[body["prompt_id"]] == 1 and sum(ran.values()) == 1
    await wait_until(lambda: _all_answer(three, body["prompt_id"]), 5,
                     "every node to answer for the one job")


async def _all_answer(three: ThreeNodes, prompt_id: str) -> bool:
    for node in three.all:
        status, body = await three.get(node, "/jobstatus/once/")
        if status != 200 or body["prompt_id"] != prompt_id:
            return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("three", [RetryingNode], indirect=True)
async def test_a_killed_nodes_running_job_runs_again_elsewhere(three):
    """With CYLINDRIA_RETRY_LOST, a job running on a node that died goes back in the
    shared line as its next attempt, and another node's GPU runs it."""
    a, b, c = three.a, three.b, three.c
    await three.drain(b)
    await three.drain(c)
    await three.put_auto(a, "survivor", workflows.txt2img(steps=SLOW_STEPS))
    first = await three.until_state(a, "survivor", "running")
    assert a.proc.stop(signal.SIGKILL) == -signal.SIGKILL
    await three.drain(c, drained=False)
    done = await three.until_state(b, "survivor", "completed", timeout=30)
    assert (done["node"], done["attempt"]) == ("gpu-c", 2), done
    assert done["prompt_id"] != first["prompt_id"]
    lost = done["attempts"][0]
    assert (lost["prompt_id"], lost["state"], lost["error"]["type"]) == (
        first["prompt_id"], "failed", "lost")
    assert "Node gpu-a stopped answering" in lost["error"]["message"]
    ran = await three.ledger()
    assert ran[done["prompt_id"]] == 1
    assert "put back in the shared line to run again" in (b.proc.output()
                                                          + c.proc.output())


@pytest.mark.slow
@pytest.mark.parametrize("three", [RescuingNode], indirect=True)
async def test_a_node_back_late_cannot_write_over_what_was_settled(three, database_url):
    """A node frozen (SIGSTOP) with its database session gone looks dead: its running
    job is settled as lost. When it wakes, its job runs to its end on its ComfyUI, and
    its writes of it change nothing: the node lets the job go and answers it as
    settled."""
    a = three.a
    await three.put(a, "late", workflows.txt2img(steps=SLOW_STEPS), gpu=0)
    running = await three.until_state(a, "late", "running")
    assert running.get("node") is None  # A's own
    os.kill(a.proc.popen.pid, signal.SIGSTOP)
    try:
        # Its session holding its lock ends, as when the server gives up on a host.
        class_id, object_id = node_lock("gpu-a")
        with psycopg.connect(database_url, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND classid = %s AND objid = %s", (class_id, object_id & 0xFFFFFFFF)
            ).fetchall()
        assert ended == [(True,)]
        lost = await three.until_state(three.b, "late", "failed", timeout=15)
        assert (lost["node"], lost["error"]["type"]) == ("gpu-a", "lost")
    finally:
        os.kill(a.proc.popen.pid, signal.SIGCONT)
    # A wakes, hears its job finish on its ComfyUI, and writes it: fenced, let go.
    seen = await three.until_state(a, "late", "failed", timeout=20)
    assert seen["error"]["type"] == "lost"
    ran = await three.ledger()
    assert ran[running["prompt_id"]] == 1
    with psycopg.connect(database_url) as conn:
        (state,) = conn.execute("SELECT state FROM jobs WHERE job_id = 'late'").fetchone()
    assert state == "failed"
    assert "so this node lets it go" in a.proc.output()


@pytest.mark.slow
async def test_a_gpu_of_another_node_by_its_name(three):
    """GpuId=NODE:N pins a job to that node's GPU N whichever node takes the PUT (it is
    passed on); this node's own name is its own GPU; a node no heartbeat names is a 409,
    and a name that is no GPU's a 400."""
    a, c = three.a, three.c
    for job_id, gpu in (("far", "gpu-c:1"), ("near", "gpu-a:0")):
        async with three.session.put(f"{a.url}/startjob/{job_id}/", json=workflows.quick(),
                                     params={"GpuId": gpu}) as resp:
            body = await resp.json()
            assert (resp.status, body["gpu_id"]) == (202, int(gpu[-1])), body
    far = await three.until_state(a, "far", "completed")
    assert (far["node"], far["gpu_id"]) == ("gpu-c", 1)
    assert "node" not in await three.until_state(c, "far", "completed")
    near = await three.until_state(a, "near", "completed")
    assert (near.get("node"), near["gpu_id"]) == (None, 0)
    where = await three.ran_on()
    assert (where[far["prompt_id"]], where[near["prompt_id"]]) == ("gpu-c", "gpu-a")
    for gpu, status, code in (("gpu-z:0", 409, "node_not_alive"),
                              ("gpu-b:x", 400, "unknown_gpu"), ("gpu-a:7", 400, "unknown_gpu")):
        async with three.session.put(f"{a.url}/startjob/nowhere/", json=workflows.quick(),
                                     params={"GpuId": gpu}) as resp:
            body = await resp.json()
            assert (resp.status, body["error"]["code"]) == (status, code), body
    status, body = await three.get(a, "/jobstatus/nowhere/")
    assert status == 404, body
    # Any node's GPU by its name: as its node's last heartbeat showed it.
    status, body = await three.get(a, "/serverstatus?GpuId=gpu-c:1")
    assert (status, body["node"], body["gpu_id"], body["reachable"], body["node_alive"]) == (
        200, "gpu-c", 1, True, True), body
    status, body = await three.get(a, "/serverstatus?GpuId=gpu-a:1")
    assert (status, body["gpu_id"], body.get("node")) == (200, 1, None), body
    for gpu in ("gpu-z:0", "gpu-c:7"):
        status, body = await three.get(a, f"/serverstatus?GpuId={gpu}")
        assert (status, body["error"]["code"]) == (400, "unknown_gpu"), body
