"""Schemathesis against the live service in front of the simulator: generated
requests for every operation of the contract, and every answer checked against it
(no server error, a documented status, content type and body)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from cylindria.addresses import free_port_run
from cylindria.web.openapi import document

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
# `make fuzz` sets the fuzz profile: a long run.
EXAMPLES = 250 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 20

# The event stream never ends, so a generated request would wait forever.
schema = schemathesis.openapi.from_dict(document()).exclude(path="/events/")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """`cylindria demo` as a process of its own: Schemathesis calls it synchronously."""
    port, sim_port = free_port_run(1), free_port_run(1)
    log = (tmp_path_factory.mktemp("contract") / "demo.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cylindria", "demo", "--port", str(port), "--sim-port",
         str(sim_port), "--step-seconds", "0", "--no-state", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "cylindria demo exited"
            try:
                if requests.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "cylindria demo did not get ready"
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_the_service_keeps_its_contract(case, live):
    case.call_and_validate(base_url=live, checks=CHECKS, timeout=10)
