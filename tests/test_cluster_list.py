"""Nodes sharing one PostgreSQL database: `GET /jobs/` through any node lists every node's
jobs, newest first in one order across the nodes, paged by that order, filtered by state
and by any node's GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from jsonschema import Draft202012Validator
from test_cluster_nodes import Cluster, Node
from test_cluster_nodes import cluster as cluster  # the fixture

from cylindria.config import Settings
from cylindria.core.listing import page_anywhere
from cylindria.core.ports import HeldElsewhere, Listed
from cylindria.core.records import from_record, to_record
from cylindria.core.registry import Registry
from cylindria.nodes import NodeInfo
from cylindria.store import postgres
from cylindria.store.journal import open_journal
from cylindria.web.openapi import document

import workflows

PAGE_CONTRACT = Draft202012Validator({"$ref": "#/components/schemas/JobsPage",
                                       "components": document(Settings())["components"]})


async def listed(cluster: Cluster, node: Node, **query: str) -> tuple[int, dict]:
    async with cluster.session.get(node.url + "/jobs/", params=query) as resp:
        return resp.status, await resp.json()


async def ids(cluster: Cluster, node: Node, **query: str) -> list[str]:
    status, body = await listed(cluster, node, **query)
    assert status == 200, body
    return [job["job_id"] for job in body["jobs"]]


async def paged(cluster: Cluster, node: Node, limit: int, **query: str) -> list[str]:
    """Every page, `limit` jobs at a time, following next_before to the end."""
    seen: list[str] = []
    before = ""
    for _ in range(50):
        status, body = await listed(cluster, node, limit=str(limit), before=before, **query)
        assert status == 200, body
        PAGE_CONTRACT.validate(body)
        seen += [job["job_id"] for job in body["jobs"]]
        if body["next_before"] is None:
            return seen
        before = str(body["next_before"])
    raise AssertionError("paging did not end")


@pytest.mark.slow
async def test_every_node_lists_every_nodes_jobs_newest_first(cluster):
    a, b = cluster.a, cluster.b
    await cluster.start(a)
    await cluster.start(b)
    # Submitted one after the other (each on disk before its 202), alternating nodes
    # and GPUs; one of B's fails.
    submitted = [(a, "a-0", 0), (b, "fails-b", 1), (a, "a-1", 1), (b, "b-1", 0),
                 (a, "a-2", 0), (b, "b-2", 1)]
    holders = {"gpu-a": a, "gpu-b": b}
    for node, job_id, gpu in submitted:
        workflow = workflows.fails_at_runtime() if job_id == "fails-b" else workflows.quick()
        await cluster.put(node, job_id, workflow, gpu=gpu)
    for node, job_id, _ in submitted:
        await cluster.until_state(node, job_id, "completed", "failed")
    newest_first = [job_id for _, job_id, _ in reversed(submitted)]

    for node in (a, b):
        status, body = await listed(cluster, node)
        assert status == 200
        PAGE_CONTRACT.validate(body)
        assert [j["job_id"] for j in body["jobs"]] == newest_first
        assert body["next_before"] is None
        for job in body["jobs"]:
            holder = "gpu-a" if job["job_id"].startswith("a-") else "gpu-b"
            assert job["node"] == holder
            # Each as /jobstatus/ answers it through this node: its own with `node`
            # added, another node's with `node`, `node_alive`, `as_of` and output URLs
            # on the node that holds it.
            status, alone = await cluster.get(node, f"/jobstatus/{job['job_id']}/")
            assert status == 200 and job == {**alone, "node": holder}
            if holder == node.name:
                assert "node_alive" not in job
            else:
                assert job["node_alive"] is True and job["as_of"] == job["updated_at"]
                if job["state"] == "completed":
                    assert job["outputs"][0]["url"] == (
                        f"{holders[holder].url}/joboutput/{job['job_id']}/0")
        # Paging visits every job once, in the same order, whatever the page size.
        for limit in (1, 2, 4):
            assert await paged(cluster, node, limit) == newest_first

    # Filters: states; a GPU of this node by its number, any node's by NODE:N.
    assert await ids(cluster, a, state="failed") == ["fails-b"]
    assert await ids(cluster, b, state="completed,cancelled") == [
        job_id for job_id in newest_first if job_id != "fails-b"]
    assert await ids(cluster, a, gpu="0") == ["a-2", "a-0"]
    assert await ids(cluster, a, gpu="gpu-a:0") == ["a-2", "a-0"]
    assert await ids(cluster, a, gpu="gpu-b:1") == ["b-2", "fails-b"]
    assert await ids(cluster, b, gpu="0") == ["b-1"]
    assert await paged(cluster, b, 1, gpu="gpu-b:1", state="completed") == ["b-2"]
    assert await ids(cluster, a, gpu="gpu-c:0") == []

    # A retry starts a new attempt: the job comes first again, as on one host.
    async with cluster.session.post(b.url + "/retryjob/fails-b/") as resp:
        assert resp.status == 202, await resp.text()
    again = ["fails-b", *(job_id for job_id in newest_first if job_id != "fails-b")]
    assert await ids(cluster, a) == again
    assert await paged(cluster, b, 2) == again

    # Bad filters and cursors: a 400 saying what was wrong.
    for query, code, words in (
            ({"before": "abc"}, "bad_request", "before must be a whole number of 1 or more"),
            ({"before": "0"}, "bad_request", "before must be a whole number of 1 or more"),
            ({"before": "-3"}, "bad_request", "before must be a whole number of 1 or more"),
            ({"gpu": "7"}, "unknown_gpu", "gpu 7 does not exist"),
            ({"gpu": "gpu-a:7"}, "unknown_gpu", "gpu 7 does not exist"),
            ({"gpu": "gpu b:0"}, "unknown_gpu", "NODE:N as GET /gpus/ names it"),
            ({"gpu": "gpu-b:x"}, "unknown_gpu", "NODE:N as GET /gpus/ names it")):
        status, body = await listed(cluster, a, **query)
        assert (status, body["error"]["code"]) == (400, code), body
        assert words in body["error"]["message"]


async def test_the_order_across_nodes_numbers_old_rows_and_new_ones(database_url, monkeypatch):
    """Migration 6 numbers the rows there before in (node, seq) order; rows written after
    take higher numbers, and a new attempt of a job (a new seq) a new one; the statements
    page by it, with each row's node."""
    before_listing = tuple(m for m in postgres.MIGRATIONS if m[0] < 6)
    monkeypatch.setattr(postgres, "MIGRATIONS", before_listing)
    monkeypatch.setattr(postgres, "SCHEMA_VERSION", before_listing[-1][0])
    journals = {}
    for name in ("b", "a"):
        registry = Registry()
        journal, _ = await open_journal(None, 100, registry.saved, database_url=database_url,
                                        node=NodeInfo(name, f"http://{name}.lan:8000"))
        registry.subscribe(journal.note)
        journals[name] = journal, registry
    try:
        for name, job_id, gpu in (("b", "old-b0", 0), ("a", "old-a0", 1), ("b", "old-b1", 1),
                                  ("a", "old-a1", 0)):
            journal, registry = journals[name]
            await journal.durable(registry.begin(job_id, gpu, f"p-{job_id}", "f", ["1"]))
    finally:
        for journal, _ in journals.values():
            await journal.close()

    monkeypatch.undo()
    journals = {}
    for name in ("a", "b"):
        registry = Registry()
        journal, loaded = await open_journal(None, 100, registry.saved,
                                             database_url=database_url,
                                             node=NodeInfo(name, f"http://{name}.lan:8000"))
        registry.restore(loaded.jobs, loaded.last_seq)
        registry.subscribe(journal.note)
        journals[name] = journal, registry
    try:
        a, registry_a = journals["a"]
        page = await a.listing(None, None, None, 10)
        assert [(row.key, row.held.node, row.held.job.job_id) for row in page] == [
            (4, "b", "old-b1"), (3, "b", "old-b0"), (2, "a", "old-a1"), (1, "a", "old-a0")]
        b, registry_b = journals["b"]
        await b.durable(registry_b.begin("new-b", 0, "p-new", "f", ["1"]))
        # A new attempt of old-a0: its row's number is renewed.
        job = registry_a.get("old-a0")
        registry_a.reject(job, "refused")
        await a.durable(job)
        registry_a.retry(job, 1, "p-again", ["1"])
        await a.durable(job)
        page = await b.listing(None, None, None, 10)
        assert [row.held.job.job_id for row in page] == [
            "old-a0", "new-b", "old-b1", "old-b0", "old-a1"]
        # Numbers only grow (an upsert of a row there already may use one up: gaps).
        assert page[1].key >= 5 and page[0].key > page[1].key
        assert page[1].held.advertise_url == "http://b.lan:8000" and page[1].held.node_alive
        assert [row.held.job.job_id for row in await b.listing(None, ("a", 1), None, 10)] == [
            "old-a0"]
        assert [row.held.job.job_id for row in await b.listing({"queued"}, ("b", 1), 5, 1)
                ] == ["old-b1"]
        assert [row.key for row in await b.listing(None, None, 4, 2)] == [3, 2]
        assert await b.listing({"completed"}, None, None, 10) == []
    finally:
        for journal, _ in journals.values():
            await journal.close()


