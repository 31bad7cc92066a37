"""The desktop tester: a real Tk window under Xvfb, against a real Cylindria and simulator."""

from __future__ import annotations

import gc
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tkinter as tk
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import ImageGrab

from cylindria import desktop as tester
from cylindria.addresses import free_port_run
from cylindria.client import Client, CylindriaError
from cylindria.desktop import InputError, parse_target

import workflows
from helpers import clean_env, stop

ROOT = Path(__file__).resolve().parents[1]
CYLINDRIA = [sys.executable, "-m", "cylindria"]
API_KEY = "tester-key-8Jd2pQ"
# Generous bounds: on a loaded two-core machine a subprocess can take seconds to answer.
START_TIMEOUT = 30.0
PRESS_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def display(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private X server. Missing Xvfb is a failure: these tests must not vanish silently."""
    xvfb = shutil.which("Xvfb")
    assert xvfb, "Xvfb is not installed (Debian: apt-get install xvfb)"
    log = (tmp_path_factory.mktemp("xvfb") / "xvfb.log").open("wb")
    read_fd, write_fd = os.pipe()
    # -displayfd makes Xvfb pick a free display itself and write its number once it
    # accepts connections, which settles both the choice and the readiness wait.
    proc = subprocess.Popen([xvfb, "-displayfd", str(write_fd), "-screen", "0",
                             "1024x768x24", "-nolisten", "tcp"],
                            pass_fds=(write_fd,), stdout=log, stderr=subprocess.STDOUT)
    os.close(write_fd)
    number = b""
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while not number.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([read_fd], [], [], max(left, 0))
            chunk = os.read(read_fd, 16) if ready else b""
            if not chunk:
                raise AssertionError(f"Xvfb did not start (exit {proc.poll()}): see {log.name}")
            number += chunk
    except BaseException:
        stop(proc, signal.SIGTERM)
        log.close()
        raise
    finally:
        os.close(read_fd)
    name = f":{int(number)}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISPLAY", name)
        yield name
    stop(proc, signal.SIGTERM)
    log.close()


@dataclass
class Service:
    port: int
    sim_port: int


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def wait_for(predicate: Callable[[], Any], what: str, procs: list[Any] = (),
             timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for proc, log in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{log.name} exited early:\n{log.read_text()}")
        try:
            if predicate():
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`cylindria simulate` and `cylindria serve` (with an API key) as real processes."""
    work = tmp_path_factory.mktemp("service")
    sim_port = free_port_run(1)
    port = free_port_run(1)
    started: list[tuple[subprocess.Popen[bytes], Path]] = []
    handles = []
    commands = [
        ([*CYLINDRIA, "simulate", "--gpus", "1", "--base-port", str(sim_port),
          "--step-seconds", "0", "--output-dir", str(work / "out")], clean_env(), "sim.log"),
        ([*CYLINDRIA, "serve", "--port", str(port), "--comfy-url",
          f"http://127.0.0.1:{sim_port}", "--no-state"], clean_env(CYLINDRIA_API_KEY=API_KEY),
         "serve.log"),
    ]
    try:
        for args, env, log_name in commands:
            handle = (work / log_name).open("wb")
            handles.append(handle)
            started.append((subprocess.Popen(args, env=env, stdout=handle,
                                             stderr=subprocess.STDOUT), work / log_name))
        key = {"X-API-Key": API_KEY}
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/serverstatus?GpuId=0",
                                  key)[1]["status"] == "ok",
                 "Cylindria to report GPU 0 ok", started)
        yield Service(port, sim_port)
    finally:
        for proc, _ in reversed(started):
            stop(proc)
        for handle in handles:
            handle.close()


class FileDialog:
    """Stands in for tkinter.filedialog.askopenfilename: answers with a fixed path."""

    def __init__(self, path: Path | str = "") -> None:
        self.path = str(path)
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **options: Any) -> str:
        self.calls.append(options)
        return self.path


class FilesDialog:
    """Stands in for tkinter.filedialog.askopenfilenames: answers with fixed paths."""

    def __init__(self, *paths: Path | str) -> None:
        self.paths = tuple(str(path) for path in paths)
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **options: Any) -> tuple[str, ...] | str:
        self.calls.append(options)
        return self.paths or ""  # Tk answers "" when cancelled


