"""Property-based fuzzing of every route: odd paths, queries, headers and bodies against
the real app and simulator never get a 5xx or an ERROR in the log.

`make test` runs a short, repeatable profile; `make fuzz` a long random one
(HYPOTHESIS_PROFILE=fuzz).
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import ujson
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cylindria.addresses import free_port_run
from cylindria.app import create_app
from cylindria.config import Settings
from cylindria.simulator import ComfySimulator, SimSettings
from cylindria.web.serving import start_server

import workflows
from helpers import FAST

settings.register_profile("default", max_examples=250, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

API_KEY = "fuzz-key"
# Only loopback: a callback the service accepts is called, and must never leave this
# machine; a host name is never generated, so nothing is looked up either.
CALLBACKS = ["http://127.0.0.1:9/hook", "https://127.0.0.1:9/h", "http://[::1]:9/",
             "http://user:pw@127.0.0.1:9/", "ftp://127.0.0.1/x", "http://", "//127.0.0.1/"]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.errors.append(self.format(record))


class Service:
    """A simulated GPU and Cylindria in front of it, on a loop of their own."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self.runners: list[web.AppRunner] = []
        self.sim_port = free_port_run(1)
        self.port = free_port_run(1)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)

    async def _start(self) -> None:
        sim = ComfySimulator(SimSettings(step_seconds=0.0, output_dir=self.tmp / "out"))
        settings_ = Settings(comfy_url=f"http://127.0.0.1:{self.sim_port}", api_key=API_KEY,
                             port=self.port,
                             timing=FAST, state_file=self.tmp / "state.sqlite3",
                             callback_allow=("127.0.0.0/8", "::1"))
        runner = web.AppRunner(sim.create_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.sim_port).start()
        self.runners.append(runner)
        self.runners.append(await start_server(create_app(settings_), settings_))

    def stop(self) -> None:
        async def stop() -> None:
            for runner in reversed(self.runners):
                await runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def request(self, method: str, path: str, headers: dict[str, str],
                body: bytes | None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            # The status line is all that is judged; event streams never end.
            return conn.getresponse().status
        finally:
            conn.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[Service]:
    records = Records()
    watched = [logging.getLogger("cylindria"), logging.getLogger("aiohttp")]
    for logger in watched:
        logger.addHandler(records)
    running = Service(tmp_path_factory.mktemp("fuzz"))
    running.start()
    running.records = records  # type: ignore[attr-defined]
    try:
        yield running
    finally:
        running.stop()
        for logger in watched:
            logger.removeHandler(records)


def routes() -> list[tuple[str, str]]:
    app = create_app(Settings(comfy_url="http://127.0.0.1:9"))
    found = []
    for route in app.router.routes():
        info = route.get_info()
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        if path and route.method != "HEAD":
            found.append((route.method, path))
    return sorted(found)


ROUTES = routes()

odd_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", "0", "-1", "+1", "01", "１", "١", "²", "9" * 5000, "1e400",
                     "x" * 300, "..", "%", "%00", "%C2%B2", "%ZZ", "\n", "a\nb", "null"]),
)
raw_segment = st.one_of(
    odd_text.map(lambda t: quote(t, safe="")),
    st.binary(max_size=20).map(lambda b: "".join(f"%{c:02X}" for c in b)),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)
bodies = st.one_of(
    st.none(),
    st.binary(max_size=200),
    json_values.map(lambda v: ujson.dumps(v).encode()),
    st.just(ujson.dumps(workflows.quick()).encode()),
    st.just(ujson.dumps(workflows.UI_EXPORT).encode()),
    st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
    st.sampled_from([b'{"\\ud800": {"class_type": "EmptyImage", "inputs": {}}}',
                     b'{"1": {"class_type": "EmptyImage", "inputs": {"width": 1e999}}}',
                     b'{"1": {"class_type": "X", "inputs": {"a": ' + b"9" * 5000 + b"}}}",
                     b"\xff\xfe\x00", b"{}", b"[]", b'""', b"null"]),
)
header_values = st.one_of(odd_text.filter(lambda t: "\n" not in t and "\r" not in t),
                          st.sampled_from(CALLBACKS))
headers = st.fixed_dictionaries({}, optional={
    "X-API-Key": st.sampled_from([API_KEY, API_KEY, "wrong", ""]),
    "Content-Type": st.sampled_from(["application/json", "text/plain",
                                     "application/x-www-form-urlencoded", "x/y; a=b"]),
    "Content-Encoding": st.sampled_from(["gzip", "deflate", "br", "identity", "zz"]),
    "X-Callback-Url": st.sampled_from(CALLBACKS),
    "Last-Event-ID": header_values.filter(lambda t: t.isascii()),
    "Range": st.sampled_from(["bytes=0-1", "bytes=5-2", "bytes=x", "items=1-2"]),
    "Cookie": st.sampled_from(["cylindria_session=abc", "cylindria_session=", "x=y"]),
})
queries = st.dictionaries(st.sampled_from(["GpuId", "gpu", "state", "limit", "before",
                                           "job_id", "last_event_id", "next", "x"]),
                          odd_text, max_size=3)


def concrete(path: str, values: list[str]) -> str:
    parts = iter(values)
    return re.sub(r"\{[^}]+\}", lambda _: next(parts, "x"), path)


@given(route=st.sampled_from(ROUTES),
       method=st.one_of(st.none(), st.sampled_from(["GET", "PUT", "POST", "DELETE"])),
       segments=st.lists(raw_segment, min_size=3, max_size=3),
       query=queries, head=headers, body=bodies)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_no_request_gets_a_server_error(service, route, method, segments, query, head, body):
    verb, template = route
    path = concrete(template, segments)
    if query:
        path += "?" + "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in query.items())
    if head.get("X-API-Key") == "":
        del head["X-API-Key"]
    status = service.request(method or verb, path, head, body)
    assert status < 500, (method or verb, path, head, body)
    assert service.records.errors == [], service.records.errors[-1]
