"""Slow request bodies, connections per address and in all, and running out of file
descriptors: on real sockets, in this process and with `cylindria serve` as a process."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cylindria.addresses import free_port_run
from cylindria.config import Settings, load_settings
from cylindria.errors import ConfigError, ServerBusy, TooManyConnections
from cylindria.web import connections
from cylindria.web.connections import (
    AcceptErrors,
    BodyDeadlines,
    ConnectionLimits,
    Summary,
    connection_limits,
    raise_descriptor_limit,
)

import workflows
from helpers import clean_env, stop, wait_until, with_timing

ROOT = Path(__file__).resolve().parents[1]
CYLINDRIA = [sys.executable, "-m", "cylindria"]
KEY = "connections-test-key-7Rq"
HEAD = ("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {type}\r\n"
        "Content-Length: {length}\r\nX-API-Key: " + KEY + "\r\n\r\n")
FORM = "application/x-www-form-urlencoded"


async def connect(port: int, source: str = "127.0.0.1"
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to Cylindria from `source`, another loopback address standing for
    another machine."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


def head(method: str, path: str, length: int, media_type: str = "application/json") -> bytes:
    return HEAD.format(method=method, path=path, type=media_type, length=length).encode()


async def until_closed(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection; fails past `seconds`."""
    async with asyncio.timeout(seconds):
        return await reader.read()


def error_of(answer: bytes) -> tuple[int, dict[str, Any], str]:
    """Status, JSON body and head of one whole answer."""
    head_, _, body = answer.partition(b"\r\n\r\n")
    return int(head_.split()[1]), json.loads(body), head_.decode()


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


# -- request bodies ------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "media_type"), [
    ("PUT", "/startjob/slow/", "application/json"),
    ("POST", "/dashboard/login", FORM),
    ("POST", "/inputs/?name=slow.png", "image/png"),
])
async def test_a_body_that_stops_is_408_and_the_connection_closes(serve, method, path,
                                                                   media_type):
    # The idle timeout is far off: only the body's deadline can end these.
    served = await serve(timing=with_timing(body_timeout=0.4, body_min_rate=500,
                                            body_idle_timeout=60))
    reader, writer = await connect(served.port)
    writer.write(head(method, path, 100, media_type) + b"key=")
    started = time.monotonic()
    answer = await until_closed(reader, 5)
    waited = time.monotonic() - started
    status, body, text = error_of(answer)
    assert status == 408 and body["error"]["code"] == "body_timeout", answer
    assert "too slowly" in body["error"]["message"]
    assert "Connection: close" in text
    assert 0.3 <= waited < 3, waited
    await close(writer)


async def test_a_body_trickling_below_the_rate_is_cut(serve):
    served = await serve(timing=with_timing(body_timeout=0.3, body_min_rate=100,
                                            body_idle_timeout=60))
    reader, writer = await connect(served.port)
    writer.write(head("PUT", "/startjob/trickle/", 100_000))
    sent = 0
    started = time.monotonic()
    # 50 bytes a second, never a pause long enough to be idle: cut near 0.3 + t/2 = t.
    async with asyncio.timeout(5):
        while not reader.at_eof():
            try:
                writer.write(b" " * 5)
                await writer.drain()
            except ConnectionError:
                break
            sent += 5
            try:
                answer = await asyncio.wait_for(reader.read(), 0.1)
            except TimeoutError:
                continue
            break
    waited = time.monotonic() - started
    status, body, _ = error_of(answer)
    assert status == 408 and "bytes came in" in body["error"]["message"], body
    assert 0.4 < waited < 3, waited
    await close(writer)


