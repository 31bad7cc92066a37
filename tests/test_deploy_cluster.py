"""Deploying nodes that share one PostgreSQL database: a real nginx with the shipped
cylindria-cluster.conf in front of two `cylindria serve` nodes, any node answering for
any job, and a killed node skipped."""

from __future__ import annotations

import re
import signal
import subprocess
from collections import Counter

import aiohttp
import pytest
from test_cluster_nodes import GPUS, HEARTBEAT, Cluster, Node
from test_cluster_nodes import cluster as cluster  # the fixture
from test_deploy import (
    DEPLOY,
    NGINX,
    nginx_config,
    start_nginx,
    stop_nginx,
    until_nginx_answers,
)
from test_deploy import nginx as nginx  # the fixture

from cylindria.addresses import free_port_run

import workflows
from helpers import Proc, clean_env, wait_until

SHIPPED = "cylindria-cluster.conf"
KEY = "cluster-balancer-key-7Qx2Lm9Rv4"
JOBS = 8

pytestmark = pytest.mark.slow


class FrontedNode(Node):
    """A node as it runs behind the balancer: with the cluster's API key, trusting the
    balancer's address (loopback here) with the clients' addresses."""

    def start(self) -> None:
        self.starts += 1
        self.proc = Proc(self.args(), clean_env(
            CYLINDRIA_HEARTBEAT_INTERVAL=str(HEARTBEAT), CYLINDRIA_POLL_INTERVAL="0.2",
            CYLINDRIA_LOST_GRACE="0.5", CYLINDRIA_API_KEY=KEY,
            CYLINDRIA_TRUSTED_PROXIES="127.0.0.1"),
            self.tmp / f"{self.name}-{self.starts}.log")


@pytest.fixture
async def fronted(cluster: Cluster, nginx, tmp_path):
    """Both nodes up, and nginx in front of them: the main port, and each node's own."""
    cluster.a = FrontedNode("gpu-a", tmp_path, cluster.sim_port, cluster.a.database_url)
    cluster.b = FrontedNode("gpu-b", tmp_path, cluster.sim_port + GPUS,
                          cluster.b.database_url)
    for node in (cluster.a, cluster.b):
        await cluster.start(node)
    front = free_port_run(1)
    ports = {"8001": free_port_run(1), "8002": free_port_run(1)}
    conf = nginx_config(tmp_path, front, ports, [cluster.a.port, cluster.b.port], SHIPPED)
    proc, log = start_nginx(nginx, tmp_path, conf)
    base = f"http://127.0.0.1:{front}"
    try:
        async with aiohttp.ClientSession(headers={"X-API-Key": KEY}) as session:
            await until_nginx_answers(proc, tmp_path, session, base)
            yield base, session, [f"http://127.0.0.1:{p}" for p in ports.values()]
    finally:
        stop_nginx(proc, log)


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with session.get(url) as resp:
        return resp.status, await resp.json()


