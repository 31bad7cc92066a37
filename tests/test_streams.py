"""Event streams whose clients leave, streams at shutdown, and the hub's byte bounds."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ujson
from aiohttp import ClientSession

from cylindria.appkeys import EVENTS, REGISTRY
from cylindria.web.eventhub import CLIENT_QUEUE, CLIENT_QUEUE_BYTES, REPLAY_BYTES
from cylindria.web.render import TEXT_INLINE_BYTES

from helpers import wait_until, with_timing


def records(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def loud(caplog, level: int = logging.INFO) -> list[str]:
    """What the service and aiohttp logged at `level` or above."""
    return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= level and r.name.startswith(("cylindria", "aiohttp"))]


async def open_stream(http: ClientSession, url: str, **kwargs: Any):
    resp = await http.get(f"{url}/events/", **kwargs)
    assert resp.status == 200, await resp.text()
    # The first line is written once the stream is subscribed.
    assert await resp.content.readline() == b"retry: 2000\n"
    return resp


# -- clients that leave -----------------------------------------------------------------

async def raw_stream(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream opened on a plain socket, read up to its first line, so that closing
    it can be awaited until the socket is closed."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /events/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"retry: 2000" in await reader.readuntil(b"retry: 2000")
    return reader, writer


async def test_a_hundred_clients_leave_and_a_new_stream_is_accepted_at_once(serve, caplog):
    caplog.set_level(logging.DEBUG)
    # A short keep-alive: a stream the service still believed open would soon write to
    # a closed connection.
    # Every stream comes from this test's one address, which may hold them all here.
    served = await serve(timing=with_timing(sse_keepalive=0.2),
                         max_event_streams_per_address=100)
    hub = served.app[EVENTS]
    caplog.clear()
    streams = [await raw_stream(served.url) for _ in range(100)]
    assert hub.streams == 100
    async with ClientSession() as http:
        over = await http.get(f"{served.url}/events/")
        assert over.status == 429
        over.release()
        for _, writer in streams:
            writer.close()
            await writer.wait_closed()
        # The clients are gone; the streams' next keep-alive is still to come.
        fresh = await http.get(f"{served.url}/events/")
        assert fresh.status == 200
        fresh.close()
        await wait_until(lambda: len(records(caplog, "a client left")) >= 101,
                         what="every stream to notice its client left")
    assert hub.streams == 0
    assert loud(caplog, logging.ERROR) == []
    assert records(caplog, "dropped a client") == []


async def test_a_client_leaving_is_a_debug_line_and_frees_its_stream(serve, caplog):
    caplog.set_level(logging.DEBUG)
    # The default keep-alive (15 s): the stream must notice without writing.
    served = await serve()
    hub = served.app[EVENTS]
    caplog.clear()
    async with ClientSession() as http:
        resp = await open_stream(http, served.url)
        resp.close()
        # Waits on the log only: asking the hub to count would end the stream for it.
        await wait_until(lambda: records(caplog, "a client left"), timeout=5,
                         what="the stream to notice its client left")
    [line] = records(caplog, "a client left")
    assert line.levelno == logging.DEBUG and line.name == "cylindria.web.events"
    assert hub.streams == 0
    assert loud(caplog) == []


async def test_stopping_with_open_streams_ends_them_without_slow_client_lines(serve, caplog):
    caplog.set_level(logging.DEBUG)
    served = await serve()
    caplog.clear()
    async with ClientSession() as http:
        streams = [await open_stream(http, served.url) for _ in range(3)]
        async with asyncio.timeout(10):
            await served.stop()
            for resp in streams:
                # Each stream is ended properly: the rest of it reads to its end.
                assert b"job" not in await resp.content.read()
    assert records(caplog, "dropped a client") == []
    assert [line for line in loud(caplog) if "events" in line] == []


# -- byte bounds ------------------------------------------------------------------------

def long_texts(count: int) -> dict[str, list[str]]:
    """An output whose status body is about `count` times TEXT_INLINE_BYTES long: each
    text is cut to that in status bodies, however long it is."""
    return {"text": ["x" * (TEXT_INLINE_BYTES + 1)] * count}


BIG = CLIENT_QUEUE_BYTES * 5 // 8 // TEXT_INLINE_BYTES  # a body of ~5/8 of the limit


def big_job(registry, job_id: str, outputs: int = 1):
    """A job with `outputs` big outputs, each one change of the job."""
    job = registry.begin(job_id, 0, f"prompt-{job_id}", "fp",
                         [str(n) for n in range(outputs)])
    for node in range(outputs):
        registry.on_executed(f"prompt-{job_id}", str(node), long_texts(BIG))
    return job


# The jobs below are made up: a long grace keeps the poller from finding them lost.
STILL = with_timing(lost_grace=600)


async def test_a_stream_too_many_bytes_behind_is_dropped(start_cylindria, caplog):
    caplog.set_level(logging.INFO)
    client = await start_cylindria(timing=STILL)
    hub, registry = client.app[EVENTS], client.app[REGISTRY]
    behind, _, _ = hub.subscribe(None, None)
    keeping_up, _, _ = hub.subscribe("big", None)
    job = registry.begin("big", 0, "prompt-big", "fp", ["1", "2"])
    assert (await keeping_up.get())[1] == "big"
    registry.on_executed("prompt-big", "1", long_texts(BIG))
    first = await keeping_up.get()
    assert len(first[2]) > CLIENT_QUEUE_BYTES // 2
    assert not behind.dropped
    registry.on_executed("prompt-big", "2", long_texts(BIG))
    # Three events, far fewer than CLIENT_QUEUE, but past the byte limit.
    assert 3 < CLIENT_QUEUE and behind.dropped
    assert behind.queue.qsize() == 1 and behind.queue.get_nowait() is None
    assert behind.queued_bytes == 0
    # A single event bigger than the limit still reaches a stream that keeps up.
    second = await keeping_up.get()
    assert len(second[2]) > CLIENT_QUEUE_BYTES and not keeping_up.dropped
    assert job.job_id == "big" and hub.streams == 1
    [line] = records(caplog, "dropped a client")
    assert f"{CLIENT_QUEUE_BYTES // 2**20} MiB behind" in line.getMessage()


async def test_a_stream_dropped_for_bytes_ends_for_its_client(start_cylindria):
    client = await start_cylindria(timing=STILL)
    registry = client.app[REGISTRY]
    resp = await client.get("/events/", params={"job_id": "huge"})
    assert await resp.content.readline() == b"retry: 2000\n"
    await wait_until(lambda: client.app[EVENTS].streams == 1, what="the stream")
    # Published at once, with no chance for the stream to write in between.
    big_job(registry, "huge", outputs=2)
    async with asyncio.timeout(10):
        rest = await resp.content.read()
    # The backlog went with the stream: the client gets none of it.
    assert rest.strip() == b""
    assert client.app[EVENTS].streams == 0


async def read_until_quiet(resp) -> list[tuple[str, dict]]:
    """(event, data) of each event until the first keep-alive comment."""
    events: list[tuple[str, dict]] = []
    frame: dict[str, str] = {}
    async with asyncio.timeout(10):
        while True:
            line = await resp.content.readline(max_line_length=64 * 2**20)
            line = line.decode().rstrip("\n")
            if line.startswith(":"):
                return events
            if line:
                key, _, value = line.partition(": ")
                frame[key] = value
            elif "data" in frame:
                events.append((frame["event"], ujson.loads(frame["data"])))
                frame = {}


async def test_a_replay_past_its_byte_budget_is_a_resync(start_cylindria):
    client = await start_cylindria(timing=with_timing(lost_grace=600, sse_keepalive=0.2))
    hub, registry = client.app[EVENTS], client.app[REGISTRY]
    start = hub.last_id
    jobs = REPLAY_BYTES // (CLIENT_QUEUE_BYTES * 5 // 8) + 1
    for n in range(jobs):
        big_job(registry, f"replayed-{n}")
    middle = hub.last_id
    big_job(registry, "last")
    # Two jobs changed since `middle`: within the budget, each replayed.
    resp = await client.get("/events/", headers={"Last-Event-ID": str(middle - 1)})
    events = await read_until_quiet(resp)
    assert [(kind, body["job_id"]) for kind, body in events] == [
        ("job", f"replayed-{jobs - 1}"), ("job", "last")]
    resp.close()
    # All of them: past the budget, so the client is told to re-read instead.
    resp = await client.get("/events/", headers={"Last-Event-ID": str(start)})
    events = await read_until_quiet(resp)
    assert [kind for kind, _ in events] == ["resync"]
    assert "GET /jobs/" in events[0][1]["detail"]
    resp.close()
