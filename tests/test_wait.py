"""`?wait=`: a status or a submission that answers when the job finishes, bounded in
time and in requests waiting, freed when its client leaves, answered at shutdown."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import ujson

from cylindria.appkeys import WAITERS
from cylindria.config import ConfigError, load_settings

import workflows
from helpers import put_job, start_paused, wait_state, wait_until

# Every request here is bounded: nothing waits anywhere near this.
BOUND = 10.0


async def timed(request) -> tuple[float, aiohttp.ClientResponse, dict]:
    """The seconds `request` took to answer, the answer and its JSON body."""
    started = time.monotonic()
    async with asyncio.timeout(BOUND):
        resp = await request
        body = await resp.json()
    return time.monotonic() - started, resp, body


async def test_a_wait_answers_as_soon_as_the_job_finishes(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    await start_paused(client, cluster.sims[0], "soon", workflows.txt2img())
    waiting = asyncio.create_task(timed(client.get("/jobstatus/soon/", params={"wait": "60"})))
    waiters = client.app[WAITERS]
    await wait_until(lambda: waiters.count == 1, what="the request to wait")
    assert "cylindria_waiters 1.0" in await (await client.get("/metrics")).text()
    cluster.sims[0].resume()
    seconds, resp, body = await waiting
    assert resp.status == 200 and body["state"] == "completed", body
    assert body["outputs"], body
    assert seconds < BOUND  # the 60 s were not waited out
    assert waiters.count == 0


async def test_a_wait_ends_after_its_seconds_with_the_job_as_it_stands(start_cylindria,
                                                                       start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    await start_paused(client, cluster.sims[0], "slow", workflows.txt2img())
    seconds, resp, body = await timed(client.get("/jobstatus/slow/", params={"wait": "1"}))
    assert resp.status == 200 and body["state"] == "running", body
    assert seconds >= 0.9
    assert client.app[WAITERS].count == 0
    cluster.sims[0].resume()


async def test_a_finished_or_unknown_job_answers_at_once(start_cylindria):
    client = await start_cylindria()
    assert (await put_job(client, "done", workflows.quick()))[0] == 202
    await wait_state(client, "done", "completed")
    seconds, resp, body = await timed(client.get("/jobstatus/done/", params={"wait": "60"}))
    assert resp.status == 200 and body["state"] == "completed" and seconds < BOUND
    _, resp, body = await timed(client.get("/jobstatus/nobody/", params={"wait": "60"}))
    assert resp.status == 404 and body["error"]["code"] == "job_not_found"
    # Empty is no wait at all, as for the other query values.
    _, resp, body = await timed(client.get("/jobstatus/done/", params={"wait": ""}))
    assert resp.status == 200 and body["state"] == "completed"


async def test_startjob_with_wait_answers_with_the_finished_job(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    workflow = ujson.dumps(workflows.quick())
    seconds, resp, body = await timed(client.put(
        "/startjob/whole/", params={"wait": "60"}, data=workflow))
    assert resp.status == 200, body
    # The job's status, as GET /jobstatus/ answers it.
    assert body["state"] == "completed" and body["outputs"] and "accepted" not in body
    assert seconds < BOUND
    # Sent again: the job is finished already, so its status at once.
    _, resp, body = await timed(client.put(
        "/startjob/whole/", params={"wait": "60"}, data=workflow))
    assert resp.status == 200 and body["state"] == "completed", body
    # Not finished within the wait: the usual reply, with the job's state then.
    cluster.sims[0].pause(at="tick")
    _, resp, body = await timed(client.put(
        "/startjob/paused/", params={"wait": "1"}, data=ujson.dumps(workflows.txt2img())))
    assert resp.status == 202 and body["accepted"] is True, body
    assert body["state"] in ("queued", "running"), body
    cluster.sims[0].resume()
    # A refusal answers at once, as without ?wait=.
    _, resp, body = await timed(client.put(
        "/startjob/refused/", params={"wait": "60"}, data=ujson.dumps(workflows.below_min())))
    assert resp.status == 422 and body["accepted"] is False, body


async def test_retryjob_with_wait_answers_with_the_new_attempt_finished(start_cylindria):
    client = await start_cylindria()
    assert (await put_job(client, "again", workflows.fails_at_runtime()))[0] == 202
    await wait_state(client, "again", "failed")
    _, resp, body = await timed(client.post("/retryjob/again/", params={"wait": "60"}))
    assert resp.status == 200, body
    assert body["state"] == "failed" and body["attempt"] == 2, body


@pytest.mark.parametrize("value", ["abc", "-1", "0", "NaN", "nan", "inf", "Infinity", "61",
                                   "1.5", "1e1", "05", "+5", " 5", "9" * 40, "١", "５"])
async def test_a_wait_that_is_no_whole_number_of_seconds_is_refused(start_cylindria, value):
    client = await start_cylindria()
    resp = await client.get("/jobstatus/any/", params={"wait": value})
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "bad_request", body
    assert "wait must be a whole number of seconds from 1 to 60" in body["error"]["message"]
    resp = await client.put("/startjob/any/", params={"wait": value},
                            data=ujson.dumps(workflows.quick()))
    body = await resp.json()
    assert resp.status == 400 and "wait must be" in body["error"]["message"], body
    assert body["accepted"] is False
    assert (await client.get("/jobstatus/any/")).status == 404  # nothing was submitted


# -- over real sockets: limits, clients that leave, shutdown ---------------------------

async def held_job(served) -> None:
    """A job that stays queued: held for GpuId=auto while the only GPU is drained."""
    async with aiohttp.ClientSession(served.url) as session:
        assert (await session.post("/gpus/0/drain")).status == 200
        async with session.put("/startjob/held/", params={"GpuId": "auto"},
                               data=ujson.dumps(workflows.quick())) as resp:
            assert resp.status == 202 and (await resp.json())["held"] is True


async def open_wait(port: int, source: str = "127.0.0.1", seconds: int = 60
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A GET /jobstatus/held/?wait= sent on a connection of its own from `source`
    (another loopback address stands for another machine)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(f"GET /jobstatus/held/?wait={seconds} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 "Connection: close\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def answer(opened: tuple[asyncio.StreamReader, asyncio.StreamWriter]
                 ) -> tuple[int, dict[str, str], dict]:
    """The answer on a connection `open_wait` opened, which is then closed."""
    reader, writer = opened
    try:
        async with asyncio.timeout(BOUND):
            raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, ujson.loads(body)


async def test_waiters_are_bounded_in_all_and_per_client_address(serve):
    served = await serve(max_waiters=3, max_waiters_per_address=2)
    await held_job(served)
    waiters = served.app[WAITERS]
    first = [await open_wait(served.port) for _ in range(2)]
    await wait_until(lambda: waiters.count == 2, what="two requests to wait")
    status, headers, body = await answer(await open_wait(served.port))
    assert status == 429 and body["error"]["code"] == "too_many_waiters", body
    assert body["error"]["per"] == "address" and headers["Retry-After"] == "5"
    assert "CYLINDRIA_MAX_WAITERS_PER_ADDRESS" in body["error"]["message"]
    assert "without ?wait=" in body["error"]["message"]
    other = await open_wait(served.port, "127.0.0.2")
    await wait_until(lambda: waiters.count == 3, what="a third request to wait")
    status, headers, body = await answer(await open_wait(served.port, "127.0.0.3"))
    assert status == 429 and body["error"]["per"] == "server", body
    assert "CYLINDRIA_MAX_WAITERS" in body["error"]["message"]
    async with aiohttp.ClientSession(served.url) as session:
        # A submission that could not wait is refused before anything is submitted.
        async with session.put("/startjob/later/", params={"wait": "5"},
                               data=ujson.dumps(workflows.quick())) as resp:
            body = await resp.json()
            assert resp.status == 429 and body["error"]["code"] == "too_many_waiters", body
            assert body["accepted"] is False and resp.headers["Retry-After"] == "5"
        assert (await session.get("/jobstatus/later/")).status == 404
        # Polling without ?wait= is never refused.
        assert (await session.get("/jobstatus/held/")).status == 200
    for _, writer in [*first, other]:
        writer.close()
    await wait_until(lambda: waiters.count == 0, timeout=2.0, what="the slots to free")


async def test_a_client_that_leaves_frees_its_slot_at_once(serve):
    served = await serve()
    await held_job(served)
    waiters = served.app[WAITERS]
    _, writer = await open_wait(served.port, seconds=60)
    await wait_until(lambda: waiters.count == 1, what="the request to wait")
    writer.close()
    # Far sooner than the 60 s of its wait: the lost connection frees the slot.
    await wait_until(lambda: waiters.count == 0, timeout=2.0, what="the slot to free")
    # And the connection's next waiter counts afresh.
    status, _, body = await answer(await open_wait(served.port, seconds=1))
    assert status == 200 and body["state"] == "queued", body


async def test_shutdown_answers_every_waiter_with_the_job_as_it_stands(serve):
    served = await serve()
    await held_job(served)
    waiters = served.app[WAITERS]
    opened = [await open_wait(served.port, seconds=60) for _ in range(3)]
    await wait_until(lambda: waiters.count == 3, what="three requests to wait")
    started = time.monotonic()
    async with asyncio.timeout(BOUND):
        stopping = asyncio.create_task(served.stop())
        answers = [await answer(pair) for pair in opened]
        await stopping
    assert time.monotonic() - started < BOUND
    for status, _, body in answers:
        assert status == 200 and body["state"] == "queued", body


def test_the_wait_settings_come_from_the_environment():
    s = load_settings({}, {})
    assert (s.max_waiters, s.max_waiters_per_address, s.max_wait) == (1000, 100, 60)
    s = load_settings({}, {"CYLINDRIA_MAX_WAITERS": "5", "CYLINDRIA_MAX_WAITERS_PER_ADDRESS": "2",
                           "CYLINDRIA_MAX_WAIT": "300"})
    assert (s.max_waiters, s.max_waiters_per_address, s.max_wait) == (5, 2, 300)
    for name, bad in [("CYLINDRIA_MAX_WAITERS", "0"), ("CYLINDRIA_MAX_WAITERS_PER_ADDRESS", "0"),
                      ("CYLINDRIA_MAX_WAIT", "0"), ("CYLINDRIA_MAX_WAIT", "3601")]:
        with pytest.raises(ConfigError, match=name):
            load_settings({}, {name: bad})
    with pytest.raises(ConfigError, match="CYLINDRIA_MAX_WAIT must be a whole number"):
        load_settings({}, {"CYLINDRIA_MAX_WAIT": "2.5"})
