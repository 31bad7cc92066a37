"""Nodes: two `cylindria serve` processes, each with simulated GPUs of its own, sharing one
PostgreSQL database. Each sees the other's GPUs by its heartbeats, keeps its own jobs
(across a restart too), and a second process under a node's name is refused."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import psycopg
import pytest
import ujson
from jsonschema import Draft202012Validator

from cylindria.addresses import free_port_run
from cylindria.config import Settings, load_settings
from cylindria.core.records import to_record
from cylindria.core.registry import Registry
from cylindria.errors import ConfigError, JobTakenElsewhere, StateFileError, StateUnavailable
from cylindria.nodes import NodeInfo, advertised_url, default_node_name
from cylindria.store.journal import open_journal
from cylindria.store.postgres import MIGRATIONS, SINGLE_NODE_LOCK
from cylindria.web.openapi import document

import workflows
from helpers import Proc, clean_env, wait_until, with_timing

CYLINDRIA = [sys.executable, "-m", "cylindria"]
GPUS = 2  # per node
HEARTBEAT = 0.2
# Node B's slow job: long enough to be in flight across node A's restart.
SLOW_STEPS = 80
STEP_SECONDS = "0.05"

CONTRACT = Draft202012Validator({"$ref": "#/components/schemas/GpuList",
                                  "components": document(Settings())["components"]})
JOB_CONTRACT = Draft202012Validator({"$ref": "#/components/schemas/JobStatus",
                                      "components": document(Settings())["components"]})


class Node:
    def __init__(self, name: str, tmp: Path, sim_port: int, url: str) -> None:
        self.name = name
        self.tmp = tmp
        self.sim_port = sim_port
        self.database_url = url
        self.port = free_port_run(1)
        self.proc: Proc | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def args(self, name: str | None = None, port: int | None = None) -> list[str]:
        return [*CYLINDRIA, "serve", "--port", str(port or self.port), "--numberOfGpus",
                str(GPUS), "--comfy-url", f"http://127.0.0.1:{self.sim_port}",
                "--state-file", str(self.tmp / f"{self.name}.sqlite3"),
                "--database-url", self.database_url, "--node-name", name or self.name]

    def start(self) -> None:
        self.starts += 1
        self.proc = Proc(self.args(), clean_env(
            CYLINDRIA_HEARTBEAT_INTERVAL=str(HEARTBEAT), CYLINDRIA_POLL_INTERVAL="0.2",
            CYLINDRIA_LOST_GRACE="0.5"), self.tmp / f"{self.name}-{self.starts}.log")


class Cluster:
    def __init__(self, tmp: Path, session: aiohttp.ClientSession, url: str) -> None:
        self.tmp = tmp
        self.session = session
        self.sim_port = free_port_run(2 * GPUS)
        self.sim: Proc | None = None
        self.a = Node("gpu-a", tmp, self.sim_port, url)
        self.b = Node("gpu-b", tmp, self.sim_port + GPUS, url)

    async def start_sim(self) -> None:
        self.sim = Proc([*CYLINDRIA, "simulate", "--gpus", str(2 * GPUS), "--base-port",
                         str(self.sim_port), "--step-seconds", STEP_SECONDS, "--output-dir",
                         str(self.tmp / "out")], clean_env(), self.tmp / "sim.log")
        for gpu in range(2 * GPUS):
            await self.sim.until_up(self.session,
                                    f"http://127.0.0.1:{self.sim_port + gpu}/system_stats")

    async def start(self, node: Node) -> None:
        node.start()
        await node.proc.until_up(self.session, f"{node.url}/healthz")

        async def connected():
            return (await self.get(node, "/healthz"))[1]["listeners_connected"] == GPUS
        await wait_until(connected, 10, f"{node.name}'s listeners to connect")


    async def get(self, node: Node, path: str) -> tuple[int, dict]:
        async with self.session.get(node.url + path) as resp:
            return resp.status, await resp.json()

    async def put(self, node: Node, job_id: str, workflow: dict, gpu: int = 0) -> None:
        async with self.session.put(f"{node.url}/startjob/{job_id}/", json=workflow,
                                    params={"GpuId": str(gpu)}) as resp:
            assert resp.status == 202, await resp.text()

    async def until_state(self, node: Node, job_id: str, *states: str,
                          timeout: float = 15) -> dict:
        async def reached():
            status, body = await self.get(node, f"/jobstatus/{job_id}/")
            return body if status == 200 and body["state"] in states else None
        return await wait_until(reached, timeout, f"{job_id} on {node.name} to be {states}")

    async def nodes(self, node: Node) -> dict[str, dict]:
        return {n["name"]: n for n in (await self.get(node, "/gpus/"))[1]["nodes"]}

    async def job_ids(self, node: Node, held_by: str | None = None) -> set[str]:
        """The ids `GET /jobs/` lists through `node` (every node's), or those of one."""
        return {job["job_id"] for job in (await self.get(node, "/jobs/"))[1]["jobs"]
                if held_by in (None, job["node"])}

    def stop_all(self) -> None:
        for proc in (self.a.proc, self.b.proc, self.sim):
            if proc is not None:
                proc.stop()


@pytest.fixture
async def cluster(tmp_path, database_url):
    async with aiohttp.ClientSession() as session:
        cluster = Cluster(tmp_path, session, database_url)
        try:
            await cluster.start_sim()
            yield cluster
        finally:
            cluster.stop_all()


def column(url: str, statement: str, *args: object) -> list:
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute(statement, args)]