async def test_a_body_at_a_steady_pace_outlives_the_base_timeout(serve):
    served = await serve(timing=with_timing(body_timeout=0.3, body_min_rate=100,
                                            body_idle_timeout=60))
    data = json.dumps(workflows.quick()).encode()
    reader, writer = await connect(served.port)
    writer.write(head("PUT", "/startjob/steady/", len(data)))
    started = time.monotonic()
    step = max(1, len(data) // 12)
    for n in range(0, len(data), step):
        writer.write(data[n:n + step])
        await writer.drain()
        # About 12 pieces over 1.2 s, at several times the minimum rate.
        await asyncio.sleep(0.1)
    assert time.monotonic() - started > 0.6
    async with asyncio.timeout(5):
        status = (await reader.readline()).split()[1]
    assert status == b"202"
    await close(writer)


async def test_a_body_that_stops_after_a_fast_start_is_cut_when_idle(serve):
    served = await serve(timing=with_timing(body_timeout=0.3, body_min_rate=500,
                                            body_idle_timeout=0.4))
    reader, writer = await connect(served.port)
    # 20,000 bytes earn 40 s at the minimum rate: only the idle rule can end this soon.
    writer.write(head("PUT", "/startjob/idle/", 100_000) + b" " * 20_000)
    started = time.monotonic()
    status, body, _ = error_of(await until_closed(reader, 5))
    assert status == 408 and "stopped arriving" in body["error"]["message"], body
    assert time.monotonic() - started < 3
    await close(writer)


async def test_a_complete_body_arms_no_timer_and_a_slow_one_one(serve, monkeypatch):
    served = await serve(timing=with_timing(body_timeout=0.3))
    loop = asyncio.get_running_loop()
    armed: list[Any] = []
    call_at = loop.call_at

    def counting(when: float, callback: Any, *args: Any, **kw: Any) -> Any:
        if getattr(callback, "__func__", None) is BodyDeadlines._check:
            armed.append(args)
        return call_at(when, callback, *args, **kw)

    monkeypatch.setattr(loop, "call_at", counting)
    async with aiohttp.ClientSession() as session:
        for n in range(5):
            async with session.put(f"{served.url}/startjob/whole-{n}/",
                                   json=workflows.quick()) as resp:
                assert resp.status == 202
        # Kept alive past the body timeout, the connection still serves.
        await asyncio.sleep(0.4)
        async with session.put(f"{served.url}/startjob/whole-late/",
                               json=workflows.quick()) as resp:
            assert resp.status == 202
    assert armed == []
    reader, writer = await connect(served.port)
    writer.write(head("PUT", "/startjob/half/", 100) + b"{")
    await until_closed(reader, 5)
    # One body watched: its deadline, then the wait for its handler to let go.
    assert len({id(body) for _, body in armed}) == 1
    await close(writer)


async def test_an_aborted_body_leaves_no_traceback(serve, caplog):
    caplog.set_level(logging.DEBUG)
    served = await serve(timing=with_timing(body_timeout=30),
                         max_connections_per_address=1)
    for method, path, media_type in (("PUT", "/startjob/gone/", "application/json"),
                                     ("POST", "/dashboard/login", FORM),
                                     ("POST", "/inputs/?name=gone.png", "image/png")):
        _, writer = await connect(served.port)
        writer.write(head(method, path, 800, media_type) + b"{" * 100)
        await writer.drain()
        await close(writer)

        # Served again from this address once the server let go of that connection
        # (one per address), so it has seen the client leave.
        async def served_again() -> bool:
            reader, writer = await connect(served.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await until_closed(reader, 5)
            await close(writer)
            return answer.startswith(b"HTTP/1.1 200")
        await wait_until(served_again, 5, "the connection to be let go")
    noisy = [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert noisy == [], [r.getMessage() for r in noisy]


async def test_a_handler_that_neither_reads_nor_answers_is_closed_after_the_deadline():
    """No route of the service is like that for long; a server of one such handler
    shows that the deadline holds for it too."""
    release = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.Response:
        async with asyncio.timeout(10):
            await release.wait()
        return web.Response(text="late")

    server = web.Server(handler)
    BodyDeadlines(server, with_timing(body_timeout=0.3))
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, "127.0.0.1", 0)
    try:
        reader, writer = await connect(listener.sockets[0].getsockname()[1])
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        started = time.monotonic()
        # Cut at 0.3 s; nothing reads it, so the connection closes 0.3 s later.
        assert await until_closed(reader, 5) == b""
        assert 0.5 <= time.monotonic() - started < 3
        await close(writer)
    finally:
        release.set()
        listener.close()
        await listener.wait_closed()
        await server.shutdown()


# -- connections -----------------------------------------------------------------------

def test_the_policy_caps_each_address_but_not_a_proxy_and_all_together():
    limits = ConnectionLimits(total=10, per_address=3, descriptors=1024)
    assert limits.refusal(held=0, held_here=0, exempt=False) is None
    assert limits.refusal(held=5, held_here=2, exempt=False) is None
    assert limits.refusal(held=5, held_here=3, exempt=False) is TooManyConnections
    assert limits.refusal(held=5, held_here=3, exempt=True) is None
    assert limits.refusal(held=10, held_here=0, exempt=False) is ServerBusy
    assert limits.refusal(held=10, held_here=0, exempt=True) is ServerBusy
    assert ConnectionLimits(10, 0, 1024).refusal(9, 9, exempt=False) is None


def test_the_default_limits_follow_the_descriptor_limit():
    one, eight = Settings(), Settings(num_gpus=8)
    # 64 for the service's own files, 128 for a burst of accepts, 33 per GPU for ComfyUI.
    assert connection_limits(one, 1024) == ConnectionLimits(671, 83, 1024)
    assert connection_limits(eight, 1024) == ConnectionLimits(440, 55, 1024)
    assert connection_limits(one, 384) == ConnectionLimits(31, 8, 384)
    assert connection_limits(one, 1_048_576).total == connections.MOST_CONNECTIONS
    assert connection_limits(eight, 300) == ConnectionLimits(16, 8, 300)
    given = Settings(max_connections=50, max_connections_per_address=0)
    assert connection_limits(given, 1024) == ConnectionLimits(50, 0, 1024)


def test_the_limits_and_body_deadlines_are_read_from_the_environment():
    settings = load_settings({}, {"CYLINDRIA_MAX_CONNECTIONS": "300",
                                  "CYLINDRIA_MAX_CONNECTIONS_PER_ADDRESS": "0",
                                  "CYLINDRIA_BODY_TIMEOUT": "2.5",
                                  "CYLINDRIA_BODY_MIN_RATE": "1000"})
    assert (settings.max_connections, settings.max_connections_per_address) == (300, 0)
    assert (settings.timing.body_timeout, settings.timing.body_min_rate) == (2.5, 1000)
    for name, value, says in (("CYLINDRIA_MAX_CONNECTIONS", "0", "1 or more"),
                              ("CYLINDRIA_MAX_CONNECTIONS_PER_ADDRESS", "-1", "0 (no cap)"),
                              ("CYLINDRIA_BODY_MIN_RATE", "0", "a number above 0"),
                              ("CYLINDRIA_BODY_TIMEOUT", "soon", "a number")):
        with pytest.raises(ConfigError, match=rf"{name} must be {re.escape(says)}"):
            load_settings({}, {name: value})


def test_the_unit_gives_descriptors_for_the_most_connections_and_nginx_caps_clients():
    unit = (ROOT / "deploy" / "cylindria.service").read_text()
    descriptors = int(re.search(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE).group(1))
    eight = Settings(num_gpus=8)
    assert connection_limits(eight, descriptors).total == connections.MOST_CONNECTIONS
    assert connections.room_for_clients(8, descriptors) >= connections.MOST_CONNECTIONS
    nginx = re.sub(r"#.*", "", (ROOT / "deploy" / "nginx" / "cylindria.conf").read_text())
    servers = nginx.split("\nserver {")[1:]
    assert len(servers) == 3
    for block in servers:
        for line in ("client_body_timeout 10s;", "client_header_timeout 10s;",
                     "limit_conn cylindria_per_client 64;", "limit_conn_status 503;"):
            assert line in block


def test_the_soft_descriptor_limit_is_raised_toward_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_descriptor_limit(ceiling=min(hard, 4096)) == min(hard, 4096)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_one_address_past_its_cap_is_refused_while_others_are_served(serve, caplog):
    caplog.set_level(logging.INFO, logger="cylindria.web.connections")
    served = await serve(max_connections=20, max_connections_per_address=3,
                         trusted_proxies=("127.0.0.3",),
                         timing=with_timing(head_timeout=30, keepalive_timeout=30))
    held = [await connect(served.port) for _ in range(3)]
    for _ in range(5):
        reader, writer = await connect(served.port)
        status, body, text = error_of(await until_closed(reader, 5))
        assert status == 503 and body["error"]["code"] == "too_many_connections", body
        assert "Retry-After: 5" in text and "Connection: close" in text
        await close(writer)
    # Another machine, and a trusted proxy past the cap, are served.
    for source, count in (("127.0.0.2", 1), ("127.0.0.3", 5)):
        proxied = [await connect(served.port, source) for _ in range(count)]
        for reader, writer in proxied:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await until_closed(reader, 5)).startswith(b"HTTP/1.1 200")
            await close(writer)
    # A connection let go frees its place.
    await close(held.pop()[1])

    async def taken() -> bool:
        reader, writer = await connect(served.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await until_closed(reader, 5)
        await close(writer)
        return answer.startswith(b"HTTP/1.1 200")
    await wait_until(taken, 5, "a freed place")
    for _, writer in held:
        await close(writer)
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING
    assert "127.0.0.1" in refusals[0].getMessage() and not refusals[0].exc_info


async def test_past_the_total_every_address_is_refused_a_proxy_included(serve):
    served = await serve(max_connections=4, max_connections_per_address=2,
                         trusted_proxies=("127.0.0.3",),
                         timing=with_timing(head_timeout=30, keepalive_timeout=30))
    held = [await connect(served.port, source)
            for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.3")]
    for source in ("127.0.0.4", "127.0.0.3"):
        reader, writer = await connect(served.port, source)
        status, body, _ = error_of(await until_closed(reader, 5))
        assert status == 503 and body["error"]["code"] == "server_busy", body
        await close(writer)
    for _, writer in held:
        await close(writer)


async def test_refusals_are_summed_a_window_at_a_time(caplog):
    caplog.set_level(logging.INFO, logger="cylindria.web.connections")
    summary = Summary(logging.WARNING, "refused %s", "refused %d more in %g s, last %s",
                      window=0.2)
    for n in range(50):
        summary.note(f"client-{n}")
    assert [r.getMessage() for r in caplog.records] == ["refused client-0"]
    await wait_until(lambda: len(caplog.records) == 2, 5, "the window's line")
    assert caplog.records[1].getMessage() == "refused 49 more in 0.2 s, last client-49"
    summary.note("late")
    # The window goes on: nothing until it ends.
    assert len(caplog.records) == 2
    await wait_until(lambda: len(caplog.records) == 3, 5, "the next window's line")
    summary.close()


async def test_accept_running_out_of_descriptors_is_one_line_a_window(caplog):
    loop = asyncio.get_running_loop()
    passed: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: passed.append(context))
    accepts = AcceptErrors(loop, 256)
    try:
        for _ in range(30):
            loop.call_exception_handler({
                "message": AcceptErrors.MESSAGE,
                "exception": OSError(errno.EMFILE, "Too many open files")})
        loop.call_exception_handler({"message": "something else"})
    finally:
        accepts.close()
    lines = [r for r in caplog.records if r.name == "cylindria.web.connections"]
    assert len(lines) == 1 and not lines[0].exc_info
    assert "Too many open files" in lines[0].getMessage()
    assert [c["message"] for c in passed] == ["something else"]
    assert loop.get_exception_handler() is not None
    loop.set_exception_handler(None)


# -- out of file descriptors, as a process --------------------------------------------

DESCRIPTORS = 384
ATTACKERS = 300


class Service:
    """`cylindria simulate` and `cylindria serve` as processes, the service with a low
    descriptor limit and short body deadlines."""

    def __init__(self, tmp: Path, **env: str) -> None:
        self.sim_port = free_port_run(1)
        self.port = free_port_run(1)
        self.log = tmp / "serve.log"
        self._logs = [(tmp / "sim.log").open("wb"), self.log.open("wb")]
        self.sim = subprocess.Popen(
            [*CYLINDRIA, "simulate", "--gpus", "1", "--base-port", str(self.sim_port),
             "--output-dir", str(tmp / "out")], env=clean_env(),
            stdout=self._logs[0], stderr=subprocess.STDOUT)
        self.serve = subprocess.Popen(
            [*CYLINDRIA, "serve", "--port", str(self.port), "--no-state",
             "--comfy-url", f"http://127.0.0.1:{self.sim_port}"],
            env=clean_env(CYLINDRIA_API_KEY=KEY, CYLINDRIA_BODY_TIMEOUT="1",
                          CYLINDRIA_BODY_MIN_RATE="500", **env),
            stdout=self._logs[1], stderr=subprocess.STDOUT, preexec_fn=self._limit)

    @staticmethod
    def _limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTORS, DESCRIPTORS))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        for proc in (self.serve, self.sim):
            stop(proc)
        for handle in self._logs:
            handle.close()


