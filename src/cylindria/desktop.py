"""Desktop tester: a small Tkinter window that calls Cylindria's API by hand."""

from __future__ import annotations

import http.client
import json
import logging
import queue
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any

from .desktop_form import InputError, attach, load_workflow, multipart_form

try:
    import tkinter as tk
    from tkinter import filedialog, scrolledtext, simpledialog, ttk
    from tkinter import font as tkfont
except ImportError:  # pragma: no cover - depends on how Python was packaged
    # Debian and Ubuntu ship Tkinter apart from Python; only this module needs it, so
    # `cylindria serve` keeps working and the tester says what to install instead of
    # ending in a traceback.
    raise SystemExit("cylindria tester needs Tkinter. On Debian or Ubuntu: "
                     "apt-get install python3-tk") from None

log = logging.getLogger(__name__)

TITLE = "Cylindria tester"
DEFAULT_URL = "http://127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_TIMEOUT = 10.0
# Long enough for the worker's answer to feel immediate, short enough to cost nothing.
POLL_MS = 30
WHOLE_NUMBER = re.compile(r"-?[0-9]+")


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go, validated from the form."""

    base_url: str
    gpu_id: int
    api_key: str

    def url(self, path: str, query: dict[str, str] | None = None) -> str:
        suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
        return f"{self.base_url}{path}{suffix}"


@dataclass(frozen=True, slots=True)
class Reply:
    """One finished call: an HTTP answer, or the reason there was none."""

    method: str
    url: str
    status: int | None = None
    reason: str = ""
    body: str = ""
    error: str | None = None
    seconds: float = 0.0
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def render(self) -> str:
        lines = [f"{self.method} {self.url}"]
        if self.status is None:
            lines += ["", self.error or "No answer."]
        else:
            lines += [f"HTTP {self.status} {self.reason}".rstrip()
                      + f"   ({self.seconds * 1000:.0f} ms)", *filter(None, [self.note]),
                      "", self.body]
        return "\n".join(lines)


def parse_target(url: str, port: str, gpu_id: str, api_key: str) -> Target:
    """Check the form's fields; raise InputError with a sentence naming the field."""
    text = url.strip()
    if not text:
        raise InputError("Cylindria URL is empty: enter one such as http://127.0.0.1.")
    if "://" not in text:
        text = f"http://{text}"
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"Cylindria URL must look like http://host (got {url.strip()!r}).")
    try:
        url_port = parts.port
    except ValueError:
        url_port = -1
    if url_port is not None or parts.query or parts.fragment or parts.username:
        raise InputError("Cylindria URL must be only scheme and host, such as "
                         "http://127.0.0.1; put the port in the Port field.")
    port_number = _whole_number(port)
    if port_number is None or not 1 <= port_number <= 65535:
        raise InputError(f"Port must be a whole number from 1 to 65535 (got {port.strip()!r}).")
    gpu = _whole_number(gpu_id)
    if gpu is None or gpu < 0:
        raise InputError(f"Gpu Id must be a whole number, 0 or more (got {gpu_id.strip()!r}).")
    host = parts.hostname
    if ":" in host:  # an IPv6 literal needs its brackets back next to a port
        host = f"[{host}]"
    # A path is kept so a Cylindria published under a prefix by a proxy works too.
    base = f"{parts.scheme}://{host}:{port_number}{parts.path.rstrip('/')}"
    return Target(base, gpu, api_key.strip())


def _whole_number(text: str) -> int | None:
    # int() alone would also take "+3", "3_000" or non-ASCII digits; the form wants
    # plain digits, with a minus sign only so that the message can name it.
    text = text.strip()
    return int(text) if WHOLE_NUMBER.fullmatch(text) else None


def new_job_id() -> str:
    """A random job id within the service's rule (letters, digits, '.', '_', '-')."""
    return f"tester-{uuid.uuid4().hex[:12]}"