@pytest.mark.slow
async def test_two_nodes_share_a_database_and_keep_their_own_jobs(cluster):
    a, b = cluster.a, cluster.b
    await cluster.start(a)
    await cluster.start(b)

    # Each node lists every node's GPUs within a couple of heartbeats.
    async def both_seen(node):
        nodes = await cluster.nodes(node)
        if set(nodes) != {"gpu-a", "gpu-b"} or not all(n["alive"] for n in nodes.values()):
            return None
        return nodes if all(len(n["gpus"]) == GPUS for n in nodes.values()) else None
    for node in (a, b):
        nodes = await wait_until(lambda node=node: both_seen(node), 5 * HEARTBEAT + 2,
                                 f"{node.name} to see both nodes")
        assert [n["name"] for n in nodes.values() if n["self"]] == [node.name]
        assert [g["name"] for g in nodes["gpu-b"]["gpus"]] == ["gpu-b:0", "gpu-b:1"]
        assert {g["node"] for g in nodes["gpu-a"]["gpus"]} == {"gpu-a"}
        first = nodes["gpu-a"]["gpus"][0]
        assert first["reachable"] is True and first["drained"] is False
        assert first["devices"][0]["vram_total"] > 0
        body = (await cluster.get(node, "/gpus/"))[1]
        assert [(g["gpu_id"], g["name"]) for g in body["gpus"]] == [
            (n, f"{node.name}:{n}") for n in range(GPUS)]
        # As the contract says (a server's own GPUs, then every node's).
        CONTRACT.validate(body)

    # Jobs submitted to each run there, and every node lists both, each with its node.
    await cluster.put(a, "on-a", workflows.quick())
    await cluster.put(b, "on-b", workflows.quick(color=7), gpu=1)
    status, seen = await cluster.get(a, "/jobstatus/on-b/")
    assert status == 200 and seen["node"] == "gpu-b" and seen["gpu_id"] == 1
    await cluster.until_state(a, "on-a", "completed")
    own = await cluster.until_state(b, "on-b", "completed")
    assert await cluster.job_ids(a) == await cluster.job_ids(b) == {"on-a", "on-b"}
    assert await cluster.job_ids(a, held_by="gpu-b") == {"on-b"}

    # Any node answers the status of another node's job, as that node last wrote it;
    # its outputs on the node that holds them. A node's own jobs answer as before.
    assert "node" not in own and "as_of" not in own
    seen = await cluster.until_state(a, "on-b", "completed", timeout=5)
    JOB_CONTRACT.validate(seen)
    assert (seen["node"], seen["node_alive"], seen["as_of"]) == ("gpu-b", True,
                                                                 own["updated_at"])
    assert {k: v for k, v in seen.items() if k not in ("node", "node_alive", "as_of",
                                                      "outputs")} == {
        k: v for k, v in own.items() if k != "outputs"}
    url = seen["outputs"][0]["url"]
    assert url == b.url + own["outputs"][0]["url"]
    async with cluster.session.get(url) as resp:
        assert resp.status == 200 and (await resp.read())[:4] == b"\x89PNG"
    for node in (a, b):
        status, body = await cluster.get(node, "/jobstatus/nowhere/")
        assert (status, body["error"]["code"]) == (404, "job_not_found")

    # Ids are unique across nodes: the same PUT through A is answered from B's job (a
    # repeat, never run again), another workflow under that id is a 409; the database
    # itself refuses a second row of one id. A node with no row in `nodes` gets no
    # output URLs.
    async with cluster.session.put(f"{a.url}/startjob/on-b/", json=workflows.quick(color=7),
                                   params={"GpuId": "0"}) as resp:
        body = await resp.json()
        assert (resp.status, body["job_id"], body["state"]) == (200, "on-b", "completed")
    async with cluster.session.put(f"{a.url}/startjob/on-b/", json=workflows.quick(color=8),
                                   params={"GpuId": "0"}) as resp:
        assert resp.status == 409, await resp.text()
    assert (await cluster.get(b, "/jobstatus/on-b/"))[1] == own
    copy = ("INSERT INTO jobs (node, seq, job_id, state, gpu_id, finished_at, record) "
            "SELECT 'gpu-c', %s, %s, state, gpu_id, finished_at, "
            "replace(record, '\"on-b\"', %s) FROM jobs "
            "WHERE node = 'gpu-b' AND job_id = 'on-b'")
    with psycopg.connect(a.database_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(copy, (1, "on-b", '"on-b"'))
        conn.execute(copy, (2, "on-c", '"on-c"'))
    status, body = await cluster.get(a, "/jobstatus/on-c/")
    assert (status, body["job_id"], body["node"], body["node_alive"]) == (
        200, "on-c", "gpu-c", False)
    assert "url" not in body["outputs"][0]

    # A restart of A takes back A's jobs (one in flight) and never B's in flight.
    await cluster.put(a, "slow-a", workflows.txt2img(steps=SLOW_STEPS))
    await cluster.put(b, "slow-b", workflows.txt2img(steps=SLOW_STEPS))
    await cluster.until_state(a, "slow-a", "running")
    await cluster.until_state(b, "slow-b", "running")
    assert a.proc.stop(signal.SIGKILL) == -signal.SIGKILL
    await cluster.start(a)
    status, body = await cluster.get(a, "/jobstatus/slow-b/")
    assert (status, body["node"], body["state"]) == (200, "gpu-b", "running")
    assert await cluster.job_ids(a, held_by="gpu-a") == {"on-a", "slow-a"}
    await cluster.until_state(a, "slow-a", "completed")
    done = await cluster.until_state(b, "slow-b", "completed")
    assert done["gpu_id"] == 0 and done.get("error") is None
    assert column(a.database_url, "SELECT node FROM jobs WHERE node <> 'gpu-c' "
                  "ORDER BY job_id") == ["gpu-a", "gpu-b", "gpu-a", "gpu-b"]

    # A second process under A's name is refused, with one line.
    result = await asyncio.to_thread(subprocess.run, a.args(port=free_port_run(1)),
                                     env=clean_env(), capture_output=True, text=True,
                                     timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"cylindria: error: node gpu-a is running on database {a.database_url} already; "
        "stop that Cylindria first, or give this one another --node-name / "
        "CYLINDRIA_NODE_NAME")

    # B killed: A shows it not alive once its heartbeats are past the grace period.
    assert b.proc.stop(signal.SIGKILL) == -signal.SIGKILL

    async def b_gone():
        seen = (await cluster.nodes(a))["gpu-b"]
        return seen if not seen["alive"] else None
    gone = await wait_until(b_gone, 10 * HEARTBEAT + 2, "gpu-b to be seen as gone")
    # The age is given to the millisecond: allow for its rounding (0.6 against 3 x 0.2).
    assert gone["stopped"] is False and gone["last_seen_seconds"] >= 3 * HEARTBEAT - 0.001

    # A stopped cleanly says so in its row.
    assert a.proc.stop() == 0
    assert column(a.database_url, "SELECT stopped_at IS NOT NULL FROM nodes "
                  "ORDER BY name") == [True, False]


async def test_jobs_of_before_nodes_are_adopted_by_the_node_that_migrates(database_url):
    """A database of schema 1 (one Cylindria per database) with a job in flight: the
    first node to start takes it; a schema-1 Cylindria still running stops the
    migration."""
    job = Registry().begin("old", 0, "p1", "f", ["1"])
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        for statement in MIGRATIONS[0][1]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations (version) VALUES (1)")
        conn.execute("INSERT INTO meta VALUES ('install_id', 'abcd1234')")
        conn.execute("INSERT INTO jobs VALUES (%s, %s, %s, %s, NULL, %s)",
                     (job.seq, job.job_id, job.state.value, job.gpu_id,
                      ujson.dumps(to_record(job))))

    # A schema-1 Cylindria holds its lock: the migration waits for it to stop.
    with psycopg.connect(database_url, autocommit=True) as old:
        old.execute("SELECT pg_advisory_lock(%s, %s)", SINGLE_NODE_LOCK)
        with pytest.raises(StateFileError, match="in use by a Cylindria of an earlier "
                                                 "version; stop it first"):
            await open_journal(None, 100, Registry().saved, database_url=database_url)
    assert column(database_url, "SELECT MAX(version) FROM schema_migrations") == [1]

    journal, loaded = await open_journal(None, 100, Registry().saved,
                                         database_url=database_url,
                                         node=NodeInfo("first", "http://first:8000"))
    await journal.close()
    assert [(j.job_id, j.state.value) for j in loaded.jobs] == [("old", "queued")]
    assert column(database_url, "SELECT node FROM jobs") == ["first"]
    journal, loaded = await open_journal(None, 100, Registry().saved,
                                         database_url=database_url,
                                         node=NodeInfo("second", "http://second:8000"))
    await journal.close()
    assert loaded.jobs == [] and loaded.last_seq == 0 and loaded.elsewhere == {"first": 1}


@pytest.mark.parametrize("flags, env, problem", [
    ({"node_name": "gpu a"}, {}, "--node-name / CYLINDRIA_NODE_NAME must be 1 to 63 "
                                 "letters, digits, '-', '_' or '.' (got 'gpu a')"),
    ({}, {"CYLINDRIA_NODE_NAME": "x" * 64}, "must be 1 to 63 letters"),
    ({"advertise_url": "gpu-a:8000"}, {}, "--advertise-url / CYLINDRIA_ADVERTISE_URL must "
                                          "be an http:// or https:// URL with a host"),
    ({}, {"CYLINDRIA_ADVERTISE_URL": "http://:8000"}, "must be an http:// or https:// URL"),
    ({}, {"CYLINDRIA_HEARTBEAT_INTERVAL": "0"}, "CYLINDRIA_HEARTBEAT_INTERVAL must be a "
                                                "number above 0")])
def test_node_settings_are_checked(flags, env, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_settings(flags, env)


def test_node_settings_come_from_flags_the_environment_or_the_host():
    settings = load_settings({}, {"CYLINDRIA_NODE_NAME": "gpu-a.lan",
                                  "CYLINDRIA_ADVERTISE_URL": "https://gpu-a.lan/cyl/"})
    assert (settings.node_name, settings.advertise_url) == ("gpu-a.lan", "https://gpu-a.lan/cyl/")
    assert load_settings({"node_name": "b_2"}, {"CYLINDRIA_NODE_NAME": "a"}).node_name == "b_2"
    assert load_settings({}, {}).node_name == default_node_name()
    assert advertised_url("127.0.0.1", 8000, None) == "http://127.0.0.1:8000"
    assert advertised_url("::1", 8000, None) == "http://[::1]:8000"
    assert advertised_url("0.0.0.0", 8000, None) == f"http://{socket.gethostname()}:8000"
    assert advertised_url("0.0.0.0", 8000, "https://a.lan/x/") == "https://a.lan/x"


async def test_one_host_without_postgresql_shows_no_nodes(start_cylindria, tmp_path):
    client = await start_cylindria(state_file=tmp_path / "state.sqlite3")
    body = await (await client.get("/gpus/")).json()
    assert set(body) == {"gpus"} and "name" not in body["gpus"][0]
    resp = await client.get("/jobstatus/nowhere/")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "job_not_found"


async def test_a_node_reads_other_nodes_jobs_by_id(database_url, tmp_path):
    """The journal's read of the other nodes' jobs of one id, on its thread: by node
    name, with each node's advertised URL and whether it is alive; never its own; a 503
    when the database cannot be read; none at all with the SQLite state file."""
    nodes = {}
    for name in ("a", "b", "c"):
        registry = Registry()
        journal, _ = await open_journal(None, 100, registry.saved, database_url=database_url,
                                        node=NodeInfo(name, f"http://{name}.lan:8000"))
        registry.subscribe(journal.note)
        nodes[name] = journal, registry
    try:
        for name, job_id in (("b", "shared"), ("c", "only-c"), ("b", "only-b")):
            journal, registry = nodes[name]
            await journal.durable(registry.begin(job_id, 0, f"p-{name}", "f", ["1"]))
        # Ids are unique across nodes: C's write of B's id changes nothing, and says so.
        journal, registry = nodes["c"]
        with pytest.raises(JobTakenElsewhere, match="taken by another node"):
            await journal.durable(registry.begin("shared", 0, "p-c2", "f", ["1"]))
        a = nodes["a"][0]
        assert await a.elsewhere("nowhere") == []
        assert await nodes["b"][0].elsewhere("only-b") == []
        (held,) = await a.elsewhere("only-b")
        assert (held.node, held.advertise_url, held.node_alive, held.job.job_id,
                held.job.state.value) == ("b", "http://b.lan:8000", True, "only-b", "queued")
        await nodes["c"][0].leave()
        assert [(h.node, h.node_alive) for h in await a.elsewhere("shared")] == [
            ("b", True)]
        assert [(h.node, h.node_alive) for h in await a.elsewhere("only-c")] == [
            ("c", False)]
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute("ALTER TABLE nodes RENAME TO nodes_away")
            try:
                with pytest.raises(StateUnavailable, match="cannot read its database"):
                    await a.elsewhere("only-b")
            finally:
                admin.execute("ALTER TABLE nodes_away RENAME TO nodes")
    finally:
        for journal, _ in nodes.values():
            await journal.close()
    journal, _ = await open_journal(tmp_path / "state.sqlite3", 100, Registry().saved)
    try:
        assert await journal.elsewhere("shared") == []
    finally:
        await journal.close()


async def test_a_node_heartbeat_carries_its_gpus(start_cylindria, database_url, tmp_path):
    client = await start_cylindria(state_file=tmp_path / "state.sqlite3",
                                   database_url=database_url, node_name="solo",
                                   advertise_url="http://solo.lan:8000",
                                   timing=with_timing(heartbeat_interval=0.05))
    assert (await client.post("/gpus/0/drain")).status == 200

    def row():
        found = column(database_url, "SELECT gpus FROM nodes WHERE name = 'solo'")
        return found if found and found[0] and found[0][0]["drained"] else None
    (gpus,) = await wait_until(row, 5, "a heartbeat with the GPU drained")
    assert gpus[0]["name"] == "solo:0" and gpus[0]["reachable"] is True
    assert gpus[0]["devices"][0]["vram_total"] > 0
    # The connection lost (PostgreSQL restarted): the next heartbeat makes another.
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                      "application_name = 'cylindria' AND datname = current_database()")
    assert (await client.post("/gpus/0/undrain")).status == 200

    def undrained():
        found = column(database_url, "SELECT gpus FROM nodes WHERE name = 'solo'")
        return found if found and not found[0][0]["drained"] else None
    await wait_until(undrained, 5, "a heartbeat on a new connection")
    body = await (await client.get("/gpus/")).json()
    CONTRACT.validate(body)
    (node,) = body["nodes"]
    assert (node["name"], node["self"], node["alive"]) == ("solo", True, True)
    assert node["advertise_url"] == "http://solo.lan:8000"
    await client.close()
    assert column(database_url, "SELECT stopped_at IS NOT NULL FROM nodes") == [True]
