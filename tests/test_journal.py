"""The journal behind the registry, in process: restarts, retries, retention, paging,
and a state file that stops taking writes."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest
import ujson
from hypothesis import given, settings
from hypothesis import strategies as st

from cylindria.appkeys import JOURNAL, REGISTRY
from cylindria.core.records import Job, JobState
from cylindria.core.registry import Registry
from cylindria.errors import StateUnavailable
from cylindria.store.backend import encode_record
from cylindria.store.journal import Journal
from cylindria.store.writer import WriterThread

import workflows
from helpers import (
    both_stores,
    job_status,
    put_job,
    start_paused,
    wait_state,
    wait_until,
    webhook_receiver,
    webhook_state,
    with_timing,
)


async def restart(client, start_cylindria, cluster, **settings):
    """Stop this Cylindria cleanly and start another on the same settings."""
    await client.close()
    return await start_cylindria(cluster, **settings)


@both_stores
async def test_a_restart_keeps_every_job_and_its_outputs(start_cylindria, start_sims, store):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster, **store.settings)
    await put_job(client, "kept", workflows.quick())
    before = await wait_state(client, "kept", "completed")
    await start_paused(client, cluster.sims[0], "running", workflows.txt2img(steps=3))

    client = await restart(client, start_cylindria, cluster, **store.settings)
    after = await job_status(client, "kept")
    assert after == before
    assert (await client.get(after["outputs"][0]["url"])).status == 200
    resumed = await job_status(client, "running")
    assert resumed["state"] == "running"
    cluster.sims[0].resume()
    done = await wait_state(client, "running", "completed")
    assert done["progress"] == 1.0 and done["outputs"]
    assert cluster.count(0, "POST", "/prompt") == 2


async def test_retry_runs_the_stored_workflow_as_a_new_attempt(start_cylindria, start_sims,
                                                               tmp_path):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster, state_file=tmp_path / "s.sqlite3")
    workflow = workflows.fails_at_runtime()
    await put_job(client, "again", workflow, gpu=0)
    failed = await wait_state(client, "again", "failed")

    resp = await client.post("/retryjob/again/", params={"GpuId": "1"})
    assert resp.status == 202, await resp.text()
    reply = await resp.json()
    assert reply["accepted"] is True and reply["attempt"] == 2 and reply["gpu_id"] == 1
    assert reply["prompt_id"] != failed["prompt_id"]
    second = await wait_state(client, "again", "failed")
    assert second["attempt"] == 2 and second["gpu_id"] == 1
    assert [(a["attempt"], a["gpu_id"], a["state"]) for a in second["attempts"]] == [
        (1, 0, "failed"), (2, 1, "failed")]
    assert second["attempts"][0]["prompt_id"] == failed["prompt_id"]
    assert second["attempts"][0]["error"]["type"] == "Exception"
    # ComfyUI got the workflow the client sent the first time.
    history = cluster.sims[1].history[reply["prompt_id"]]
    assert history["prompt"][2] == workflow


async def test_retry_is_refused_for_jobs_that_are_not_finished_badly(start_cylindria,
                                                                    start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    await put_job(client, "fine", workflows.quick())
    await wait_state(client, "fine", "completed")
    resp = await client.post("/retryjob/fine/")
    assert resp.status == 409
    body = await resp.json()
    assert body["error"]["code"] == "not_retryable" and body["state"] == "completed"
    await start_paused(client, cluster.sims[0], "busy", workflows.txt2img(steps=2))
    assert (await client.post("/retryjob/busy/")).status == 409
    cluster.sims[0].resume()
    resp = await client.post("/retryjob/nobody/")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "job_not_found"
    assert (await client.post("/retryjob/bad id/")).status == 400
    assert cluster.count(0, "POST", "/prompt") == 2


async def test_a_repeated_put_of_a_failed_job_names_the_retry_endpoint(start_cylindria):
    client = await start_cylindria()
    workflow = workflows.fails_at_runtime()
    await put_job(client, "broken", workflow)
    await wait_state(client, "broken", "failed")
    status, body = await put_job(client, "broken", workflow)
    assert status == 200 and "POST /retryjob/broken/" in body["detail"]


@both_stores
async def test_old_jobs_are_answered_from_disk_after_they_leave_memory(start_cylindria,
                                                                       start_sims, store):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster, **store.settings, memory_jobs=2)
    for n in range(6):
        await put_job(client, f"j{n}", workflows.quick())
        await wait_state(client, f"j{n}", "completed")
    registry = client.app[REGISTRY]
    await wait_until(lambda: registry.get("j0") is None, what="j0 to leave memory")
    body = await job_status(client, "j0")
    assert body["state"] == "completed" and body["job_id"] == "j0"
    assert (await client.get(body["outputs"][0]["url"])).status == 200
    first = await (await client.get("/jobs/", params={"limit": "4"})).json()
    rest = await (await client.get("/jobs/", params={"before": str(first["next_before"])})
                  ).json()
    assert [j["job_id"] for j in first["jobs"] + rest["jobs"]] == [
        f"j{n}" for n in range(5, -1, -1)]
    assert rest["next_before"] is None
    only = await (await client.get("/jobs/", params={"state": "completed", "gpu": "0",
                                                      "limit": "6"})).json()
    assert len(only["jobs"]) == 6
    assert (await client.post("/canceljob/j0/")).status == 409


@both_stores
async def test_jobs_past_retention_are_gone(start_cylindria, start_sims, store):
    cluster = await start_sims(1)
    # About 0.4 s of retention, checked every 50 ms.
    client = await start_cylindria(cluster, **store.settings,
                                   retention_days=0.4 / 86400,
                                   timing=with_timing(housekeeping_interval=0.05))
    await put_job(client, "brief", workflows.quick())
    await wait_state(client, "brief", "completed")

    async def gone():
        return (await client.get("/jobstatus/brief/")).status == 404
    await wait_until(gone, what="the job to pass its retention")
    assert await client.app[JOURNAL].held() == 0


async def test_a_full_state_file_refuses_new_jobs_and_follows_the_others(
        start_cylindria, start_sims, tmp_path, caplog):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster, state_file=tmp_path / "s.sqlite3",
                                   timing=with_timing(state_retry=0.1))
    sim = cluster.sims[0]
    await start_paused(client, sim, "inflight", workflows.txt2img(steps=3))
    journal = client.app[JOURNAL]
    pages = await journal._run(lambda db: db.conn.execute("PRAGMA page_count").fetchone()[0])
    # The file may not grow any more, as on a full disk.
    await journal._run(lambda db: db.conn.execute(f"PRAGMA max_page_count = {pages}"))
    bulky = workflows.quick(prefix="x" * 200_000)
    with caplog.at_level(logging.ERROR, logger="cylindria"):
        status, body = await put_job(client, "refused", bulky)
        assert status == 503, body
        assert body["error"]["code"] == "state_unavailable"
        assert "Retry later" in body["detail"]
        status, _ = await put_job(client, "also-refused", workflows.quick())
        assert status == 503
    sim.resume()
    assert (await wait_state(client, "inflight", "completed"))["progress"] == 1.0
    assert len([r for r in caplog.records if "writing failed" in r.getMessage()]) == 1
    assert cluster.count(0, "POST", "/prompt") == 1

    await journal._run(lambda db: db.conn.execute("PRAGMA max_page_count = 1073741823"))

    async def accepted():
        return (await put_job(client, "later", workflows.quick()))[0] == 202
    await wait_until(accepted, what="writes to work again")
    await wait_state(client, "later", "completed")


async def test_two_cylindrias_on_one_comfyui_keep_to_their_own_jobs(
        start_cylindria, start_sims, tmp_path):
    cluster = await start_sims(1)
    first = await start_cylindria(cluster, state_file=tmp_path / "a.sqlite3")
    second = await start_cylindria(cluster, state_file=tmp_path / "b.sqlite3")
    clients = {"a": first, "b": second}
    for client in clients.values():
        for n in range(3):
            status, _ = await put_job(client, f"same-{n}", workflows.txt2img(steps=2))
            assert status == 202
    for name, client in clients.items():
        for n in range(3):
            body = await wait_state(client, f"same-{n}", "completed")
            assert body["progress"] == 1.0, name
    ids = {name: {j["prompt_id"] for j in (await (await c.get("/jobs/")).json())["jobs"]}
           for name, c in clients.items()}
    assert len(ids["a"]) == len(ids["b"]) == 3 and not ids["a"] & ids["b"]
    # A restart of one brings back its own jobs only, and follows events for them.
    second = await restart(second, start_cylindria, cluster, state_file=tmp_path / "b.sqlite3")
    listed = (await (await second.get("/jobs/")).json())["jobs"]
    assert {j["prompt_id"] for j in listed} == ids["b"]
    await start_paused(second, cluster.sims[0], "b-late", workflows.txt2img(steps=2))
    cluster.sims[0].resume()
    await wait_state(second, "b-late", "completed")
    assert (await first.get("/jobstatus/b-late/")).status == 404


# -- the journal itself --------------------------------------------------------------------

@both_stores
async def test_a_burst_of_changes_shares_commits(store):
    registry = Registry()
    journal, loaded = await store.open(100, registry.saved)
    registry.subscribe(journal.note)
    try:
        assert loaded.jobs == [] and loaded.last_seq == 0
        jobs = [registry.begin(f"b{n}", 0, f"p{n}", "f", ["1"]) for n in range(200)]
        await asyncio.gather(*(journal.durable(job) for job in jobs))
        assert all(job.saved_version == job.version for job in jobs)
        # One commit for the first change, one for everything that came meanwhile.
        assert journal.commits <= 3
        lone = registry.begin("lone", 0, "pl", "f", ["1"])
        before = journal.commits
        await journal.durable(lone)
        assert journal.commits == before + 1
    finally:
        await journal.close()


@both_stores
async def test_the_store_holds_each_job_as_the_registry_last_had_it(store):
    registry = Registry()
    journal, _ = await store.open(100, registry.saved)
    registry.subscribe(journal.note)
    job = registry.begin("life", 1, "pl", "f", ["1", "2"], callback_url="http://127.0.0.1:9/h")
    journal.remember_workflow("life", '{"prompt":{},"extra_data":{}}')
    registry.confirm(job)
    registry.on_start("pl")
    registry.on_executed("pl", "2", {"images": [{"filename": "a.png"}]})
    registry.on_success("pl")
    await journal.close()

    assert store.record("life")["state"] == "completed"
    again = Registry()
    journal, loaded = await store.open(100, again.saved)
    try:
        (back,) = loaded.jobs
        assert isinstance(back, Job) and back.state is JobState.COMPLETED
        assert back.output_map() == job.output_map() == {"2": {"images": [{"filename": "a.png"}]}}
        assert back.gpu_id == 1 and back.seq == job.seq and back.progress == 1.0
        assert back.webhook["state"] == "pending" and back.finished_at == job.finished_at
        stored = await journal.workflow("life")
        assert isinstance(stored, bytes | str)
        assert ujson.loads(stored) == {"prompt": {}, "extra_data": {}}
    finally:
        await journal.close()


@both_stores
@pytest.mark.parametrize("bound", [0, 3])
async def test_start_up_loads_jobs_in_flight_and_the_newest_finished(store, bound):
    registry = Registry()
    journal, _ = await store.open(bound, registry.saved)
    registry.subscribe(journal.note)
    live = registry.begin("live", 0, "p-live", "f", ["1"])
    for n in range(6):
        job = registry.begin(f"done{n}", 0, f"p{n}", "f", ["1"])
        registry.reject(job, "x")
    await journal.close()
    journal, loaded = await store.open(bound, Registry().saved)
    await journal.close()
    assert [j.job_id for j in loaded.jobs] == ["live"] + [f"done{n}" for n in
                                                          range(6 - bound, 6)]
    assert loaded.last_seq == 7 and loaded.held == 7
    assert loaded.evicted_through == (7 - bound if bound < 6 else 0)
    assert live.seq == 1


@both_stores
async def test_a_webhook_owed_before_a_restart_is_delivered_after_it(
        start_cylindria, start_sims, aiohttp_server, store):
    cluster = await start_sims(1)
    hook, calls = await webhook_receiver(aiohttp_server, fail_first=1)
    # A long pause between tries: the delivery is still owed when the service stops.
    client = await start_cylindria(cluster, **store.settings,
                                   timing=with_timing(webhook_backoff=60))
    await put_job(client, "owed", workflows.quick(), headers={"X-Callback-Url": hook})
    await wait_until(lambda: webhook_state(client, "owed", "retrying"), what="a failed try")
    await client.close()
    assert len(calls) == 1

    client = await start_cylindria(cluster, **store.settings)
    body = await wait_until(lambda: webhook_state(client, "owed", "delivered"),
                            what="the delivery after the restart")
    assert body["webhook"]["attempts"] == 1 and len(calls) == 2
    assert ujson.loads(calls[-1][0])["job_id"] == "owed"


async def test_the_job_page_lists_the_attempts(start_cylindria):
    client = await start_cylindria()
    await put_job(client, "twice", workflows.fails_at_runtime())
    await wait_state(client, "twice", "failed")
    page = await (await client.get("/dashboard/job/twice")).text()
    assert 'data-section="attempts" hidden' in page
    assert (await client.post("/retryjob/twice/")).status == 202
    await wait_state(client, "twice", "failed")
    page = await (await client.get("/dashboard/job/twice")).text()
    assert 'data-section="attempts" hidden' not in page
    assert page.count('<tr class="attempt"') == 2
    state = await (await client.get("/dashboard/job/twice/state")).json()
    assert [(a["attempt"], a["state"]) for a in state["attempts"]] == [
        ("2", "failed"), ("1", "failed")]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(outputs=JSON_VALUES, other=JSON_VALUES)
def test_records_with_long_texts_are_written_as_json_writes_them(outputs, other):
    """Long strings are encoded a slice at a time (here, anything over 3 characters):
    the result reads back as the record, escapes, non-ASCII and all."""
    record = {"state": "completed", "outputs": outputs, "other": other}
    assert ujson.loads(encode_record(record, long_string=3)) == ujson.loads(ujson.dumps(record))


class Unwritable:
    """A database whose every write fails (as one that cannot be reached), noting when
    each was tried; `back()` makes them work again."""

    kind = "database"
    name = "unwritable"
    errors = (OSError,)
    commits_inline = False
    look_at = "the database server"
    clustered = False

    def __init__(self) -> None:
        self.tries: list[float] = []
        self.working = False

    def write(self, rows, workflows) -> None:
        self.tries.append(time.monotonic())
        if not self.working:
            raise OSError("connection refused\n\tis the server running?")

    def close(self) -> None:
        pass


async def test_writes_that_fail_are_tried_again_with_backoff_and_logged_once(caplog):
    database = Unwritable()
    registry = Registry()
    retry = 0.05
    journal = Journal(database, WriterThread(asyncio.get_running_loop()), registry.saved,
                      retry, inline=False)
    registry.subscribe(journal.note)
    try:
        with caplog.at_level(logging.WARNING, logger="cylindria.store.journal"):
            job = registry.begin("first", 0, "p1", "f", ["1"])
            with pytest.raises(StateUnavailable) as refused:
                await journal.durable(job)
            assert "\n" not in refused.value.message and "Retry later" in refused.value.message
            assert not journal.writable
            await wait_until(lambda: len(database.tries) >= 7, 5, "seven tries")
            gaps = [b - a for a, b in itertools.pairwise(list(database.tries))]
            # Each wait doubles, shortened by at most a fifth, up to eight times the first.
            for n, gap in enumerate(gaps[:5]):
                assert gap >= retry * 0.8 * min(2 ** n, 8), gaps
            assert gaps[5] < retry * 16 * 0.8, gaps
            database.working = True
            await wait_until(lambda: journal.writable, 2, "writes to work again")
            assert job.saved_version == job.version
        said = [r.getMessage() for r in caplog.records]
        assert len([m for m in said if "writing failed" in m]) == 1, said
        assert len([m for m in said if "writes work again;" in m]) == 1, said
    finally:
        await journal.close()
