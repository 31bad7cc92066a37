"""Command line: `cylindria serve | simulate` (argv -> Settings -> run), and the client's
`run | status | wait | cancel` (in `runner`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .config import (
    DEFAULT_COMFY_URL,
    DEFAULT_DEV_SAVE_DIR,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_STATE_FILE,
    LOG_LEVELS,
    MAX_GPUS,
    Settings,
    load_settings,
)
from .errors import CannotListen, ConfigError, StateFileError

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("cylindria")

# Where `cylindria demo` (and so `make run`) puts its simulated GPUs.
DEMO_SIM_PORT = 18188

# Flags of `simulate` and `demo` that set the SimSettings field they are stored under.
SIM_COST_FLAGS = (("--step-seconds", "step_seconds"),
                  ("--model-load-seconds", "model_load_seconds"),
                  ("--vram-gb", "vram_budget_gib"))

SERVE_FLAGS = ("host", "port", "comfy_url", "num_gpus", "dev_mode", "dev_save_dir",
               "log_level", "insecure_no_auth", "default_gpu", "state_file", "no_state",
               "database_url", "node_name", "advertise_url")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cylindria", description="A job API in front of the ComfyUI instances "
                                      "of a multi-GPU host.")
    parser.add_argument("--version", action="version", version=f"cylindria {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the service (the default command)")
    add_serve_flags(serve)

    demo = sub.add_parser("demo", help="the service in front of simulated GPUs, in one "
                                       "process (what `make run` starts)")
    add_serve_flags(demo)
    demo.add_argument("--sim-port", type=int, default=DEMO_SIM_PORT,
                      help=f"port of simulated GPU 0 (default {DEMO_SIM_PORT}: not ComfyUI's "
                           "8188, so a real ComfyUI is never used by mistake)")
    demo.add_argument("--step-seconds", type=float, default=None,
                      help="seconds per simulated sampler step (default 0.25)")
    add_model_flags(demo)

    sub.add_parser("tester", help="open the desktop tester (a small Tkinter window)")

    sim = sub.add_parser("simulate", help="run simulated ComfyUI instances, one per GPU")
    sim.add_argument("--gpus", type=int, default=2, help="how many GPUs to simulate (1..8, "
                     "default 2)")
    sim.add_argument("--base-port", type=int, default=8188,
                     help="port of GPU 0; GPU n listens on base port + n (default 8188)")
    sim.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sim.add_argument("--step-seconds", type=float, default=None,
                     help="seconds per sampler step; 0 runs jobs instantly (default 0.25)")
    sim.add_argument("--models", default=None,
                     help="comma-separated checkpoint names the loader accepts")
    add_model_flags(sim)
    sim.add_argument("--output-dir", type=Path, default=None,
                     help="where images are written (default: a temporary folder)")
    sim.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    add_client_commands(sub)
    return parser


CLIENT_COMMANDS = ("run", "status", "wait", "cancel")


def add_client_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The commands that call a running Cylindria through its API (`runner`)."""
    run = sub.add_parser("run", help="submit a workflow, show its progress, download "
                                     "its outputs")
    run.add_argument("workflow", metavar="WORKFLOW.json",
                     help="an API-format workflow (ComfyUI: Workflow > Export (API))")
    run.add_argument("--input", action="append", default=[], metavar="NAME=FILE",
                     help="a file the workflow names NAME, sent with it (repeatable)")
    run.add_argument("--gpu", default="auto", help="a GPU number, or auto (the default)")
    run.add_argument("--priority", type=int, default=None, help="-1000..1000 (default 0)")
    run.add_argument("--job-id", default=None,
                     help="default: the workflow's file name and a random suffix")
    run.add_argument("--out", default="outputs", metavar="DIR",
                     help="where the outputs are saved (default ./outputs)")
    status = sub.add_parser("status", help="print a job's status")
    wait = sub.add_parser("wait", help="wait for a job to finish, print its status")
    wait.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                      help="give up after this long (default: wait as long as it takes)")
    cancel = sub.add_parser("cancel", help="cancel a job")
    for command in (status, wait, cancel):
        command.add_argument("job_id", metavar="JOB_ID")
    for command in (run, status, wait, cancel):
        command.add_argument("--url", default=None,
                             help="the service (env CYLINDRIA_URL, default "
                                  "http://127.0.0.1:8000)")
        command.add_argument("--key", default=None,
                             help="its API key (env CYLINDRIA_API_KEY)")
    run.add_argument("--json", action="store_true",
                     help="print the final status as JSON instead of the progress bar")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-load-seconds", type=float, default=None, metavar="SECONDS",
                        help="seconds a simulated GPU takes to load a model file it does "
                             "not hold in VRAM (default 0)")
    parser.add_argument("--vram-gb", dest="vram_budget_gib", type=float, default=None,
                        metavar="GIB",
                        help="GiB of VRAM model files may fill on each simulated GPU before "
                             "the least recently used are unloaded (default 0: unlimited)")


