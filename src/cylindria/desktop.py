"""Desktop tester: a small Tkinter window that calls Cylindria's API by hand."""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any

from .client import Client, CylindriaError
from .client.aio import quote
from .desktop_form import InputError, Target, attach, load_workflow, parse_target

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
# The client's whole-call limit: an upload of large input files counts in it.
DEFAULT_TIMEOUT = 30.0
# Long enough for the worker's answer to feel immediate, short enough to cost nothing.
POLL_MS = 30


Action = Callable[[Client], Mapping[str, Any]]


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
    code: str = ""  # the client's error code when no answer came

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


def new_job_id() -> str:
    """A random job id within the service's rule (letters, digits, '.', '_', '-')."""
    return f"tester-{uuid.uuid4().hex[:12]}"


def perform(client: Client, method: str, url: str, action: Action) -> Reply:
    """Run one client call and describe its outcome; the client's errors become the
    answer they carried, or the reason no answer came."""
    started = time.monotonic()
    try:
        body = action(client)
    except CylindriaError as exc:
        seconds = time.monotonic() - started
        if not exc.status:  # nothing came back, or nothing was sent
            return Reply(method, url, error=exc.message, seconds=seconds, code=exc.code)
        shown = pretty(exc.body) if exc.body else exc.message
        return Reply(method, url, status=exc.status, reason=_phrase(exc.status),
                     body=shown, seconds=seconds)
    status = client.last_status
    return Reply(method, url, status=status, reason=_phrase(status), body=pretty(body),
                 seconds=time.monotonic() - started)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def pretty(body: Mapping[str, Any]) -> str:
    return json.dumps(body, indent=2, ensure_ascii=False)


# What most often cuts a job with large files short, which the client cannot tell apart
# from other lost connections.
CUT_SHORT = ("If Cylindria is up there, a file over its size limit (100 MiB by default) is "
             "the usual cause: it refuses the form before the rest arrives.")
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
        # The client of the last target, made and replaced on the worker thread; the
        # lock settles who closes it when the window closes during a call.
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._client_for: tuple[str, str] | None = None
        self._in_flight = False

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
        self._run(f"Asking GPU {target.gpu_id} for its status…", "GET", url, target,
                  lambda cy: cy.server_status(target.gpu_id))

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
        # attach() keeps names unique, and the form names each file by its name.
        inputs = {path.name: path for path in self.attached}

        def remember(reply: Reply) -> None:
            # Any HTTP answer means the service has a record of the id, even a refusal.
            if reply.status is not None:
                self.last_job_id = job_id
                self.last_job_var.set(f"Last job: {job_id}")

        names = "".join(f", {path.name}" for path in self.attached)
        self._run(f"Submitting {Path(chosen).name}{names} as {job_id}…", "PUT", url, target,
                  lambda cy: cy.submit(job_id, workflow, gpu=target.gpu_id,
                                       inputs=inputs or None),
                  files=list(inputs), then=remember)

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
        url = target.url(f"/jobstatus/{quote(job_id)}/")
        self._run(f"Asking about {job_id}…", "GET", url, target,
                  lambda cy: cy.status(job_id))

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

    def _run(self, waiting: str, method: str, url: str, target: Target, action: Action,
             *, files: list[str] | None = None,
             then: Callable[[Reply], None] | None = None) -> None:
        self._set_busy(True)
        self.status_var.set(waiting)
        with self._lock:
            self._in_flight = True

        def work() -> None:
            try:
                reply = perform(self._client_of(target), method, url, action)
                if files and reply.status is not None:
                    reply = replace(reply, note=f"Files sent: {', '.join(files)}")
                elif files and reply.code == "unreachable":
                    reply = replace(reply, error=f"{reply.error} {CUT_SHORT}")
            except Exception as exc:
                # The client turns every failure into CylindriaError; anything else is a
                # bug, and it must still reach the window or the buttons would stay
                # disabled.
                log.exception("%s %s failed", method, url)
                reply = Reply(method, url, error=f"Unexpected error: {exc!r}")
            finally:
                with self._lock:
                    self._in_flight = False
                    left = self._take_client() if self._closed else None
                if left is not None:
                    left.close()
            self._replies.put((reply, then))

        threading.Thread(target=work, name=f"tester {method}", daemon=True).start()
        self._schedule_poll()

    def _client_of(self, target: Target) -> Client:
        """The client for `target`, made anew when the URL or the key changed; called on
        the worker thread, one call at a time."""
        wanted = (target.base_url, target.api_key)
        with self._lock:
            if self._client_for == wanted and self._client is not None:
                return self._client
            old = self._take_client()
            self._client = Client(target.base_url, target.api_key or None,
                                  timeout=self.timeout)
            self._client_for = wanted
            client = self._client
        if old is not None:
            old.close()
        return client

    def _take_client(self) -> Client | None:
        client, self._client, self._client_for = self._client, None, None
        return client

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
        """Destroy the window and close the client; a call still in flight finishes on
        its worker thread, which closes the client then."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            client = None if self._in_flight else self._take_client()
        if client is not None:
            client.close()
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
