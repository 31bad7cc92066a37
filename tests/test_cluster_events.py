"""Nodes sharing PostgreSQL: `GET /events/` on any node carries every node's jobs, with
the database's ids, and a stream resumes on another node with `Last-Event-ID`."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import psycopg
import pytest
from test_cluster_nodes import Cluster, column
from test_cluster_nodes import cluster as cluster  # the fixture
from test_cluster_ops import read_events

from cylindria.core.records import Job, to_record
from cylindria.core.registry import Registry
from cylindria.nodes import NodeInfo
from cylindria.store.backend import encode_record
from cylindria.store.events import Cursor, EventsReader
from cylindria.store.journal import open_journal

import workflows
from helpers import wait_until


def done(job_id: str):
    return lambda e: e["data"].get("job_id") == job_id and e["data"]["state"] == "completed"


@pytest.mark.slow
async def test_every_nodes_jobs_on_one_stream_resumed_on_another_node(cluster: Cluster):
    a, b = cluster.a, cluster.b
    await cluster.start(a)
    await cluster.start(b)
    # A stream on A, opened before B takes a job: B's job's lasting changes reach it,
    # with the database's ids, as A shows B's job (with its node).
    async with cluster.session.get(a.url + "/events/") as resp:
        assert resp.status == 200
        await cluster.put(b, "ev-b", workflows.txt2img(steps=6), gpu=1)
        seen = [e for e in await read_events(resp, done("ev-b"), timeout=15)
                if e["data"]["job_id"] == "ev-b"]
    ids = [e["id"] for e in seen]
    assert None not in ids and ids == sorted(set(ids)), ids
    assert {e["data"]["node"] for e in seen} == {"gpu-b"}
    assert [e["data"]["state"] for e in seen][-1] == "completed"
    # Exactly the rows the database holds for it.
    assert ids == column(a.database_url, "SELECT id FROM job_events WHERE job_id = %s "
                         "AND id <= %s ORDER BY id", "ev-b", ids[-1])
    assert len(ids) >= 3, seen  # queued, running, completed at least

    # The client read the first events on A and comes back on B: B replays exactly the
    # ones after, its own job as its rows were written (no node: B holds it).
    cut, last = ids[0], ids[-1]
    for path in ("/events/?job_id=ev-b", "/events/"):
        async with cluster.session.get(b.url + path,
                                       headers={"Last-Event-ID": str(cut)}) as resp:
            assert resp.status == 200
            again = [e for e in await read_events(resp, lambda e: e["id"] == last,
                                                  timeout=15)
                     if e["data"]["job_id"] == "ev-b"]
        assert [e["id"] for e in again] == ids[1:], (path, again)
        assert [e["data"]["state"] for e in again] == [e["data"]["state"] for e in seen[1:]]
        assert all("node" not in e["data"] for e in again)

    # And the other way: A's job on B's stream, resumed on A from B's last id.
    async with cluster.session.get(b.url + "/events/") as resp:
        await cluster.put(a, "ev-a", workflows.quick(), gpu=0)
        first = await read_events(resp, lambda e: e["data"].get("job_id") == "ev-a", timeout=15)
    last = first[-1]["id"]
    assert first[-1]["data"]["node"] == "gpu-a"
    async with cluster.session.get(a.url + "/events/?job_id=ev-a",
                                   headers={"Last-Event-ID": str(last)}) as resp:
        rest = await read_events(resp, done("ev-a"), timeout=15)
        # A's own job is shown as A has it now: its last rows may follow "completed".
        expected = column(a.database_url, "SELECT id FROM job_events WHERE job_id = %s "
                          "AND id > %s ORDER BY id", "ev-a", last)
        if rest[-1]["id"] != expected[-1]:
            rest += await read_events(resp, lambda e: e["id"] == expected[-1], timeout=15)
    assert [e["id"] for e in rest if e["id"] is not None] == expected
    # An id older than any event kept: the client is told to re-read the state.
    with psycopg.connect(a.database_url) as conn:
        conn.execute("DELETE FROM job_events WHERE id <= %s", (ids[1],))
    async with cluster.session.get(b.url + "/events/",
                                   headers={"Last-Event-ID": str(cut - 1)}) as resp:
        resync = await read_events(resp, lambda e: True, timeout=15)
    assert resync[0]["event"] == "resync"


def test_the_cursor_hands_rows_on_in_order_and_waits_for_a_gap():
    cursor = Cursor(10)
    assert cursor.take(100, 105, [(11, "a"), (12, "b")], False) == [(11, "a"), (12, "b")]
    # 13 is not there yet (its transaction is in progress, or rolled back): 14 waits.
    assert cursor.take(100, 106, [(14, "d")], False) == []
    assert (cursor.last, cursor.horizon, cursor.bound) == (12, 106, 14)
    # Still in progress: nothing; 13 committed: both in order.
    assert cursor.take(105, 107, [(14, "d"), (15, "e")], False) == []
    assert cursor.take(105, 107, [(13, "c"), (14, "d"), (15, "e")], False) == [
        (13, "c"), (14, "d"), (15, "e")]
    # A gap never filled: final once every transaction of the time has ended.
    assert cursor.take(107, 108, [(17, "g")], False) == []
    assert cursor.take(108, 109, [(17, "g"), (18, "h")], False) == [(17, "g"), (18, "h")]
    assert (cursor.last, cursor.horizon) == (18, None)


async def test_the_reader_never_skips_an_event_committed_late(database_url):
    journal, _ = await open_journal(None, 100, Registry().saved, database_url=database_url,
                                    node=NodeInfo("a", "http://a.lan:8000"))
    got: list[tuple[int, str]] = []
    started = asyncio.Event()

    def deliver(last: int, rows: list) -> None:
        got.extend((event_id, job_id) for event_id, job_id, _, _ in rows)
        started.set()

    now = datetime.now(UTC)
    record = encode_record(to_record(Job("x", 0, "f", "p", frozenset(), now, now)))
    insert = "INSERT INTO job_events (job_id, node, record) VALUES (%s, 'a', %s)"
    reader = EventsReader(journal._database._params,  # type: ignore[attr-defined]
                          asyncio.get_running_loop(), deliver)
    reader.start()
    try:
        await asyncio.wait_for(started.wait(), 10)
        with psycopg.connect(database_url) as late, psycopg.connect(database_url) as rolled, \
                psycopg.connect(database_url, autocommit=True) as quick:
            late.execute(insert, ("late", record))        # takes an id, commits last
            rolled.execute(insert, ("rolled", record))    # takes an id, rolls back
            quick.execute(insert, ("quick", record))      # a later id, committed first
            # The reader holds "quick" back while the two before it are undecided.
            with pytest.raises(AssertionError, match="timed out"):
                await wait_until(lambda: got, 0.3, "nothing yet")
            rolled.rollback()
            late.commit()
            quick.execute(insert, ("after", record))
        await wait_until(lambda: len(got) == 3, 10, "the three events committed")
        assert [job_id for _, job_id in got] == ["late", "quick", "after"]
        assert [event_id for event_id, _ in got] == sorted(event_id for event_id, _ in got)
    finally:
        await reader.stop()
        await journal.close()