def call(method: str, url: str, *, api_key: str = "", body: bytes | bytearray | None = None,
         content_type: str = "application/json", timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """One blocking HTTP call that never raises: failures come back as Reply.error."""
    headers = {"Accept": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    if body is not None:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    started = time.monotonic()
    try:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                status, reason, data = resp.status, resp.reason, resp.read()
        except urllib.error.HTTPError as exc:
            # An error status is still an answer worth showing in full; reading its
            # body can fail like any other read, hence the outer handler.
            with exc:
                status, reason, data = exc.code, exc.reason, exc.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        # HTTPException: something answered on that port, but not in HTTP.
        return Reply(method, url, error=describe_failure(exc, url, timeout),
                     seconds=time.monotonic() - started)
    return Reply(method, url, status=status, reason=str(reason or _phrase(status)),
                 body=pretty(data), seconds=time.monotonic() - started)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def describe_failure(exc: BaseException, url: str, timeout: float) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    where = urllib.parse.urlsplit(url).netloc
    if isinstance(reason, ConnectionRefusedError):
        return (f"Connection refused by {where}: is Cylindria running there? "
                "Check the URL and the port.")
    if isinstance(reason, TimeoutError):
        return f"No answer from {where} within {timeout:g} seconds."
    if isinstance(reason, ConnectionResetError | BrokenPipeError) and reason is not exc:
        # urllib wraps only what fails while sending: the server stopped reading early.
        return (f"{where} closed the connection before the whole request was sent: it "
                "refused the request early, most often because a file is over its size "
                "limit (100 MiB by default).")
    if isinstance(reason, http.client.HTTPException | ConnectionResetError):
        return (f"{where} did not answer in HTTP ({type(reason).__name__}): is that "
                "Cylindria's port?")
    if isinstance(reason, OSError) and reason.strerror:
        return f"Cannot reach {where}: {reason.strerror}."
    return f"Cannot reach {where}: {reason}."


def pretty(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


AskOpenFilename = Callable[..., Any]
AskString = Callable[..., str | None]
NO_FILES = "No files attached: Start Job sends the workflow alone."


class TesterApp:
    """The window. Network calls run on worker threads; only the Tk thread touches widgets.

    `askopenfilename(s)` and `askstring` are the dialogs; tests pass stand-ins for them.
    """

    def __init__(self, root: tk.Tk | None = None, *,
                 askopenfilename: AskOpenFilename = filedialog.askopenfilename,
                 askopenfilenames: AskOpenFilename = filedialog.askopenfilenames,
                 askstring: AskString = simpledialog.askstring,
                 url: str = DEFAULT_URL, port: int = DEFAULT_PORT, gpu_id: int = 0,
                 api_key: str = "", timeout: float = DEFAULT_TIMEOUT) -> None:
        self.root = root if root is not None else tk.Tk()
        self.askopenfilename = askopenfilename
        self.askopenfilenames = askopenfilenames
        self.askstring = askstring
        self.timeout = timeout
        self.last_job_id: str | None = None
        self.attached: dict[Path, int] = {}
        self._replies: queue.Queue[tuple[Reply, Callable[[Reply], None] | None]] = \
            queue.Queue()
        self._busy = False
        self._poll_id: str | None = None
        self._closed = False

        self.url_var = tk.StringVar(self.root, url)
        self.port_var = tk.StringVar(self.root, str(port))
        self.gpu_var = tk.StringVar(self.root, str(gpu_id))
        self.key_var = tk.StringVar(self.root, api_key)
        self.show_key_var = tk.BooleanVar(self.root, False)
        self.last_job_var = tk.StringVar(self.root, "Last job: none yet")
        self.status_var = tk.StringVar(self.root, "Ready.")
        self.files_var = tk.StringVar(self.root, NO_FILES)
        self._build()
        self.root.protocol("WM_DELETE_WINDOW", self.close)

    def _build(self) -> None:
        root = self.root
        root.title(TITLE)
        root.minsize(560, 420)
        style = ttk.Style(root)
        # Tk's "default" theme looks dated on X11; "clam" is built in everywhere.
        if style.theme_use() == "default" and "clam" in style.theme_names():
            style.theme_use("clam")
        root.columnconfigure(0, weight=1)
        root.rowconfigure(3, weight=1)

        form = ttk.LabelFrame(root, text="Connection", padding=(10, 6))
        form.grid(row=0, column=0, sticky="ew", padx=10, pady=(10, 4))
        form.columnconfigure(1, weight=1)
        ttk.Label(form, text="Cylindria URL").grid(row=0, column=0, sticky="w", pady=3)
        self.url_entry = ttk.Entry(form, textvariable=self.url_var, width=32)
        self.url_entry.grid(row=0, column=1, sticky="ew", padx=(8, 16), pady=3)
        ttk.Label(form, text="Port").grid(row=0, column=2, sticky="w", pady=3)
        self.port_entry = ttk.Entry(form, textvariable=self.port_var, width=7)
        self.port_entry.grid(row=0, column=3, sticky="w", padx=(8, 0), pady=3)

        ttk.Label(form, text="API key").grid(row=1, column=0, sticky="w", pady=3)
        key_row = ttk.Frame(form)
        key_row.grid(row=1, column=1, sticky="ew", padx=(8, 16), pady=3)
        key_row.columnconfigure(0, weight=1)
        self.key_entry = ttk.Entry(key_row, textvariable=self.key_var, show="•")
        self.key_entry.grid(row=0, column=0, sticky="ew")
        ttk.Checkbutton(key_row, text="Show", variable=self.show_key_var,
                        command=self._toggle_key).grid(row=0, column=1, padx=(6, 0))
        ttk.Label(form, text="Gpu Id").grid(row=1, column=2, sticky="w", pady=3)
        self.gpu_entry = ttk.Spinbox(form, textvariable=self.gpu_var, from_=0, to=63,
                                     width=5)
        self.gpu_entry.grid(row=1, column=3, sticky="w", padx=(8, 0), pady=3)
        ttk.Label(form, text="The key is sent as X-API-Key when filled in.",
                  foreground="#666").grid(row=2, column=0, columnspan=4, sticky="w")

        actions = ttk.Frame(root, padding=(10, 4))
        actions.grid(row=1, column=0, sticky="ew")
        actions.columnconfigure(3, weight=1)
        self.server_status_button = ttk.Button(actions, text="Server status",
                                               command=self.server_status)
        self.start_job_button = ttk.Button(actions, text="Start Job…",
                                           command=self.start_job)
        self.job_status_button = ttk.Button(actions, text="Job Status…",
                                            command=self.job_status)
        for column, button in enumerate((self.server_status_button, self.start_job_button,
                                         self.job_status_button)):
            button.grid(row=0, column=column, padx=(0, 8))
        ttk.Label(actions, textvariable=self.last_job_var, foreground="#444").grid(
            row=0, column=3, sticky="e")

        files = ttk.LabelFrame(root, text="Input files", padding=(10, 4))
        files.grid(row=2, column=0, sticky="ew", padx=10, pady=4)
        self.attach_button = ttk.Button(files, text="Attach files…", command=self.attach_files)
        self.clear_button = ttk.Button(files, text="Clear files", command=self.clear_files)
        for column, button in enumerate((self.attach_button, self.clear_button)):
            button.grid(row=0, column=column, padx=(0, 8))
        ttk.Label(files, textvariable=self.files_var, foreground="#444",
                  wraplength=400).grid(row=0, column=2, sticky="w")

        shown = ttk.LabelFrame(root, text="Response", padding=(6, 4))
        shown.grid(row=3, column=0, sticky="nsew", padx=10, pady=4)
        shown.columnconfigure(0, weight=1)
        shown.rowconfigure(0, weight=1)
        self.response = scrolledtext.ScrolledText(
            shown, font=tkfont.nametofont("TkFixedFont"), wrap="word", height=18,
            width=80, borderwidth=0, padx=6, pady=4, state="disabled")
        self.response.grid(row=0, column=0, sticky="nsew")

        ttk.Separator(root).grid(row=4, column=0, sticky="ew")
        self.status_label = ttk.Label(root, textvariable=self.status_var, anchor="w",
                                      padding=(10, 3))
        self.status_label.grid(row=5, column=0, sticky="ew")

    # -- the actions -------------------------------------------------------------------

    def server_status(self) -> None:
        target = self._target()
        if target is None:
            return
        url = target.url("/serverstatus", {"GpuId": str(target.gpu_id)})
        self._run(f"Asking GPU {target.gpu_id} for its status…", "GET", url, target)

    def start_job(self) -> None:
        target = self._target()
        if target is None:
            return
        chosen = self.askopenfilename(
            parent=self.root, title="Choose an API-format workflow",
            filetypes=[("JSON workflows", "*.json"), ("All files", "*")])
        if not chosen:  # the dialog returns "" or () when cancelled
            self.status_var.set("Start Job cancelled: no file chosen.")
            return
        try:
            workflow = load_workflow(chosen)
        except InputError as exc:
            self._show_message(str(exc), "Workflow not sent.")
            return
        job_id = new_job_id()
        url = target.url(f"/startjob/{job_id}/", {"GpuId": str(target.gpu_id)})

        def remember(reply: Reply) -> None:
            # Any HTTP answer means the service has a record of the id, even a refusal.
            if reply.status is not None:
                self.last_job_id = job_id
                self.last_job_var.set(f"Last job: {job_id}")

        names = "".join(f", {path.name}" for path in self.attached)
        self._run(f"Submitting {Path(chosen).name}{names} as {job_id}…", "PUT", url, target,
                  body=workflow, files=list(self.attached), then=remember)

    def job_status(self) -> None:
        target = self._target()
        if target is None:
            return
        answer = self.askstring("Job Status", "Job id:", parent=self.root,
                                initialvalue=self.last_job_id or "")
        if answer is None:
            self.status_var.set("Job Status cancelled.")
            return
        job_id = answer.strip()
        if not job_id:
            self._show_message("Enter a job id to ask about.", "No job id given.")
            return
        url = target.url(f"/jobstatus/{urllib.parse.quote(job_id, safe='')}/")
        self._run(f"Asking about {job_id}…", "GET", url, target)

    def attach_files(self) -> None:
        chosen = self.askopenfilenames(parent=self.root, title="Attach files to the next job")
        # A tuple, or one Tcl list string on some Tk builds; "" when cancelled.
        chosen = self.root.tk.splitlist(chosen) if chosen else ()
        if not chosen:
            self.status_var.set("Attach files cancelled: no file chosen.")
            return
        try:
            attached = attach(self.attached, chosen)
        except InputError as exc:
            self._show_message(str(exc), "Files not attached.")
            return
        self._set_files(attached, f"{len(attached)} file(s) attached to the next Start Job.")

    def clear_files(self) -> None:
        self._set_files({}, "Files cleared.")

    def _set_files(self, attached: dict[Path, int], status: str) -> None:
        self.attached = attached
        shown = [f"{path.name} ({size:,} bytes)" for path, size in attached.items()]
        self.files_var.set(", ".join(shown) if shown else NO_FILES)
        self.status_var.set(status)

    # -- plumbing ----------------------------------------------------------------------

    def _target(self) -> Target | None:
        try:
            return parse_target(self.url_var.get(), self.port_var.get(), self.gpu_var.get(),
                                self.key_var.get())
        except InputError as exc:
            self._show_message(str(exc), "Check the connection fields.")
            return None

    def _run(self, waiting: str, method: str, url: str, target: Target, *,
             body: bytes | None = None, files: list[Path] | None = None,
             then: Callable[[Reply], None] | None = None) -> None:
        self._set_busy(True)
        self.status_var.set(waiting)
        timeout = self.timeout

        def work() -> None:
            try:
                sent, content_type = body, "application/json"
                if files:  # checked again: a file may have changed since it was attached
                    sent, content_type = multipart_form(body or b"", attach({}, files))
                reply = call(method, url, api_key=target.api_key, body=sent,
                             content_type=content_type, timeout=timeout)
                if files and reply.status is not None:
                    reply = replace(reply, note=f"Files sent: {', '.join(p.name for p in files)}")
            except InputError as exc:  # a file cannot be read (any more): nothing was sent
                reply = Reply(method, url, error=f"{exc} The job was not sent.")
            except Exception as exc:
                # call() expects every network failure; anything else is a bug, and it
                # must still reach the window or the buttons would stay disabled.
                log.exception("%s %s failed", method, url)
                reply = Reply(method, url, error=f"Unexpected error: {exc!r}")
            self._replies.put((reply, then))

        threading.Thread(target=work, name=f"tester {method}", daemon=True).start()
        self._schedule_poll()

    def _schedule_poll(self) -> None:
        if self._poll_id is None and not self._closed:
            self._poll_id = self.root.after(POLL_MS, self._poll)

    def _poll(self) -> None:
        self._poll_id = None
        try:
            reply, then = self._replies.get_nowait()
        except queue.Empty:
            self._schedule_poll()
            return
        if then is not None:
            then(reply)
        self._set_response(reply.render())
        if reply.status is None:
            self.status_var.set(reply.error or "No answer.")
        else:
            self.status_var.set(f"HTTP {reply.status} {reply.reason} from "
                                f"{reply.method} {urllib.parse.urlsplit(reply.url).path}")
        self._set_busy(False)

    def _set_busy(self, busy: bool) -> None:
        # One call at a time keeps the response area showing the answer to the last click.
        self._busy = busy
        state = ["disabled"] if busy else ["!disabled"]
        for button in (self.server_status_button, self.start_job_button,
                       self.job_status_button):
            button.state(state)
        self.root.configure(cursor="watch" if busy else "")

    def _show_message(self, message: str, status: str) -> None:
        self._set_response(message)
        self.status_var.set(status)

    def _set_response(self, text: str) -> None:
        self.response.configure(state="normal")
        self.response.delete("1.0", "end")
        self.response.insert("1.0", text)
        self.response.configure(state="disabled")

    def _toggle_key(self) -> None:
        self.key_entry.configure(show="" if self.show_key_var.get() else "•")

    def response_text(self) -> str:
        return self.response.get("1.0", "end-1c")

    @property
    def busy(self) -> bool:
        return self._busy

    def close(self) -> None:
        """Destroy the window; a call still in flight finishes on its daemon thread."""
        if self._closed:
            return
        self._closed = True
        if self._poll_id is not None:
            self.root.after_cancel(self._poll_id)
            self._poll_id = None
        self.root.destroy()


def main() -> int:
    try:
        root = tk.Tk()
    except tk.TclError as exc:
        print(f"cylindria tester: cannot open a window: {exc}", file=sys.stderr)
        return 1
    app = TesterApp(root)
    app.url_entry.focus_set()
    root.mainloop()
    return 0
