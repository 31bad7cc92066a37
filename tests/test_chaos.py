"""The chaos benchmark, small: 1,000 jobs through real processes (simulated GPUs,
`cylindria serve` with its state file) while websockets drop, calls hang, ComfyUI
restarts once and Cylindria is killed once; every final state checked against what the
simulated GPUs' ledgers say ran."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ujson

CHAOS = Path(__file__).resolve().parent.parent / "bench" / "chaos.py"

pytestmark = pytest.mark.slow


def chaos(*args: str) -> dict:
    proc = subprocess.Popen(
        [sys.executable, str(CHAOS), "--jobs", "1000", "--comfy-restarts", "1", "--kills",
         "1", "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # The benchmark and every process it started are one group.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert out.strip(), err[-3000:]
    result = ujson.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 0, result
    return result


def test_nothing_is_lost_stuck_or_run_twice_through_crashes():
    result = chaos("--seed", "5")
    assert result["faults"]["ComfyUI restarts (all GPUs)"] == 1
    assert result["faults"]["Cylindria SIGKILLs"] == 1
    assert result["faults"]["websocket drops"] >= 8
    assert result["stuck (not final 60 s after the end)"] == 0
    assert result["run twice"] == 0
    assert result["wrong state"] == 0
    assert result["completed with outputs other than the GPU's"] == 0
    assert result["accepted but missing"] == 0
    assert result["prompts run that no job names"] == 0
    # Every kind of job reached its own end: the refusals, the run-time failures and
    # the completions are all there, and they add up to what was accepted.
    assert result["refused at submission (4xx)"] > 0
    assert result["failed: failing"] > 0 and result["completed"] > 0
    assert result["jobs sent"] == (result["accepted (200/202)"]
                                   + result["refused at submission (4xx)"])


def test_with_retries_every_lost_job_completes():
    result = chaos("--seed", "6", "--retry-lost", "2")
    assert result["jobs retried after a loss"] > 0
    assert result["lost (failed, type lost)"] == 0
    assert result["stuck (not final 60 s after the end)"] == 0
    assert result["run twice"] == 0 and result["wrong state"] == 0
    assert result["completed with outputs other than the GPU's"] == 0
    assert result["accepted but missing"] == 0