@pytest.fixture
def service(tmp_path):
    started: list[Service] = []

    def start(**env: str) -> Service:
        started.append(Service(tmp_path, **env))
        return started[-1]
    yield start
    for each in started:
        each.stop()


async def ready(session: aiohttp.ClientSession, service: Service) -> None:
    async def answers() -> bool:
        assert service.serve.poll() is None, service.output()
        try:
            async with session.get(f"{service.url}/readyz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False
    await wait_until(answers, 30, "the service to be ready")


async def slow_bodies(port: int, sources: list[str], each: int) -> list[Any]:
    """`each` connections from every source, each sending a sign-in form's head and
    then only `key=`, as the probe did. Connections the service never accepts (its
    backlog full) are given up after a moment."""
    async def one(source: str) -> Any:
        try:
            async with asyncio.timeout(3):
                _, writer = await connect(port, source)
                writer.write(head("POST", "/dashboard/login", 100, FORM) + b"key=")
                await writer.drain()
        except (TimeoutError, ConnectionError):
            return None
        return writer
    opened = await asyncio.gather(*(one(source) for source in sources
                                    for _ in range(each)))
    return [writer for writer in opened if writer is not None]


async def answered(session: aiohttp.ClientSession, service: Service, job_id: str,
                   within: float) -> float:
    """Seconds until /healthz and a keyed PUT /startjob both answer as they should,
    retrying a refused connection; fails past `within`."""
    started = time.monotonic()

    async def both() -> bool:
        try:
            async with session.get(f"{service.url}/healthz") as resp:
                if resp.status != 200:
                    return False
            async with session.put(f"{service.url}/startjob/{job_id}/",
                                   json=workflows.quick(),
                                   headers={"X-API-Key": KEY}) as resp:
                return resp.status == 202
        except aiohttp.ClientError:
            return False
    await wait_until(both, within, "/healthz and PUT /startjob to answer")
    return time.monotonic() - started


def check_log(service: Service) -> str:
    text = service.output()
    assert service.serve.poll() is None, text
    assert "Traceback" not in text and len(text.splitlines()) < 40, text
    return text


@pytest.mark.slow
async def test_more_slow_bodies_than_descriptors_leave_the_service_answering(service):
    served = service()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        await ready(session, served)
        # One address: held to its share, the rest refused at once.
        one = await slow_bodies(served.port, ["127.0.0.2"], ATTACKERS)
        assert await answered(session, served, "one-source", 3) < 3
        # Many addresses, each under its cap, together past the total and the
        # descriptors: refused past the total until the deadlines cut the slow ones.
        many = await slow_bodies(served.port, [f"127.0.0.{n}" for n in range(3, 23)],
                                 ATTACKERS // 20)
        assert await answered(session, served, "many-sources", 6) < 6
        for writer in one + many:
            writer.close()
    text = check_log(served)
    assert "connections: at most 31 in all and 8 per client address" in text
    assert "refused a connection from 127.0.0.2" in text
    assert "Too many open files" not in text


@pytest.mark.slow
async def test_accept_out_of_descriptors_logs_a_line_not_a_traceback_each(service):
    # The caps set above what the descriptors hold: accept() itself runs out.
    served = service(CYLINDRIA_MAX_CONNECTIONS="5000",
                     CYLINDRIA_MAX_CONNECTIONS_PER_ADDRESS="0")
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        await ready(session, served)
        # More than the descriptors hold, from 20 addresses.
        writers = await slow_bodies(served.port, [f"127.0.0.{n}" for n in range(2, 22)],
                                    DESCRIPTORS // 20 + 5)
        assert await answered(session, served, "after-emfile", 8) < 8
        for writer in writers:
            writer.close()
    text = check_log(served)
    assert "could not accept a connection: Too many open files" in text
