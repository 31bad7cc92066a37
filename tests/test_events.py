"""Listing jobs, the server-sent event stream, and webhooks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import ujson

from cylindria.core.registry import Registry
from cylindria.web.eventhub import CLIENT_QUEUE, EventHub

import workflows
from helpers import (
    put_job,
    wait_state,
    wait_until,
    webhook_receiver,
    webhook_state,
    with_timing,
)

# -- GET /jobs/ ------------------------------------------------------------------------------


async def test_jobs_are_listed_newest_first_in_pages(start_cylindria, start_sims):
    client = await start_cylindria(await start_sims(2))
    for n in range(5):
        await put_job(client, f"list-{n}", workflows.quick(), gpu=n % 2)
    await put_job(client, "list-bad", workflows.below_min())
    for n in range(5):
        await wait_state(client, f"list-{n}", "completed")
    page = await (await client.get("/jobs/", params={"limit": "2"})).json()
    assert [j["job_id"] for j in page["jobs"]] == ["list-bad", "list-4"]
    page2 = await (await client.get("/jobs/", params={
        "limit": "2", "before": str(page["next_before"])})).json()
    assert [j["job_id"] for j in page2["jobs"]] == ["list-3", "list-2"]
    filtered = await (await client.get("/jobs/", params={"state": "completed",
                                                         "gpu": "1"})).json()
    assert [j["job_id"] for j in filtered["jobs"]] == ["list-3", "list-1"]
    assert filtered["next_before"] is None
    rejected = await (await client.get("/jobs/", params={"state": "rejected"})).json()
    assert [j["job_id"] for j in rejected["jobs"]] == ["list-bad"]


async def test_jobs_listing_rejects_bad_parameters(start_cylindria):
    client = await start_cylindria()
    for params in ({"limit": "0"}, {"limit": "501"}, {"limit": "x"}, {"state": "done"},
                   {"gpu": "5"}, {"before": "-1"}):
        resp = await client.get("/jobs/", params=params)
        assert resp.status == 400, params
        assert (await resp.json())["error"]["message"]


# -- GET /events/ -----------------------------------------------------------------------------


async def read_events(resp, until, timeout=5.0):
    """Parse SSE frames from a streaming response until `until(events)` is true."""
    events: list[dict] = []
    comments: list[str] = []
    frame: dict = {}

    async def pump():
        while not until(events, comments):
            line = (await resp.content.readline()).decode()
            if line == "":
                return
            line = line.rstrip("\n")
            if line.startswith(":"):
                comments.append(line)
            elif line == "":
                if "data" in frame:
                    events.append(frame.copy())
                frame.clear()
            else:
                key, _, value = line.partition(": ")
                frame[key] = value
    async with asyncio.timeout(timeout):
        await pump()
    return events, comments


def job_events(events, job_id=None):
    out = []
    for e in events:
        if e.get("event") == "job":
            body = ujson.loads(e["data"])
            if job_id is None or body["job_id"] == job_id:
                out.append((int(e["id"]), body))
    return out


def finished(job_id):
    return lambda events, _: any(b["state"] == "completed" for _, b in job_events(events, job_id))


async def test_event_stream_carries_jobstatus_json(start_cylindria):
    client = await start_cylindria()
    resp = await client.get("/events/")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    await put_job(client, "streamed", workflows.txt2img(steps=2))
    events, _ = await read_events(resp, finished("streamed"))
    mine = job_events(events, "streamed")
    ids = [i for i, _ in mine]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    states = [b["state"] for _, b in mine]
    assert states[0] == "queued" and states[-1] == "completed" and "running" in states
    final = mine[-1][1]
    status = await (await client.get("/jobstatus/streamed/")).json()
    assert final == status
    resp.close()


async def test_event_stream_filters_by_job(start_cylindria):
    client = await start_cylindria()
    resp = await client.get("/events/", params={"job_id": "wanted"})
    await put_job(client, "other", workflows.quick())
    await wait_state(client, "other", "completed")
    await put_job(client, "wanted", workflows.quick())
    events, _ = await read_events(resp, finished("wanted"))
    assert {b["job_id"] for _, b in job_events(events)} == {"wanted"}
    resp.close()


async def test_resume_after_a_dropped_connection(start_cylindria):
    client = await start_cylindria()
    resp = await client.get("/events/")
    await put_job(client, "first", workflows.quick())
    events, _ = await read_events(resp, finished("first"))
    last_id = job_events(events)[-1][0]
    resp.close()  # the connection drops
    await put_job(client, "missed", workflows.quick())
    await wait_state(client, "missed", "completed")
    resp = await client.get("/events/", headers={"Last-Event-ID": str(last_id)})
    events, _ = await read_events(resp, finished("missed"))
    replayed = job_events(events)
    # Each job that changed while the client was away, once, as it is now.
    assert [(b["job_id"], b["state"]) for _, b in replayed] == [("missed", "completed")]
    assert replayed[0][0] > last_id
    resp.close()


async def test_resume_past_the_buffer_asks_for_a_resync(start_cylindria):
    client = await start_cylindria(event_buffer=5)
    for n in range(3):
        await put_job(client, f"old-{n}", workflows.quick())
        await wait_state(client, f"old-{n}", "completed")
    resp = await client.get("/events/", headers={"Last-Event-ID": "1"})
    events, _ = await read_events(resp, lambda ev, _: any(e.get("event") == "resync"
                                                          for e in ev))
    assert events[0]["event"] == "resync"
    resp.close()


async def test_keep_alive_comments(start_cylindria):
    client = await start_cylindria(timing=with_timing(sse_keepalive=0.05))
    resp = await client.get("/events/")
    _, comments = await read_events(resp, lambda _, c: len(c) >= 2)
    assert comments[:2] == [": keep-alive", ": keep-alive"]
    resp.close()


async def test_stream_cap_is_429(start_cylindria):
    client = await start_cylindria(max_event_streams=2)
    open_streams = [await client.get("/events/") for _ in range(2)]
    await wait_until(lambda: _streams(client) == 2, what="streams registered")
    resp = await client.get("/events/")
    assert resp.status == 429 and resp.headers["Retry-After"] == "5"
    assert (await resp.json())["error"]["code"] == "too_many_streams"
    for stream in open_streams:
        stream.close()
    await wait_until(lambda: _streams(client) == 0, what="streams released")
    assert (await client.get("/events/", params={"job_id": "x"})).status == 200


def forwarded_for(address):
    return {"X-Forwarded-For": address}


async def test_one_client_address_cannot_take_every_stream(start_cylindria):
    client = await start_cylindria(max_event_streams=4, max_event_streams_per_address=2,
                                   trusted_proxies=("127.0.0.1", "::1"))
    greedy = [await client.get("/events/", headers=forwarded_for("198.51.100.7"))
              for _ in range(2)]
    assert [r.status for r in greedy] == [200, 200]
    await wait_until(lambda: _streams(client) == 2, what="streams registered")
    resp = await client.get("/events/", params={"job_id": "x"},
                            headers=forwarded_for("198.51.100.7"))
    assert resp.status == 429 and resp.headers["Retry-After"] == "5"
    error = (await resp.json())["error"]
    assert error["code"] == "too_many_streams" and error["per"] == "address"
    assert "198.51.100.7" in error["message"]
    assert "CYLINDRIA_MAX_EVENT_STREAMS_PER_ADDRESS" in error["message"]
    # Another client is served meanwhile.
    other = await client.get("/events/", headers=forwarded_for("198.51.100.8"))
    assert other.status == 200
    # A slot of the greedy client's is its own again once it closes one.
    greedy[0].close()
    await wait_until(lambda: _streams(client) == 2, what="a stream released")
    again = await client.get("/events/", headers=forwarded_for("198.51.100.7"))
    assert again.status == 200
    for stream in (greedy[1], other, again):
        stream.close()


async def test_a_forwarded_header_from_an_untrusted_peer_names_no_other_client(
        start_cylindria):
    client = await start_cylindria(max_event_streams=4, max_event_streams_per_address=1)
    first = await client.get("/events/", headers=forwarded_for("198.51.100.7"))
    assert first.status == 200
    await wait_until(lambda: _streams(client) == 1, what="stream registered")
    # Both come from this test's address; the header is anyone's to write.
    resp = await client.get("/events/", headers=forwarded_for("198.51.100.8"))
    assert resp.status == 429
    assert "127.0.0.1" in (await resp.json())["error"]["message"]
    first.close()


def _streams(client):
    from cylindria.appkeys import EVENTS
    return client.app[EVENTS].streams


async def test_slow_client_is_dropped_without_holding_the_hub():
    registry = Registry()
    hub = EventHub(100, lambda job: {"job_id": job.job_id, "state": job.state.value})
    registry.subscribe(hub.publish)
    slow, _, _ = hub.subscribe(None, None)
    fast, _, _ = hub.subscribe("j0", None)
    for n in range(CLIENT_QUEUE + 5):
        registry.begin(f"j{n}", 0, f"p{n}", "f", ["1"])
    assert slow.dropped and hub.streams == 1
    assert slow.queue.qsize() == 1 and slow.queue.get_nowait() is None
    assert not fast.dropped and fast.queue.qsize() == 1


# -- webhooks ------------------------------------------------------------------------------


async def test_webhook_is_signed_and_retried(start_cylindria, start_sims, aiohttp_server):
    cluster = await start_sims(1)
    url, calls = await webhook_receiver(aiohttp_server, fail_first=2)
    client = await start_cylindria(cluster, webhook_secret="hush",
                                   timing=with_timing(webhook_backoff=0.01))
    status, _ = await put_job(client, "hooked", workflows.quick(),
                              headers={"X-Callback-Url": url})
    assert status == 202
    await wait_state(client, "hooked", "completed")
    body = await wait_until(lambda: webhook_state(client, "hooked", "delivered"),
                            what="delivery")
    assert body["webhook"]["attempts"] == 3 and len(calls) == 3
    payload, headers = calls[-1]
    expected = "sha256=" + hmac.new(b"hush", payload, hashlib.sha256).hexdigest()
    assert headers["X-Cylindria-Signature"] == expected
    sent = ujson.loads(payload)
    assert sent["job_id"] == "hooked" and sent["state"] == "completed"
    assert sent["outputs"][0]["url"] == "/joboutput/hooked/0"


async def test_failing_webhook_gives_up_and_never_delays_others(start_cylindria, start_sims,
                                                                aiohttp_server):
    cluster = await start_sims(1)
    bad_url, bad_calls = await webhook_receiver(aiohttp_server, fail_first=100)
    good_url, good_calls = await webhook_receiver(aiohttp_server, fail_first=0)
    client = await start_cylindria(cluster, timing=with_timing(webhook_backoff=0.2))
    await put_job(client, "doomed", workflows.quick(), headers={"X-Callback-Url": bad_url})
    await wait_state(client, "doomed", "completed")
    await put_job(client, "fine", workflows.quick(), headers={"X-Callback-Url": good_url})
    await wait_until(lambda: webhook_state(client, "fine", "delivered"), what="good hook")
    # The good one arrived while the bad one was still retrying.
    assert len(bad_calls) < 4
    body = await wait_until(lambda: webhook_state(client, "doomed", "failed"), timeout=10,
                            what="the bad hook to give up")
    assert body["webhook"]["attempts"] == 4 and len(bad_calls) == 4
    assert body["webhook"]["last_error"] == "HTTP 500"
    assert "X-Cylindria-Signature" not in bad_calls[0][1]
    assert len(good_calls) == 1


async def test_bad_callback_url_is_400(start_cylindria):
    client = await start_cylindria()
    status, body = await put_job(client, "cb", workflows.quick(),
                                 headers={"X-Callback-Url": "ftp://127.0.0.1/x"})
    assert status == 400 and "X-Callback-Url" in body["detail"]