def sim_costs(ns: argparse.Namespace) -> dict[str, float]:
    """The SIM_COST_FLAGS given on the command line, by SimSettings field."""
    return {name: value for _, name in SIM_COST_FLAGS
            if (value := getattr(ns, name)) is not None}


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    # default=None everywhere: a flag left out must not hide the environment.
    parser.add_argument("--host", default=None,
                        help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port to listen on (default {DEFAULT_PORT})")
    parser.add_argument("--comfy-url", dest="comfy_url", default=None,
                        help="ComfyUI of GPU 0; GPU n is at its port + n "
                             f"(env COMFYUI_BASE_URL, default {DEFAULT_COMFY_URL})")
    parser.add_argument("--numberOfGpus", "--number-of-gpus", dest="num_gpus", type=int,
                        default=None,
                        help=f"GPUs behind this server, 1..{MAX_GPUS} "
                             "(env CYLINDRIA_NUM_GPUS, default 1)")
    parser.add_argument("--dev", dest="dev_mode", action="store_const", const=True,
                        default=None,
                        help="save every incoming workflow as JSON (env CYLINDRIA_DEV_MODE)")
    parser.add_argument("--dev-save-dir", dest="dev_save_dir", default=None,
                        help="where --dev saves workflows (env CYLINDRIA_DEV_SAVE_DIR, "
                             f"default {DEFAULT_DEV_SAVE_DIR})")
    parser.add_argument("--default-gpu", dest="default_gpu", default=None,
                        help="what a missing GpuId means: a GPU number or 'auto' "
                             "(env CYLINDRIA_DEFAULT_GPU, default 0)")
    parser.add_argument("--log-level", dest="log_level", choices=LOG_LEVELS, default=None,
                        help="default info")
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--state-file", dest="state_file", default=None,
                       help="where jobs are kept across restarts (env CYLINDRIA_STATE_FILE, "
                            f"default {DEFAULT_STATE_FILE})")
    state.add_argument("--no-state", dest="no_state", action="store_const", const=True,
                       default=None, help="keep jobs in memory only: a restart forgets them")
    parser.add_argument("--database-url", dest="database_url", default=None, metavar="URL",
                        help="keep jobs in PostgreSQL instead of the state file (whose "
                             "path still places the input files): postgresql://USER:"
                             "PASSWORD@HOST:PORT/DATABASE (env CYLINDRIA_DATABASE_URL; "
                             "needs cylindria[postgres])")
    parser.add_argument("--node-name", dest="node_name", default=None, metavar="NAME",
                        help="with --database-url: this Cylindria's name among those "
                             "sharing the database (env CYLINDRIA_NODE_NAME, default the "
                             "host name)")
    parser.add_argument("--advertise-url", dest="advertise_url", default=None, metavar="URL",
                        help="with --database-url: the URL the other nodes are told to "
                             "reach this one at (env CYLINDRIA_ADVERTISE_URL, default "
                             "http://HOST:PORT, a wildcard host being the host name)")
    parser.add_argument("--insecure-no-auth", dest="insecure_no_auth",
                        action="store_const", const=True, default=None,
                        help="allow a non-loopback --host without CYLINDRIA_API_KEY")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help", "--version")):
        args = ["serve", *args]
    ns = parser.parse_args(args)
    if ns.command == "simulate":
        return run_simulate(ns)
    if ns.command in CLIENT_COMMANDS:
        from .runner import main as client_main

        return client_main(ns)
    if ns.command == "tester":
        from .desktop import main as tester_main

        return tester_main()
    flags = {key: getattr(ns, key) for key in SERVE_FLAGS}
    environ = dict(os.environ)
    if ns.command == "demo":
        if not 1 <= ns.sim_port <= 65535 - MAX_GPUS:
            print(f"cylindria: error: --sim-port must be between 1 and {65535 - MAX_GPUS} "
                  f"(got {ns.sim_port})", file=sys.stderr)
            return 2
        flags["comfy_url"] = f"http://127.0.0.1:{ns.sim_port}"
        # The demo's webhooks may go to receivers on this machine.
        environ.setdefault("CYLINDRIA_CALLBACK_ALLOW", "127.0.0.0/8,::1")
    try:
        settings = load_settings(flags, environ)
    except ConfigError as exc:
        print(f"cylindria: error: {exc}", file=sys.stderr)
        return 2
    if ns.command == "demo":
        return run_demo(settings, ns.sim_port, sim_costs(ns))
    return run_serve(settings)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter(LOG_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


class EscapingFormatter(logging.Formatter):
    """One record, one line: what a request carries (paths, header values, job ids) is
    written into messages by many call sites, so the escaping is done here, once, for
    all of them and for aiohttp's access log. A control character or a byte that is no
    UTF-8 shows escaped (a CR LF as `\\r\\n`), and a traceback's lines are indented,
    so no line that does not start a record can pass for one."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = escape_line(self.formatMessage(record))
        # Not cached on the record (as Formatter does): other handlers format their own.
        details = [self.formatException(record.exc_info) if record.exc_info
                   else record.exc_text or "",
                   self.formatStack(record.stack_info) if record.stack_info else ""]
        for block in filter(None, details):
            text += "".join(f"\n  {escape_line(line)}" for line in block.splitlines())
        return text


def escape_line(text: str) -> str:
    """`text` with every character that is not printable escaped, newlines included."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def _escaped(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        # A byte that was no UTF-8, as the request carried it.
        return f"\\x{code - 0xDC00:02x}"
    return char.encode("unicode_escape").decode("ascii")


def run_serve(settings: Settings) -> int:
    from .app import create_app

    configure_logging(settings.log_level)
    log.info("Cylindria %s on http://%s:%d, %d GPU(s): %s", __version__,
             settings.host, settings.port, settings.num_gpus, ", ".join(settings.gpu_urls))
    if not settings.api_key:
        log.info("no CYLINDRIA_API_KEY set: the API is open to anyone who can reach %s",
                 settings.host)
    access_log = log if settings.log_level == "debug" else None
    try:
        asyncio.run(serve(create_app(settings), settings, access_log))
    except (StateFileError, CannotListen) as exc:
        print(f"cylindria: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Only before the signal handlers are in place, early in start-up.
        pass
    return 0


async def serve(app: web.Application, settings: Settings,
                access_log: logging.Logger | None) -> None:
    """Serve `app` until SIGINT or SIGTERM, then stop it gracefully.

    aiohttp's runner rather than `web.run_app`, which does the same but keeps its server
    out of reach: the request-head timeout has to be put on that server.
    """
    from .web.connections import raise_descriptor_limit
    from .web.serving import start_server

    # Before the server starts: its connection limits are derived from this one.
    raise_descriptor_limit()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        runner = await start_server(app, settings, access_log=access_log)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_demo(settings: Settings, sim_port: int, sim_options: dict[str, float]) -> int:
    """Simulated GPUs on sim_port.. and the service in front, in this one process;
    sim_options are SimSettings fields, a negative one counting as 0."""
    from .addresses import ports_free
    from .app import create_app
    from .simulator import SimSettings
    from .simulator import serve as simulate

    configure_logging(settings.log_level)
    wanted = [("the simulator", "127.0.0.1", port)
              for port in range(sim_port, sim_port + settings.num_gpus)]
    wanted.append(("Cylindria", settings.host, settings.port))
    taken = [f"{host}:{port} ({who})" for who, host, port in wanted
             if not ports_free(host, port, 1)]
    if taken:
        print(f"cylindria: error: in use already: {', '.join(taken)}; stop what listens "
              "there, or choose other ports (make run SIM_PORT=... PORT=...)", file=sys.stderr)
        return 1
    sim_settings = SimSettings(**{name: max(value, 0.0)  # type: ignore[arg-type]
                                  for name, value in sim_options.items()})
    log.info("simulated ComfyUI: %d GPU(s) from port %d; Cylindria: http://%s:%d/",
             settings.num_gpus, sim_port, settings.host, settings.port)

    async def both() -> None:
        sim = asyncio.create_task(simulate("127.0.0.1", sim_port, settings.num_gpus,
                                           sim_settings), name="simulator")
        service = asyncio.create_task(serve(create_app(settings), settings, None),
                                      name="service")
        done, _ = await asyncio.wait({sim, service}, return_when=asyncio.FIRST_COMPLETED)
        for task in (sim, service):
            task.cancel()
        await asyncio.gather(sim, service, return_exceptions=True)
        for task in done:
            task.result()  # the first to end says why

    try:
        asyncio.run(both())
    except (StateFileError, CannotListen) as exc:
        print(f"cylindria: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cylindria: error: the simulator stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def run_simulate(ns: argparse.Namespace) -> int:
    from .simulator import DEFAULT_MODELS, SimSettings, serve

    configure_logging(ns.log_level)
    if not 1 <= ns.gpus <= MAX_GPUS:
        print(f"cylindria: error: --gpus must be between 1 and {MAX_GPUS} (got {ns.gpus})",
              file=sys.stderr)
        return 2
    if not 1 <= ns.base_port <= 65535 - ns.gpus + 1:
        print(f"cylindria: error: --base-port must be between 1 and {65536 - ns.gpus} "
              f"(got {ns.base_port})", file=sys.stderr)
        return 2
    options: dict[str, object] = {"output_dir": ns.output_dir}
    for flag, name in SIM_COST_FLAGS:
        value = getattr(ns, name)
        if value is not None and value < 0:
            print(f"cylindria: error: {flag} must be 0 or more", file=sys.stderr)
            return 2
    options.update(sim_costs(ns))
    models = tuple(m.strip() for m in (ns.models or "").split(",") if m.strip())
    options["models"] = models or DEFAULT_MODELS
    settings = SimSettings(**options)  # type: ignore[arg-type]
    try:
        asyncio.run(_run_until_signal(serve(ns.host, ns.base_port, ns.gpus, settings)))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        last = ns.base_port + ns.gpus - 1
        ports = f"port {ns.base_port}" if ns.gpus == 1 else f"ports {ns.base_port}..{last}"
        print(f"cylindria: error: the simulator cannot listen on {ns.host} {ports} "
              f"({os.strerror(exc.errno).lower() if exc.errno else exc}): stop what uses "
              "them, or choose another "
              "--base-port", file=sys.stderr)
        return 1
    return 0


async def _run_until_signal(coro: object) -> None:
    task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("simulator stopped")
