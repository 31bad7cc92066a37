"""Guessing keys, slow and idle connections, and the headers every answer carries."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import ClientSession, TCPConnector

from cylindria.appkeys import SIGNINS
from cylindria.web.signins import COOKIE
from cylindria.web.throttle import ATTEMPTS, WINDOW_SECONDS, Throttle

import workflows
from helpers import put_job, wait_state, with_timing

KEY = "s3cret"
WRONG = {"X-API-Key": "not-the-key"}
RIGHT = {"X-API-Key": KEY}


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def keyed(start_cylindria, **settings: Any):
    """Cylindria with an API key, its throttle on a hand-moved clock."""
    client = await start_cylindria(api_key=KEY, **settings)
    clock = Clock()
    client.app[SIGNINS].throttle.clock = clock
    return client, clock


async def sign_in(client, key: str):
    return await client.post("/dashboard/login", data={"key": key, "next": "/"},
                             allow_redirects=False)


def throttle_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "cylindria.web.throttle" and r.levelno >= logging.INFO]


# -- guessing keys -------------------------------------------------------------------

async def test_wrong_api_keys_past_the_limit_are_429_until_the_window_passes(
        start_cylindria):
    client, clock = await keyed(start_cylindria)
    for _ in range(ATTEMPTS):
        assert (await client.get("/jobs/", headers=WRONG)).status == 401
    resp = await client.get("/jobs/", headers=WRONG)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == str(int(WINDOW_SECONDS))
    error = (await resp.json())["error"]
    assert error["code"] == "too_many_attempts"
    assert f"wait {int(WINDOW_SECONDS)} s" in error["message"]
    assert "X-API-Key" in error["message"]
    # The right key waits too: were it let through, a guesser would learn it had won.
    assert (await client.get("/jobs/", headers=RIGHT)).status == 429
    clock.now += WINDOW_SECONDS / 2
    resp = await client.get("/jobs/", headers=WRONG)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == str(int(WINDOW_SECONDS / 2))
    clock.now += WINDOW_SECONDS / 2
    assert (await client.get("/jobs/", headers=RIGHT)).status == 200
    # No key at all is no guess: it is never counted nor held back.
    assert (await client.get("/jobs/")).status == 401


async def test_the_sign_in_form_is_limited_and_says_so(start_cylindria):
    client, clock = await keyed(start_cylindria)
    # Both ways of giving a key count together: they guess the same key.
    for _ in range(ATTEMPTS // 2):
        assert (await client.get("/jobs/", headers=WRONG)).status == 401
    for _ in range(ATTEMPTS - ATTEMPTS // 2):
        assert (await sign_in(client, "not-the-key")).status == 401
    resp = await sign_in(client, "not-the-key")
    assert resp.status == 429
    assert resp.headers["Retry-After"] == str(int(WINDOW_SECONDS))
    page = await resp.text()
    assert "Too many wrong keys from this address" in page and 'name="key"' in page
    resp = await sign_in(client, KEY)
    assert resp.status == 429 and COOKIE not in resp.cookies
    clock.now += WINDOW_SECONDS
    resp = await sign_in(client, KEY)
    assert resp.status == 303 and COOKIE in resp.cookies


async def test_one_address_guessing_never_blocks_another(start_cylindria):
    client, _ = await keyed(start_cylindria)
    # The same loopback service, reached from another loopback address.
    other = TCPConnector(local_addr=("127.0.0.2", 0))
    async with ClientSession(connector=other) as guesser:
        for _ in range(ATTEMPTS):
            async with guesser.get(client.make_url("/jobs/"), headers=WRONG) as resp:
                assert resp.status == 401
        async with guesser.get(client.make_url("/jobs/"), headers=RIGHT) as resp:
            assert resp.status == 429
    assert (await client.get("/jobs/", headers=RIGHT)).status == 200
    assert (await client.get("/jobs/", headers=WRONG)).status == 401
    assert (await sign_in(client, KEY)).status == 303


async def test_guessing_is_logged_once_per_address_per_window(start_cylindria, caplog):
    caplog.set_level(logging.DEBUG)
    client, clock = await keyed(start_cylindria)
    for _ in range(3 * ATTEMPTS):
        await client.get("/jobs/", headers=WRONG)
    for _ in range(ATTEMPTS):
        await sign_in(client, "not-the-key")
    first, held = throttle_lines(caplog)
    assert first == "a wrong key from 127.0.0.1 (X-API-Key header)"
    assert held.startswith(f"{ATTEMPTS} wrong keys from 127.0.0.1 within")
    # Each attempt is still there for whoever runs at DEBUG.
    assert len([r for r in caplog.records if r.name == "cylindria.web.throttle"]) == ATTEMPTS
    caplog.clear()
    clock.now += WINDOW_SECONDS
    for _ in range(2 * ATTEMPTS):
        await client.get("/jobs/", headers=WRONG)
    assert len(throttle_lines(caplog)) == 2


def test_the_throttle_forgets_the_least_recent_address_first():
    clock = Clock()
    throttle = Throttle(limit=2, window=10, capacity=3, clock=clock)
    for address in ("a", "b", "c", "a", "d"):
        throttle.fail(address, "test")
    # "b" failed least recently ("a" again after it), so it went when "d" came.
    assert len(throttle) == 3
    assert throttle.wait("a") == 10 and throttle.wait("b") == 0
    throttle.fail("b", "test")
    assert throttle.wait("b") == 0 and len(throttle) == 3
    clock.now += 4
    assert throttle.wait("a") == 6 and throttle.retry_after("a") == 6
    clock.now += 6
    assert throttle.wait("a") == 0


# -- slow and idle connections --------------------------------------------------------

async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Seconds until the server closed the connection; fails past `seconds`."""
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        while await reader.read(65536):
            pass
    return time.monotonic() - started


