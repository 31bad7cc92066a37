"""Schemathesis against the live service in front of the simulator, with every check it
has: generated requests, valid and invalid, for every operation of the contract the
service serves, and every answer checked against that contract. Twice: with an API key
(sent with every request) and without one, as the contract differs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, load_all_checks, max_response_time

from cylindria.addresses import free_port_run
from cylindria.config import Settings
from cylindria.web.openapi import CALLBACK_URL, document

import workflows
from helpers import clean_env, put_job, stop, wait_state

KEY = "contract-test-key"
# `make fuzz` sets the fuzz profile: a long run.
FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
EXAMPLES = 250 if FUZZ else 8
# An event stream never ends: it is read for this long (its replay comes at once).
STREAM_SECONDS = 0.3

load_all_checks()
EVERY_CHECK = [*CHECKS.get_all(), max_response_time]
# Wrong keys lock the address they come from out, by design, so a fuzzer that sends
# them would only lock itself out: with a key, that one check is left out.
KEYED_CHECKS = [check for check in EVERY_CHECK if check.__name__ != "ignored_auth"]
HYPOTHESIS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))


# The contracts of the two services, as their settings make them (the served documents
# are checked to be these). Expectations beyond the contract come from schemathesis.toml.
# A generated ?wait= holds its answer until the job ends: one second at most here.
KEYED = Settings(api_key=KEY, num_gpus=2, max_wait=1)
OPEN = Settings(num_gpus=1, max_wait=1)
keyed = schemathesis.openapi.from_dict(document(KEYED))
open_ = schemathesis.openapi.from_dict(document(OPEN))


# Video and sound files go as the bytes generated, as other files do.
schemathesis.serializer.alias(["video/mp4", "audio/mpeg"], "application/octet-stream")


@dataclass(frozen=True, slots=True)
class Service:
    base: str
    headers: dict[str, str]


def start_demo(stack: ExitStack, log_dir: Path, name: str,
               wanted: Settings) -> tuple[subprocess.Popen[bytes], Service]:
    gpus = wanted.num_gpus
    port, sim_port = free_port_run(1), free_port_run(gpus)
    env, headers = clean_env(CYLINDRIA_MAX_WAIT=str(wanted.max_wait)), {}
    if wanted.api_key:
        env["CYLINDRIA_API_KEY"] = wanted.api_key
        headers["X-API-Key"] = wanted.api_key
    log = stack.enter_context((log_dir / f"{name}.log").open("wb"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cylindria", "demo", "--port", str(port), "--sim-port",
         str(sim_port), "--numberOfGpus", str(gpus), "--step-seconds", "0", "--no-state",
         "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT)
    stack.callback(stop, proc)
    return proc, Service(f"http://127.0.0.1:{port}", headers)


def wait_ready(proc: subprocess.Popen[bytes], service: Service) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, "cylindria demo exited"
        try:
            if requests.get(f"{service.base}/readyz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "cylindria demo did not get ready"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[dict[str, Service]]:
    """`cylindria demo` twice, each a process of its own (Schemathesis calls it
    synchronously), started side by side: with a key and two GPUs, and without."""
    log_dir = tmp_path_factory.mktemp("contract")
    with ExitStack() as stack:
        started = {"keyed": start_demo(stack, log_dir, "keyed", KEYED),
                   "open": start_demo(stack, log_dir, "open", OPEN)}
        for proc, service in started.values():
            wait_ready(proc, service)
        yield {name: service for name, (_, service) in started.items()}


CALLBACK = re.compile(CALLBACK_URL)


def stay_on_this_machine(case, base: str) -> None:
    """Point the callback and input URLs a valid request carries at the service itself,
    which the address policy refuses at once: a generated URL must never be looked up,
    nor called (one naming a public address would be)."""
    url = case.headers.get("X-Callback-Url") if case.headers else None
    if isinstance(url, str) and url and CALLBACK.fullmatch(url):
        case.headers["X-Callback-Url"] = f"{base}/callback"
    body = case.body
    for workflow in (body, body.get("workflow")) if isinstance(body, dict) else ():
        inputs = workflow.get("inputs") if isinstance(workflow, dict) else None
        for spec in inputs.values() if isinstance(inputs, dict) else ():
            if isinstance(spec, dict) and isinstance(spec.get("url"), str):
                spec["url"] = f"{base}/input"


def call(case, service: Service, checks: list) -> None:
    stay_on_this_machine(case, service.base)
    timeout = (10, STREAM_SECONDS) if case.path == "/events/" else 10
    case.call_and_validate(base_url=service.base, headers=service.headers, checks=checks,
                           timeout=timeout)


SIGN_IN = {"method": "POST", "path": "/dashboard/login"}


@keyed.exclude(**SIGN_IN).parametrize()
@HYPOTHESIS
def test_with_a_key_the_service_keeps_its_contract(case, services):
    call(case, services["keyed"], KEYED_CHECKS)


def test_the_services_serve_the_contracts_tested(services):
    for name, settings_ in (("keyed", KEYED), ("open", OPEN)):
        service = services[name]
        resp = requests.get(f"{service.base}/openapi.json", headers=service.headers,
                            timeout=10)
        assert resp.json() == document(settings_), name


# After the others: the sign-in form's wrong keys lock this address out for a minute.
@keyed.include(**SIGN_IN).parametrize()
@HYPOTHESIS
def test_with_a_key_the_sign_in_form_keeps_its_contract(case, services):
    call(case, services["keyed"], KEYED_CHECKS)


@open_.parametrize()
@HYPOTHESIS
def test_without_a_key_the_service_keeps_its_contract(case, services):
    call(case, services["open"], EVERY_CHECK)


# -- what the fuzzer found once, kept ---------------------------------------------------

async def test_a_callback_host_no_resolver_takes_is_refused_not_a_crash(start_cylindria):
    client = await start_cylindria()
    status, body = await put_job(client, "odd-host", workflows.quick(),
                                 headers={"X-Callback-Url": f"http://{'a' * 64}.example/"})
    assert status == 422 and body["error"]["code"] == "callback_not_allowed", body
    status, body = await put_job(client, "empty-label", workflows.quick(),
                                 headers={"X-Callback-Url": "http://a..b/"})
    assert status == 422 and body["error"]["code"] == "callback_not_allowed", body


async def test_an_empty_callback_header_asks_for_no_callback(start_cylindria):
    client = await start_cylindria()
    status, body = await put_job(client, "no-hook", workflows.quick(),
                                 headers={"X-Callback-Url": ""})
    assert status == 202, body
    assert (await wait_state(client, "no-hook", "completed"))["webhook"] is None


async def test_an_events_filter_or_resume_point_that_means_nothing_is_refused(
        start_cylindria):
    client = await start_cylindria()
    resp = await client.get("/events/", params={"job_id": "a/b"})
    assert resp.status == 400 and "job_id" in (await resp.json())["error"]["message"]
    # The header counts, but the query value beside it is no event id either.
    resp = await client.get("/events/", params={"last_event_id": "x"},
                            headers={"Last-Event-ID": "1"})
    assert resp.status == 400 and "last_event_id" in (await resp.json())["error"]["message"]


async def test_an_asset_name_longer_than_any_file_name_is_not_found(start_cylindria):
    client = await start_cylindria()
    for folder in ("/docs/static/", "/dashboard/static/"):
        resp = await client.get(folder + "a" * 300)
        assert resp.status == 404, folder


async def test_a_name_that_is_no_file_name_is_refused_beside_a_form_too(start_cylindria):
    client = await start_cylindria()
    form = aiohttp.FormData()
    form.add_field("file", b"\x89PNG", filename="a.png", content_type="image/png")
    resp = await client.post("/inputs/", params={"name": ".."}, data=form)
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "invalid_input"