async def test_a_page_shows_this_nodes_jobs_as_its_registry_has_them():
    """A row of this node's is shown as the registry has the job now (a commit newer,
    perhaps), and left out when that moved it out of the filters; the cursor is the key
    of the last row read either way. Other nodes' rows are shown as written."""
    registry = Registry()
    mine = registry.begin("mine", 0, "p-1", "f", ["1"])
    written = from_record(to_record(mine))  # queued, as the row has it
    registry.reject(mine, "refused")  # not written yet
    theirs = from_record(to_record(Registry().begin("theirs", 1, "p-2", "f", ["1"])))
    rows = [Listed(9, HeldElsewhere("me", "http://me", True, written)),
            Listed(7, HeldElsewhere("other", "http://other", True, theirs)),
            Listed(4, HeldElsewhere("other", None, False, theirs))]
    asked = []

    async def listing(states, gpu, before, limit):
        asked.append((states, gpu, before, limit))
        return rows[:limit]

    jobs = SimpleNamespace(store=SimpleNamespace(listing=listing), registry=registry,
                           settings=SimpleNamespace(node_name="me"), foresee=lambda job: job)
    page = await page_anywhere(jobs, None, None, None, 2)
    assert asked == [(None, None, None, 3)]
    assert page.next_before == 7
    assert [(key, type(entry).__name__) for key, entry in page.entries] == [
        (9, "Job"), (7, "HeldElsewhere")]
    assert page.entries[0][1] is mine and mine.state.value == "rejected"
    page = await page_anywhere(jobs, ["queued"], ("me", 0), 10, 1)
    assert asked[-1] == (frozenset({"queued"}), ("me", 0), 10, 2)
    assert (page.entries, page.next_before) == ([], 9)
    page = await page_anywhere(jobs, None, None, None, 3)
    assert (len(page.entries), page.next_before) == (3, None)
