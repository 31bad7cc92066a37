"""`cylindria run | status | wait | cancel` as a user runs them: in a terminal, against
`cylindria demo` in a process of its own."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cylindria.addresses import free_port_run
from cylindria.client import CylindriaError
from cylindria.runner import error_code, state_code
from cylindria.runner_view import describe, eta, where

from helpers import clean_env, running_demo
from workflows import UI_EXPORT, fails_at_runtime, txt2img

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]")
CLI = [sys.executable, "-m", "cylindria"]
# One simulated GPU, fast enough to finish jobs soon and slow enough to show a bar.
DEMO = ("--step-seconds", "0.05")




@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_demo(tmp_path_factory.mktemp("demo"), *DEMO) as url:
        yield url




def _controlling_terminal() -> None:
    # In the child, after setsid: its stdin (the pty) becomes its terminal, so the
    # terminal's Ctrl-C reaches it as SIGINT, as in a shell.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A command in a pseudo-terminal of 40 x 160: what it draws, and keys typed."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        env = clean_env(TERM="xterm-256color", COLUMNS="160", LINES="40")
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave,
                                     cwd=cwd, env=env, start_new_session=True,
                                     preexec_fn=_controlling_terminal)
        os.close(slave)
        self.fd = master
        self.raw = b""

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            data = b""
        self.raw += data
        return bool(data)

    def expect(self, pattern: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.text()}"
            if not self._read(0.1):
                raise AssertionError(f"ended without {pattern!r}:\n{self.text()}")
        return self.text()

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def finish(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self._read(0.1):
            assert time.monotonic() < deadline, self.text()
        os.close(self.fd)
        return self.proc.wait(timeout=10)

    def text(self) -> str:
        return ANSI.sub(b"", self.raw).decode("utf-8", "replace")

    def screen(self) -> str:
        """The lines as the terminal shows them last: a redrawn line, its last drawing."""
        lines = self.text().replace("\r\n", "\n").split("\n")
        return "\n".join(line.split("\r")[-1].rstrip() for line in lines).strip("\n")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[type[Terminal]]:
    started: list[Terminal] = []

    def start(*args: str) -> Terminal:
        term = Terminal([*CLI, *args], tmp_path)
        started.append(term)
        return term

    yield start  # type: ignore[misc]
    for term in started:
        term.kill()


def write(tmp_path: Path, name: str, workflow: object) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(workflow))
    return path


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd,
                          env=clean_env(**env), timeout=60)


# -- a job from start to end -----------------------------------------------------------

def test_run_shows_the_bar_downloads_the_outputs_and_exits_0(demo, terminal, tmp_path):
    flow = write(tmp_path, "lighthouse.json", txt2img(steps=30))
    term = terminal("run", str(flow), "--url", demo, "--job-id", "bar-1", "--out", "out")
    term.expect(r"bar-1 running")
    term.expect(r"GPU 0 · node 3 \d+/30")
    assert term.finish() == 0
    screen = term.screen()
    assert "bar-1 completed" in screen and "100%" in screen, screen
    saved = sorted((tmp_path / "out").iterdir())
    assert len(saved) == 1 and saved[0].read_bytes().startswith(b"\x89PNG")
    assert f"out/{saved[0].name}" in screen
    frames = [line for line in term.text().replace("\r", "\n").split("\n")
              if "bar-1 running" in line]
    assert any(re.search(r"\d+% GPU 0 · node 3 \d+/30 ETA", f) for f in frames), frames


def test_a_job_that_fails_exits_1_with_its_error(demo, terminal, tmp_path):
    flow = write(tmp_path, "bad.json", fails_at_runtime())
    term = terminal("run", str(flow), "--url", demo, "--job-id", "fails-1")
    assert term.finish() == 1
    assert re.search(r"job fails-1 failed: \S+", term.screen()), term.screen()
    assert not (tmp_path / "outputs").exists()


def test_ctrl_c_then_yes_cancels_the_job(demo, terminal, tmp_path):
    flow = write(tmp_path, "long.json", txt2img(steps=2000))
    term = terminal("run", str(flow), "--url", demo, "--job-id", "ctrl-c-yes")
    term.expect(r"ctrl-c-yes running")
    term.type(b"\x03")
    term.expect(r"Cancel the job\? \[y/N\]")
    term.type(b"y\n")
    assert term.finish() == 3
    assert "job ctrl-c-yes cancelled" in term.screen()


def test_ctrl_c_then_no_leaves_it_running_for_wait(demo, terminal, tmp_path):
    flow = write(tmp_path, "long.json", txt2img(steps=2000))
    term = terminal("run", str(flow), "--url", demo, "--job-id", "ctrl-c-no")
    term.expect(r"ctrl-c-no running")
    term.type(b"\x03")
    term.expect(r"Cancel the job\? \[y/N\]")
    term.type(b"\n")
    assert term.finish() == 130
    assert "cylindria wait ctrl-c-no" in term.screen()
    status = cli("status", "ctrl-c-no", "--url", demo, cwd=tmp_path)
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "running"
    still = cli("wait", "ctrl-c-no", "--url", demo, "--timeout", "0.2", cwd=tmp_path)
    assert still.returncode == 8 and "still running" in still.stderr
    assert cli("cancel", "ctrl-c-no", "--url", demo, cwd=tmp_path).returncode == 0
    waited = cli("wait", "ctrl-c-no", "--url", demo, cwd=tmp_path)
    assert waited.returncode == 3 and json.loads(waited.stdout)["state"] == "cancelled"


def test_json_prints_the_final_status_and_the_files(demo, tmp_path):
    done = cli("run", str(EXAMPLES / "quick.json"), "--url", demo, "--json", "--out",
               str(tmp_path / "o"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["state"] == "completed" and body["job_id"].startswith("quick-")
    assert [Path(p).parent for p in body["downloaded"]] == [tmp_path / "o"]


# -- what cannot go -------------------------------------------------------------------

def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_input_is_one_line_and_its_own_exit_status(demo, tmp_path):
    missing = cli("run", "nowhere.json", "--url", demo, cwd=tmp_path)
    assert missing.returncode == 2 and "nowhere.json" in one_line(missing)
    ui = cli("run", str(write(tmp_path, "ui.json", UI_EXPORT)), "--url", demo, cwd=tmp_path)
    assert ui.returncode == 2 and "Export (API)" in one_line(ui)
    assert "Save (API Format)" in ui.stderr
    no_input = cli("run", str(EXAMPLES / "img2img.json"), "--input", "photo.png=gone.png",
                   "--url", demo, cwd=tmp_path)
    assert no_input.returncode == 2 and "gone.png" in one_line(no_input)
    unknown = cli("status", "nobody", "--url", demo, cwd=tmp_path)
    assert unknown.returncode == 2 and "nobody" in one_line(unknown)
    down = f"http://127.0.0.1:{free_port_run(1)}"
    unreachable = cli("run", str(EXAMPLES / "quick.json"), "--url", down, cwd=tmp_path)
    assert unreachable.returncode == 6 and "could not be reached" in one_line(unreachable)


def test_a_job_id_in_use_with_another_workflow_is_refused(demo, tmp_path):
    first = cli("run", str(EXAMPLES / "quick.json"), "--url", demo, "--json",
                "--job-id", "taken-1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    with_inputs = cli("run", str(EXAMPLES / "img2img.json"), "--job-id", "taken-1",
                      "--input", f"photo.png={EXAMPLES / 'photo.png'}", "--url", demo,
                      cwd=tmp_path)
    assert with_inputs.returncode == 2 and "--job-id" in one_line(with_inputs)


def test_the_key_and_the_url_come_from_flags_or_the_environment(tmp_path):
    with running_demo(tmp_path, *DEMO, CYLINDRIA_API_KEY="s3cret-key-for-tests") as url:
        wrong = cli("status", "nobody", "--url", url, "--key", "nope", cwd=tmp_path)
        assert wrong.returncode == 7 and "key" in one_line(wrong).lower()
        keyless = cli("status", "nobody", "--url", url, cwd=tmp_path)
        assert keyless.returncode == 7
        by_env = cli("run", str(EXAMPLES / "quick.json"), "--json", "--out", "o",
                     cwd=tmp_path, CYLINDRIA_URL=url, CYLINDRIA_API_KEY="s3cret-key-for-tests")
        assert by_env.returncode == 0, by_env.stderr
        assert json.loads(by_env.stdout)["state"] == "completed"


# -- what the bar says, and what an end means ----------------------------------------

def test_the_bar_names_the_place_in_line_the_gpu_the_node_and_the_eta():
    held = {"state": "queued", "gpu_id": None, "queue_position": 3, "eta_seconds": 75.2}
    assert (describe(held), where(held), eta(held)) == (
        "held, place 3 in line", "no GPU yet", "ETA 1m15s")
    queued = {"state": "queued", "gpu_id": 1, "queue_position": 2, "eta_seconds": None}
    assert (describe(queued), where(queued), eta(queued)) == (
        "queued, place 2", "GPU 1", "ETA --")
    run = {"state": "running", "gpu_id": 0, "queue_position": 0, "current_node": "3",
           "node_progress": {"node": "3", "value": 11, "max": 20}, "eta_seconds": 2.4,
           "cancel_requested": True}
    assert (describe(run), where(run), eta(run)) == (
        "cancelling", "GPU 0 · node 3 11/20", "ETA 2s")
    assert eta({"state": "completed", "eta_seconds": None}) == ""


def test_each_end_has_its_exit_status():
    assert state_code({"state": "completed"}) == 0
    assert state_code({"state": "failed", "error": {"type": "RuntimeError"}}) == 1
    assert state_code({"state": "cancelled"}) == 3
    assert state_code({"state": "rejected"}) == 4
    assert state_code({"state": "failed", "error": {"type": "lost"}}) == 5
    codes = {(0, "unreachable"): 6, (0, "bad_workflow"): 2, (0, "timeout"): 8,
             (401, "unauthorized"): 7, (429, "too_many_attempts"): 7,
             (404, "job_not_found"): 2, (409, "job_id_conflict"): 2,
             (409, "gpu_drained"): 4, (422, "validation_failed"): 4,
             (503, "queue_full"): 4}
    assert {key: error_code(CylindriaError(*key, "")) for key in codes} == codes