async def test_any_node_answers_through_nginx_and_a_killed_node_is_skipped(cluster, fronted):
    base, session, per_node = fronted
    a, b = cluster.a, cluster.b
    job_ids = [f"rr-{n}" for n in range(JOBS)]
    for job_id in job_ids:
        async with session.put(f"{base}/startjob/{job_id}/", params={"GpuId": "0"},
                               json=workflows.quick()) as resp:
            assert resp.status == 202, await resp.text()

    # Round robin spread the PUTs: each job is held by the node nginx gave it to, and
    # both nodes got some. Node A tells its own jobs from another node's by `node`.
    holder = {}
    for job_id in job_ids:
        status, body = await get(session, f"{a.url}/jobstatus/{job_id}/")
        assert status == 200, body
        holder[job_id] = body.get("node", a.name)
    assert set(holder.values()) == {a.name, b.name}, holder

    # Every job's status through nginx, whichever node answers it (a node answers
    # another node's job with `node` set): asked twice in a row, so both nodes answer.
    async def all_completed() -> bool:
        for job_id in job_ids:
            status, body = await get(session, f"{base}/jobstatus/{job_id}/")
            assert status == 200, body
            if body["state"] != "completed":
                return False
        return True
    await wait_until(all_completed, 10, "every job to complete")
    answered: Counter[str] = Counter()
    for job_id in job_ids:
        for _ in range(2):
            status, body = await get(session, f"{base}/jobstatus/{job_id}/")
            assert status == 200 and body["state"] == "completed", body
            assert body.get("node", holder[job_id]) == holder[job_id], body
            answered["holder" if "node" not in body else "other"] += 1
    assert answered["holder"] > 0 and answered["other"] > 0, answered
    # The routes a node passes on reach the holder: outputs stream (nginx drops the
    # header nodes mark passed requests with, which would keep a node from passing a
    # client's request on), a finished job's cancel is refused as on its own node.
    for job_id in job_ids[:4]:
        for _ in range(2):
            async with session.get(f"{base}/joboutput/{job_id}/0",
                                   headers={"X-Cylindria-Forwarded": "gpu-a"}) as resp:
                assert resp.status == 200 and resp.content_type == "image/png"
        async with session.post(f"{base}/canceljob/{job_id}/") as resp:
            body = await resp.json()
            assert resp.status == 409 and body["error"]["code"] == "job_finished", body
    # Every node lists every node's jobs and GPUs, so those go to any node too.
    for _ in range(2):
        status, body = await get(session, f"{base}/gpus/")
        assert status == 200 and {n["name"] for n in body["nodes"]} == {a.name, b.name}
        status, body = await get(session, f"{base}/jobs/")
        assert status == 200, body
        assert {(j["job_id"], j["node"]) for j in body["jobs"]} == set(holder.items())
    status, body = await get(session, f"{base}/metrics")
    assert status == 404 and body["error"]["code"] == "address_a_node"

    # Node B dies. nginx skips it: every status still answers 200 (node A's from its
    # memory, node B's from the database, as B last wrote it), and new jobs all go to A.
    b.proc.popen.send_signal(signal.SIGKILL)
    b.proc.popen.wait(timeout=10)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(f"{b.url}/readyz"):
            pass
    status, body = await get(session, f"{per_node[1]}/readyz")
    assert status == 502 and body["error"]["code"] == "node_unavailable", body
    assert (await get(session, f"{per_node[0]}/readyz"))[0] == 200
    for _ in range(3):
        for job_id in job_ids:
            status, body = await get(session, f"{base}/jobstatus/{job_id}/")
            assert status == 200 and body["state"] == "completed", body
            assert body.get("node", a.name) == holder[job_id], body
    for n in range(4):
        async with session.put(f"{base}/startjob/late-{n}/", params={"GpuId": "0"},
                               json=workflows.quick()) as resp:
            assert resp.status == 202, await resp.text()
        status, body = await get(session, f"{a.url}/jobstatus/late-{n}/")
        assert status == 200 and "node" not in body, body


def test_the_cluster_configuration_passes_nginx_t(nginx, tmp_path):
    conf = nginx_config(tmp_path, free_port_run(1), {"8001": free_port_run(1),
                                                     "8002": free_port_run(1)},
                        [free_port_run(1), free_port_run(1)], SHIPPED)
    done = subprocess.run([str(NGINX), "-t", "-e", "stderr", "-p", str(tmp_path),
                           "-c", str(conf)], capture_output=True, text=True, timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "test is successful" in output, output
    assert "[warn]" not in output, output


def test_the_cluster_configuration_balances_without_hashing_and_passes_clients_on():
    conf = re.sub(r"#.*", "", (DEPLOY / "nginx" / SHIPPED).read_text())
    upstream = re.search(r"upstream cylindria_nodes \{(.+?)\}", conf, re.DOTALL).group(1)
    assert "hash" not in upstream and "keepalive" in upstream
    assert len(re.findall(r"server \S+ max_fails=\d+ fail_timeout=\d+s;", upstream)) == 2
    # A dead node is skipped; a node's own answers are never retried on another, nor
    # counted against it (its 502 or 503 may be about another node, or the database).
    assert re.findall(r"proxy_next_upstream\b[^;]*;", conf) == [
        "proxy_next_upstream error timeout;"]
    assert re.search(r"location /startjob/ \{[^}]*proxy_next_upstream_timeout 5s;", conf)
    servers = [block for block in conf.split("\nserver {")[1:] if "proxy_pass" in block]
    assert len(servers) == 3
    for block in servers:
        assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in block
        assert "proxy_set_header Host $http_host;" in block
        assert "client_header_timeout 10s;" in block and "limit_conn " in block
    # As the one-host file: the event stream flows as it comes.
    events = re.search(r"location = /events/ \{(.+?)\n    \}", servers[0], re.DOTALL).group(1)
    assert "proxy_buffering off;" in events