async def test_connections_without_a_complete_head_are_closed(serve):
    # An idle timeout far longer than the test: only the head timeout can close these.
    port = (await serve(timing=with_timing(head_timeout=0.3, keepalive_timeout=60))).port
    silent, half = [], []
    for _ in range(20):
        silent.append(await asyncio.open_connection("127.0.0.1", port))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /serverstatus HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        half.append((reader, writer))
    # A complete request on a fresh connection is answered as ever.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(10):
        answer = await reader.read()
    assert answer.startswith(b"HTTP/1.1 ")
    writer.close()
    for reader, writer in silent + half:
        assert await closed_within(reader, 10) >= 0
        writer.close()
        await writer.wait_closed()


async def test_an_idle_kept_alive_connection_is_closed(serve):
    port = (await serve(timing=with_timing(head_timeout=60, keepalive_timeout=0.3))).port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /serverstatus HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in head
    await closed_within(reader, 10)
    writer.close()
    await writer.wait_closed()


async def test_a_long_answer_outlives_the_head_timeout(serve):
    served = await serve(timing=with_timing(head_timeout=0.2, keepalive_timeout=0.2,
                                             sse_keepalive=0.1))
    port = served.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /events/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    started = time.monotonic()
    async with asyncio.timeout(10):
        # Keep-alive comments go on arriving well past both timeouts.
        while time.monotonic() - started < 1.0:
            assert await reader.readuntil(b"\n\n")
    writer.close()
    await writer.wait_closed()


# -- headers ----------------------------------------------------------------------------

def assert_not_stored(resp) -> None:
    assert resp.headers["Cache-Control"] == "no-store", (resp.url, resp.headers)
    assert resp.headers["X-Content-Type-Options"] == "nosniff", (resp.url, resp.headers)


async def test_json_answers_are_never_stored_nor_sniffed(start_cylindria):
    client, _ = await keyed(start_cylindria)
    for method, path, headers, status in (
            ("GET", "/serverstatus", RIGHT, 200), ("GET", "/jobs/", RIGHT, 200),
            ("GET", "/jobstatus/nobody/", RIGHT, 404), ("GET", "/no/such/thing", RIGHT, 404),
            ("GET", "/jobs/", {}, 401), ("DELETE", "/serverstatus", RIGHT, 405),
            ("PUT", "/startjob/bad/", RIGHT, 400)):
        resp = await client.request(method, path, headers=headers, data=b"{")
        assert resp.status == status, (method, path, await resp.text())
        assert resp.content_type == "application/json"
        assert_not_stored(resp)
    status, _ = await put_job(client, "headers", workflows.quick(), headers=RIGHT)
    assert status == 202
    resp = await client.get("/jobstatus/headers/", headers=RIGHT)
    assert_not_stored(resp)
    for _ in range(ATTEMPTS + 1):
        resp = await client.get("/jobs/", headers=WRONG)
    assert resp.status == 429
    assert_not_stored(resp)


async def test_a_polled_status_carries_the_headers_and_an_unread_body_closes(serve):
    """The quickest answer (a job in memory, no query) is made with its headers: on a
    kept-alive connection as any JSON answer, and closing one whose body it left."""
    served = await serve()
    async with ClientSession() as session:
        async with session.put(f"{served.url}/startjob/polled/", params={"GpuId": "0"},
                               json=workflows.quick()) as resp:
            assert resp.status == 202, await resp.text()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        heads = []
        for extra in (b"", b"?wait=", b""):
            writer.write(b"GET /jobstatus/polled/" + extra + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                heads.append(await reader.readuntil(b"\r\n\r\n"))
                length = int(heads[-1].split(b"Content-Length: ")[1].split(b"\r\n")[0])
                assert b'"job_id":"polled"' in await reader.readexactly(length)
        writer.write(b"GET /jobstatus/polled/ HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        async with asyncio.timeout(10):
            heads.append(await reader.readuntil(b"\r\n\r\n"))
        await closed_within(reader, 10)
    finally:
        writer.close()
        await writer.wait_closed()
    for head in heads:
        assert head.startswith(b"HTTP/1.1 200 "), head
        for line in (b"Content-Type: application/json\r\n", b"Cache-Control: no-store\r\n",
                     b"X-Content-Type-Options: nosniff\r\n"):
            assert line in head, head
    assert [b"Connection: close" in head for head in heads] == [False, False, False, True]


async def test_file_outputs_are_not_sniffed_and_keep_their_caching(start_cylindria):
    client = await start_cylindria()
    await put_job(client, "picture", workflows.quick())
    await wait_state(client, "picture", "completed")
    resp = await client.get("/joboutput/picture/0")
    assert resp.status == 200 and resp.content_type.startswith("image/")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "no-store" not in resp.headers.get("Cache-Control", "")
    assert "ETag" in resp.headers or "Last-Modified" in resp.headers
    events = await client.get("/events/")
    assert events.headers["Cache-Control"] == "no-cache"
    assert events.headers["X-Content-Type-Options"] == "nosniff"
    events.close()