class Prompt:
    """Stands in for tkinter.simpledialog.askstring: the user presses OK on what is shown,
    or types `answer` instead."""

    def __init__(self, answer: str | None = "", *, accept_shown: bool = True) -> None:
        self.answer = answer
        self.accept_shown = accept_shown
        self.calls: list[dict[str, Any]] = []

    def __call__(self, title: str, prompt: str, **options: Any) -> str | None:
        self.calls.append({"title": title, "prompt": prompt, **options})
        return options.get("initialvalue") if self.accept_shown else self.answer


def spy_on_perform(monkeypatch: pytest.MonkeyPatch, record: Callable[..., None]) -> None:
    real = tester.perform

    def spy(client: Client, method: str, url: str, action: tester.Action) -> tester.Reply:
        record(client, method, url)
        return real(client, method, url, action)
    monkeypatch.setattr(tester, "perform", spy)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The method and URL of every call the tester makes, still made for real."""
    made: list[tuple[str, str]] = []
    spy_on_perform(monkeypatch, lambda client, method, url: made.append((method, url)))
    return made


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch) -> list[Client]:
    """The client each call of the tester went through."""
    used: list[Client] = []
    spy_on_perform(monkeypatch, lambda client, method, url: used.append(client))
    return used


@pytest.fixture
def make_app(display: str, service: Service) -> Iterator[Callable[..., tester.TesterApp]]:
    apps: list[tester.TesterApp] = []

    def make(**options: Any) -> tester.TesterApp:
        options = {"port": service.port, "api_key": API_KEY, "timeout": 5.0,
                   "askopenfilename": FileDialog(), "askopenfilenames": FilesDialog(),
                   "askstring": Prompt(), **options}
        app = tester.TesterApp(tk.Tk(), **options)
        apps.append(app)
        pump_until(app, lambda: app.root.winfo_viewable(), "the window to show")
        return app
    yield make
    for app in apps:
        app.close()
    apps.clear()
    # Tk objects must be freed on the thread that made them: collect the closed windows
    # here, not wherever the next collection happens to run (a client's thread).
    gc.collect()


def pump_until(app: tester.TesterApp, done: Callable[[], Any], what: str,
               timeout: float = PRESS_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        app.root.update()
        if done():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                 f"response area:\n{app.response_text()}")
        # Yields the CPU to the service processes; the loop is bounded by the deadline.
        time.sleep(0.005)


def press(app: tester.TesterApp, button: Any) -> str:
    """Click `button` and return what the response area shows once the answer is in."""
    app.response.configure(state="normal")
    app.response.delete("1.0", "end")
    app.response.configure(state="disabled")
    button.invoke()
    pump_until(app, lambda: app.response_text() and not app.busy,
               f"an answer to {button.cget('text')!r}")
    return app.response_text()


def body_of(shown: str) -> Any:
    """The JSON under the request and status lines of the response area."""
    return json.loads(shown.split("\n\n", 1)[1])


def fill(entry: Any, text: str) -> None:
    entry.delete(0, "end")
    entry.insert(0, text)


def screenshot(app: tester.TesterApp, display: str, path: Path) -> Path:
    root = app.root
    root.update()
    x, y = root.winfo_rootx(), root.winfo_rooty()
    image = ImageGrab.grab(bbox=(x, y, x + root.winfo_width(), y + root.winfo_height()),
                           xdisplay=display)
    image.save(path)
    return path


def test_server_status_shows_the_gpu(make_app, calls):
    app = make_app()
    assert app.root.title() == "Cylindria tester"
    assert app.url_var.get() == "http://127.0.0.1" and app.gpu_var.get() == "0"

    shown = press(app, app.server_status_button)

    first, status_line = shown.splitlines()[:2]
    assert first == f"GET http://127.0.0.1:{app.port_var.get()}/serverstatus?GpuId=0"
    assert status_line.startswith("HTTP 200 OK")
    body = body_of(shown)
    assert body["status"] == "ok" and body["gpu_id"] == 0 and body["reachable"] is True
    assert "  \"status\": \"ok\"" in shown  # pretty-printed, not one long line
    assert app.status_var.get().startswith("HTTP 200 OK")
    assert calls == [("GET", first.split(" ", 1)[1])]


def test_start_job_then_follow_it_to_completion(make_app, display, tmp_path):
    workflow = tmp_path / "quick.json"
    workflow.write_text(json.dumps(workflows.quick()))
    dialog, prompt = FileDialog(workflow), Prompt()
    app = make_app(askopenfilename=dialog, askstring=prompt)

    shown = press(app, app.start_job_button)

    assert len(dialog.calls) == 1 and dialog.calls[0]["parent"] is app.root
    job_id = app.last_job_id
    assert job_id and job_id.startswith("tester-")
    assert shown.splitlines()[0] == (f"PUT http://127.0.0.1:{app.port_var.get()}"
                                     f"/startjob/{job_id}/?GpuId=0")
    assert shown.splitlines()[1].startswith("HTTP 202 Accepted")
    assert body_of(shown)["job_id"] == job_id and body_of(shown)["accepted"] is True
    assert job_id in app.last_job_var.get()

    states = []
    for _ in range(40):
        shown = press(app, app.job_status_button)
        assert shown.splitlines()[1].startswith("HTTP 200 OK")
        states.append(body_of(shown)["state"])
        if states[-1] == "completed":
            break
    assert states[-1] == "completed", states
    assert prompt.calls[0]["initialvalue"] == job_id
    assert body_of(shown)["job_id"] == job_id and body_of(shown)["progress"] == 1.0

    shot = screenshot(app, display, tmp_path / "cylindria-tester.png")
    print(f"\nscreenshot: {shot}")
    assert shot.stat().st_size > 0


def test_api_key_is_sent_only_when_filled(make_app, clients):
    app = make_app(api_key="")

    shown = press(app, app.server_status_button)
    assert shown.splitlines()[1].startswith("HTTP 401 Unauthorized")
    assert body_of(shown)["error"]["code"] == "unauthorized"
    assert app.status_var.get() == "HTTP 401 Unauthorized from GET /serverstatus"

    fill(app.key_entry, API_KEY)
    shown = press(app, app.server_status_button)
    assert shown.splitlines()[1].startswith("HTTP 200 OK")
    # A new key is a new client; the next call with the same fields reuses it.
    press(app, app.server_status_button)
    first, second, third = clients
    assert first is not second and second is third
    with pytest.raises(CylindriaError) as closed:
        first.gpus()
    assert closed.value.code == "closed"


def test_closing_the_window_closes_its_client(make_app, clients):
    app = make_app()
    assert "HTTP 200 OK" in press(app, app.server_status_button)
    assert clients[0].gpus()["gpus"]  # still open while the window is
    app.close()
    with pytest.raises(CylindriaError) as closed:
        clients[0].gpus()
    assert closed.value.code == "closed"


def test_unknown_job_shows_the_404(make_app):
    app = make_app(askstring=Prompt("  no-such-job ", accept_shown=False))
    shown = press(app, app.job_status_button)
    assert shown.splitlines()[0].endswith("/jobstatus/no-such-job/")
    assert shown.splitlines()[1].startswith("HTTP 404 Not Found")
    assert body_of(shown)["error"]["code"] == "job_not_found"


def test_missing_server_is_a_message_and_the_window_stays_usable(make_app, service):
    app = make_app(port=free_port_run(1))

    shown = press(app, app.server_status_button)

    reached = f"Cylindria at http://127.0.0.1:{app.port_var.get()} could not be reached"
    assert reached in shown and "Traceback" not in shown
    assert app.status_var.get().startswith(reached)
    assert not app.server_status_button.instate(["disabled"])
    # Still responsive: a second click is answered the same way, and so is a fix.
    assert reached in press(app, app.server_status_button)
    fill(app.port_entry, str(service.port))
    assert "HTTP 200 OK" in press(app, app.server_status_button)


@pytest.fixture
def odd_server() -> Iterator[Callable[[bytes | None], int]]:
    """A loopback port that answers in something other than HTTP, or never answers."""
    sockets: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(answer: bytes | None) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        sockets.append(listener)
        if answer is not None:
            def serve() -> None:
                # Every connection, until the listener shuts: the client tries again
                # once on a fresh connection when a GET is hung up on.
                while True:
                    try:
                        conn, _ = listener.accept()
                    except OSError:
                        return
                    with conn:
                        # Read the whole request first: closing on unread bytes would
                        # reset the connection instead of answering.
                        request = b""
                        while b"\r\n\r\n" not in request and len(request) < 65536:
                            chunk = conn.recv(65536)
                            if not chunk:
                                break
                            request += chunk
                        conn.sendall(answer)
            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            threads.append(thread)
        # With answer None nothing accepts: the kernel completes the connection and
        # the request waits for an answer that never comes.
        return listener.getsockname()[1]
    yield start
    for listener in sockets:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the thread waiting in accept()
        listener.close()
    for thread in threads:
        thread.join(timeout=5)


def test_a_window_closed_during_a_call_closes_its_client_when_the_call_ends(
        make_app, odd_server, clients):
    app = make_app(port=odd_server(None), timeout=1.5)
    app.server_status_button.invoke()
    wait_for(lambda: clients, "the call to start")
    loops = [t for t in threading.enumerate() if t.name == "cylindria-client"]
    assert len(loops) == 1

    app.close()

    # The call in flight keeps its client until the service gives up on it.
    assert loops[0].is_alive()
    wait_for(lambda: not loops[0].is_alive(), "the client's thread to stop")
    with pytest.raises(CylindriaError) as closed:
        clients[0].gpus()
    assert closed.value.code == "closed"


@pytest.mark.parametrize("answer, expected", [
    (b"SSH-2.0-OpenSSH_9.2\r\n", "http://127.0.0.1:{port} did not answer in HTTP (Bad "
                                   "status line): is that Cylindria's address?"),
    (b"", "Cylindria at http://127.0.0.1:{port} could not be reached (Server "
          "disconnected)."),
    (None, "Cylindria at http://127.0.0.1:{port} did not answer in time."),
], ids=["not-http", "hang-up", "silent"])
def test_a_port_that_is_not_cylindria_is_a_message(make_app, odd_server, answer, expected):
    port = odd_server(answer)
    app = make_app(port=port, timeout=0.5)
    shown = press(app, app.server_status_button)
    assert expected.format(port=port) in shown and "Traceback" not in shown
    assert not app.busy and not app.server_status_button.instate(["disabled"])


@pytest.mark.parametrize("content, expected", [
    ("{not json", "is not a JSON workflow: Expecting property name"),
    (b"\xff\xfe\x00garbage", "is not UTF-8 text"),
    ("[1, 2, 3]", "not a workflow: expected an object of nodes, got list"),
    (None, "Cannot read"),
])
def test_bad_workflow_file_is_a_message_and_nothing_is_sent(make_app, calls, tmp_path,
                                                            content, expected):
    path = tmp_path / "workflow.json"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    app = make_app(askopenfilename=FileDialog(path))

    shown = press(app, app.start_job_button)

    assert expected in shown and "Traceback" not in shown
    assert app.status_var.get() == "Workflow not sent."
    assert calls == [] and app.last_job_id is None


def test_cancelled_dialogs_send_nothing(make_app, calls):
    app = make_app(askopenfilename=FileDialog(""), askstring=Prompt(None, accept_shown=False))
    app.start_job_button.invoke()
    assert "cancelled" in app.status_var.get()
    app.attach_button.invoke()
    assert app.status_var.get() == "Attach files cancelled: no file chosen."
    assert app.attached == {}
    app.job_status_button.invoke()
    assert "cancelled" in app.status_var.get()
    app.root.update()
    assert calls == [] and not app.busy


@pytest.mark.parametrize("field, value, expected", [
    ("port", "0", "Port must be a whole number from 1 to 65535 (got '0')"),
    ("port", "65536", "Port must be a whole number from 1 to 65535 (got '65536')"),
    ("port", "http", "Port must be a whole number from 1 to 65535 (got 'http')"),
    ("gpu", "-1", "Gpu Id must be a whole number, 0 or more (got '-1')"),
    ("gpu", "1.5", "Gpu Id must be a whole number, 0 or more (got '1.5')"),
    ("url", "", "Cylindria URL is empty"),
    ("url", "http://127.0.0.1:8000", "put the port in the Port field"),
])
def test_fields_are_validated_before_any_call(make_app, calls, field, value, expected):
    app = make_app()
    fill({"port": app.port_entry, "gpu": app.gpu_entry, "url": app.url_entry}[field], value)
    for button in (app.server_status_button, app.start_job_button, app.job_status_button):
        assert expected in press(app, button)
    assert calls == []


def test_parse_target_builds_the_base_url():
    assert parse_target("127.0.0.1", "8000", "1", " k ") == tester.Target(
        "http://127.0.0.1:8000", 1, "k")
    assert parse_target("https://gpu.example/cylindria/", "443", "0", "").url(
        "/serverstatus", {"GpuId": "0"}) == \
        "https://gpu.example:443/cylindria/serverstatus?GpuId=0"
    assert parse_target("http://[::1]", "8000", "0", "").base_url == "http://[::1]:8000"
    for bad in ("ftp://host", "http://", "http://host?x=1"):
        with pytest.raises(InputError):
            parse_target(bad, "8000", "0", "")


def test_without_a_display_the_command_says_so(tmp_path):
    env = clean_env()
    env.pop("DISPLAY", None)
    result = subprocess.run([*CYLINDRIA, "tester"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("cylindria tester: cannot open a window:")
    assert "Traceback" not in result.stderr


def test_without_tkinter_the_command_says_what_to_install(tmp_path):
    # sys.modules[name] = None makes that import fail, as on a Python without python3-tk.
    probe = ("import sys; sys.modules['tkinter'] = None\n"
             "from cylindria.cli import main\n"
             "sys.exit(main(['tester']))\n")
    result = subprocess.run([sys.executable, "-c", probe], env=clean_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == ("cylindria tester needs Tkinter. On Debian or Ubuntu: "
                                     "apt-get install python3-tk")


def test_launcher_without_the_dependencies_says_how_to_get_them(tmp_path):
    # -S hides the virtual environment's site-packages, and with them aiohttp.
    result = subprocess.run([sys.executable, "-S", str(ROOT / "cylindria_tester.py")],
                            env=clean_env(), cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"cylindria tester needs Cylindria's dependencies (aiohttp is missing from "
        f"{sys.executable}): run `make install`, then `.venv/bin/cylindria tester`; or "
        "`pip install -e .` in this Python.\n")


def test_the_tester_imports_the_client_and_nothing_of_the_server():
    probe = ("import json, sys, cylindria.desktop\n"
             "print(json.dumps(sorted(m for m in sys.modules if m.startswith('cylindria.'))))\n")
    result = subprocess.run([sys.executable, "-c", probe], env=clean_env(),
                            capture_output=True, text=True, timeout=60, check=True)
    loaded = json.loads(result.stdout)
    assert "cylindria.client.sync" in loaded
    assert [m for m in loaded if not m.startswith(("cylindria.client", "cylindria.desktop"))] \
        == []


@pytest.mark.parametrize("command", [
    # The checkout's launcher, run by the virtual environment's Python.
    [sys.executable, str(ROOT / "cylindria_tester.py")],
    [*CYLINDRIA, "tester"],
], ids=["launcher", "cli"])
def test_launchers_open_the_window(display, tmp_path, command):
    xdotool = shutil.which("xdotool")
    assert xdotool, "xdotool is not installed (Debian: apt-get install xdotool)"
    log = tmp_path / "tester.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(command, cwd=tmp_path, env=clean_env(DISPLAY=display),
                                stdout=handle, stderr=subprocess.STDOUT)
        try:
            found: list[str] = []

            def window_shown() -> bool:
                result = subprocess.run([xdotool, "search", "--onlyvisible", "--pid",
                                         str(proc.pid), "--name", "^Cylindria tester$"],
                                        capture_output=True, text=True, timeout=10)
                found[:] = result.stdout.split()
                return bool(found)
            wait_for(window_shown, "the tester window", [(proc, log)])
        finally:
            stop(proc, signal.SIGTERM)
    assert "Traceback" not in log.read_text(errors="replace")


# -- input files -------------------------------------------------------------------------

PHOTO = ROOT / "docs" / "examples" / "photo.png"


def load_image(name: str = "photo.png") -> dict[str, Any]:
    """LoadImage -> ImageInvert -> SaveImage: the job needs the file called `name`."""
    return {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                        "filename_prefix": "tester"}}}


def write_workflow(folder: Path, workflow: dict[str, Any]) -> Path:
    path = folder / "workflow.json"
    path.write_text(json.dumps(workflow))
    return path


def test_attached_file_travels_with_the_job(make_app, display, service, tmp_path):
    dialog = FilesDialog(PHOTO)
    app = make_app(askopenfilename=FileDialog(write_workflow(tmp_path, load_image())),
                   askopenfilenames=dialog)

    app.attach_button.invoke()
    size = PHOTO.stat().st_size
    assert dialog.calls[0]["parent"] is app.root
    assert app.attached == {PHOTO: size}
    assert app.files_var.get() == f"photo.png ({size:,} bytes)"

    shown = press(app, app.start_job_button)
    shot = screenshot(app, display, tmp_path / "cylindria-tester-attach.png")
    print(f"\nscreenshot: {shot}")

    lines = shown.splitlines()
    assert lines[1].startswith("HTTP 202 Accepted") and lines[2] == "Files sent: photo.png"
    job_id = body_of(shown)["job_id"]
    assert job_id == app.last_job_id
    url = f"http://127.0.0.1:{service.port}/jobstatus/{job_id}/"
    status, job = http_get(url, {"X-API-Key": API_KEY})
    assert status == 200
    assert [{k: item[k] for k in ("name", "size", "media_type")} for item in job["inputs"]] \
        == [{"name": "photo.png", "size": size, "media_type": "image/png"}]
    wait_for(lambda: http_get(url, {"X-API-Key": API_KEY})[1]["state"] == "completed",
             "the job with its input file to complete")
    # The files stay attached for the next job until cleared.
    assert app.attached == {PHOTO: size}


def test_a_file_no_node_uses_gets_the_servers_refusal(make_app, tmp_path):
    app = make_app(askopenfilename=FileDialog(write_workflow(tmp_path, workflows.quick())),
                   askopenfilenames=FilesDialog(PHOTO))
    app.attach_button.invoke()

    shown = press(app, app.start_job_button)

    assert shown.splitlines()[1].startswith("HTTP 422")
    assert shown.splitlines()[2] == "Files sent: photo.png"
    assert body_of(shown)["error"]["code"] == "invalid_input"


def test_two_files_of_one_name_are_refused(make_app, calls, tmp_path):
    first, second = tmp_path / "a" / "photo.png", tmp_path / "b" / "photo.png"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"png")
    dialog = FilesDialog(first, second)
    app = make_app(askopenfilenames=dialog)

    app.attach_button.invoke()

    shown = app.response_text()
    assert shown.startswith(f"Two files are named photo.png ({first} and {second})")
    assert app.status_var.get() == "Files not attached."
    assert app.attached == {} and app.files_var.get() == tester.NO_FILES

    # One at a time: the same file picked again is no second file; another of its name
    # is refused, and the first stays attached.
    dialog.paths = (str(first),)
    app.attach_button.invoke()
    app.attach_button.invoke()
    assert app.attached == {first: 3} and app.status_var.get().startswith("1 file(s)")
    dialog.paths = (str(second),)
    app.attach_button.invoke()
    assert "Two files are named photo.png" in app.response_text()
    assert app.attached == {first: 3} and app.files_var.get() == "photo.png (3 bytes)"
    app.clear_button.invoke()
    assert app.attached == {} and app.files_var.get() == tester.NO_FILES
    assert calls == []


def test_unreadable_files_are_refused(make_app, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(PHOTO.read_bytes())
    dialog = FilesDialog(tmp_path / "missing.png")
    app = make_app(askopenfilename=FileDialog(write_workflow(tmp_path, load_image())),
                   askopenfilenames=dialog)

    app.attach_button.invoke()
    assert app.response_text() == (f"Cannot read {tmp_path / 'missing.png'}: "
                                   "No such file or directory.")

    assert app.attached == {}

    # Attached, then gone before Start Job: the client finds out before sending.
    dialog.paths = (str(photo),)
    app.attach_button.invoke()
    photo.unlink()
    shown = press(app, app.start_job_button)
    assert shown.splitlines()[-1] == (f"The input file {str(photo)!r} cannot be read: "
                                      "No such file or directory.")
    assert app.status_var.get() == shown.splitlines()[-1]
    assert "Traceback" not in shown and not app.busy and app.last_job_id is None


def test_a_refusal_before_the_files_are_sent_is_a_message(make_app, odd_server, tmp_path):
    # Cylindria answers 413 as soon as a file passes its limit and closes the connection
    # while the rest is still coming. Whether the client reads that answer before the
    # connection is reset depends on timing: each way, the window says what happened.
    big = tmp_path / "photo.png"
    big.write_bytes(bytes(32 * 1024 * 1024))  # more than loopback buffers take at once
    port = odd_server(b"HTTP/1.1 413 Request Entity Too Large\r\nConnection: close\r\n"
                      b"Content-Length: 0\r\n\r\n")
    app = make_app(port=port, timeout=2.0,
                   askopenfilename=FileDialog(write_workflow(tmp_path, load_image())),
                   askopenfilenames=FilesDialog(big))
    app.attach_button.invoke()

    shown = press(app, app.start_job_button)

    lines = shown.splitlines()
    if lines[1].startswith("HTTP 413 Request Entity Too Large"):
        assert lines[2:] == ["Files sent: photo.png", "", "HTTP 413: no body"]
        assert app.last_job_id is not None
    else:  # reset while sending, or left waiting for an answer the reset lost
        assert lines[1] == "" and len(lines) == 3 and app.last_job_id is None
        assert lines[2].startswith((f"Cylindria at http://127.0.0.1:{port} could not be "
                                    "reached (", f"Cylindria at http://127.0.0.1:{port} "
                                    "did not answer in time."))
        assert lines[2].endswith(tester.CUT_SHORT)
    assert "Traceback" not in shown and not app.busy
