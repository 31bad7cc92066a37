"""Settings: the one place that reads flags and the environment, and checks them."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from . import nodes
from .addresses import (
    bracket,
    database_url_problem,
    is_loopback,
    parse_allow,
    same_host,
    trusted_networks,
)
from .errors import ConfigError

DEFAULT_COMFY_URL = "http://127.0.0.1:8188"
DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"
DEFAULT_DEV_SAVE_DIR = "./workflows_dev"
DEFAULT_STATE_FILE = "./cylindria-state.sqlite3"
DEFAULT_RETENTION_DAYS = 7.0
DEFAULT_MEMORY_JOBS = 10_000
DEFAULT_MAX_NODES = 20_000
DEFAULT_MAX_HELD = 10_000
DEFAULT_PRIORITY_AGING = 60.0
DEFAULT_MODEL_WINDOW = 8
# A job id runs at most this many attempts (each retry is one); past them a retry is
# refused, and the job is submitted anew under another id.
DEFAULT_MAX_ATTEMPTS = 20
# Event streams one client address may hold, so one client cannot take every slot.
DEFAULT_STREAMS_PER_ADDRESS = 10
# The input store: its size, and the largest file it takes (ComfyUI's own upload limit).
DEFAULT_INPUT_STORE_MAX = 20 * 1024**3
DEFAULT_INPUT_MAX = 100 * 1024**2
SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
# Test hooks that stop the process at a chosen point, to show what a restart recovers.
FAULTS = frozenset({"crash-before-submit", "crash-after-submit"})
MAX_GPUS = 8
# The longest ?wait= CYLINDRIA_MAX_WAIT may allow, in seconds.
MAX_WAIT = 3600
LOG_LEVELS = ("debug", "info", "warning", "error")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
# The wrong-key throttle is per client address, so what stops a guesser with many
# addresses is the key's length. The longest fits the dashboard's sign-in form.
KEY_MIN_LENGTH = 16
KEY_MIN_DISTINCT = 5
KEY_MAX_LENGTH = 128
MAKE_A_KEY = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


# How a setting is named in messages, by how the operator gave it (flag or environment);
# load_settings fills it in while it builds Settings.
_GIVEN_AS: ContextVar[Mapping[str, str] | None] = ContextVar("given_as", default=None)
_BOTH_NAMES = {"comfy_url": "COMFYUI_BASE_URL / --comfy-url",
               "num_gpus": "--numberOfGpus / CYLINDRIA_NUM_GPUS",
               "default_gpu": "--default-gpu / CYLINDRIA_DEFAULT_GPU"}
_FLAG_NAMES = {"comfy_url": "--comfy-url", "num_gpus": "--numberOfGpus",
               "default_gpu": "--default-gpu"}
_ENV_NAMES = {"comfy_url": "COMFYUI_BASE_URL", "num_gpus": "CYLINDRIA_NUM_GPUS",
              "default_gpu": "CYLINDRIA_DEFAULT_GPU"}


def _named(key: str) -> str:
    return (_GIVEN_AS.get() or {}).get(key, _BOTH_NAMES[key])


@dataclass(frozen=True, slots=True)
class Timing:
    """Intervals and timeouts; tests shrink them, operators rarely need to."""

    connect_timeout: float = 3.0
    request_timeout: float = 15.0
    submit_timeout: float = 10.0
    status_timeout: float = 1.8
    status_cache_seconds: float = 1.0
    poll_interval: float = 1.0
    # At most one reconciliation per GPU in this time, however often the listener
    # says the queue changed (it does a few times per job).
    poll_min_gap: float = 0.1
    lost_grace: float = 5.0
    reconnect_initial: float = 0.5
    reconnect_max: float = 10.0
    ws_heartbeat: float = 15.0
    sse_keepalive: float = 15.0
    webhook_timeout: float = 10.0
    webhook_backoff: float = 1.0
    # How often finished jobs past retention are pruned.
    housekeeping_interval: float = 60.0
    # While the state file cannot be written, how often to try again.
    state_retry: float = 2.0
    # How long POST /canceljob waits for ComfyUI before answering (it goes on behind).
    cancel_wait: float = 2.0
    # Client connections: a new one must send a complete request head within
    # `head_timeout`; between requests, one may wait `keepalive_timeout` for the next
    # complete head (so an idle or half-sent one is closed by then). Neither limits a
    # request being answered, nor an event stream.
    head_timeout: float = 10.0
    keepalive_timeout: float = 15.0
    # A request body must arrive within `body_timeout`, plus a second for each
    # `body_min_rate` bytes received (so a large one needs only a steady pace), and must
    # not stop arriving for `body_idle_timeout`: past either it is cut with a 408 and the
    # connection closed. An input URL must deliver its file within `input_fetch_timeout`.
    body_timeout: float = 10.0
    body_min_rate: float = 500.0
    body_idle_timeout: float = 30.0
    input_fetch_timeout: float = 60.0
    # With PostgreSQL: seconds between two writes of this node's row (and GPUs).
    heartbeat_interval: float = nodes.DEFAULT_HEARTBEAT
    node_grace: float = nodes.DEFAULT_NODE_GRACE  # then a dead node's jobs are lost


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service needs to start; built once, never changed."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    comfy_url: str = DEFAULT_COMFY_URL
    num_gpus: int = 1
    api_key: str | None = None
    dev_mode: bool = False
    dev_save_dir: Path = Path(DEFAULT_DEV_SAVE_DIR)
    log_level: str = "info"
    insecure_no_auth: bool = False
    default_gpu: int | str = 0
    webhook_secret: str | None = None
    # GET /metrics without the API key (CYLINDRIA_METRICS_PUBLIC).
    metrics_public: bool = False
    max_event_streams: int = 100
    # Event streams one client address may hold at once, of those
    # (CYLINDRIA_MAX_EVENT_STREAMS_PER_ADDRESS).
    max_event_streams_per_address: int = DEFAULT_STREAMS_PER_ADDRESS
    # ?wait= on /jobstatus and /startjob: requests waiting at once, in all and per client
    # address, and the longest wait in seconds (CYLINDRIA_MAX_WAITERS[_PER_ADDRESS], _WAIT).
    max_waiters: int = 1000
    max_waiters_per_address: int = 100
    max_wait: int = 60
    event_buffer: int = 1000
    # None keeps everything in memory only (--no-state); the command line's default is
    # DEFAULT_STATE_FILE.
    state_file: Path | None = None
    state_sync_full: bool = False
    # PostgreSQL keeps the jobs instead of the state file (--database-url); the input
    # files stay beside the state file's path all the same.
    database_url: str | None = None
    # This Cylindria among those sharing the database, and the URL they reach it at
    # (None: http://HOST:PORT of the service) (--node-name, --advertise-url).
    node_name: str = field(default_factory=nodes.default_node_name)
    advertise_url: str | None = None
    retention_days: float = DEFAULT_RETENTION_DAYS
    memory_jobs: int = DEFAULT_MEMORY_JOBS
    retry_lost: int = 0
    # Attempts one job id may run, the first included (CYLINDRIA_MAX_ATTEMPTS).
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_nodes: int = DEFAULT_MAX_NODES
    # GpuId=auto: jobs a GPU may hold waiting in ComfyUI besides the running one, the
    # most Cylindria holds for GPUs, and the seconds of waiting worth one priority level.
    gpu_prefetch: int = 0
    max_held: int = DEFAULT_MAX_HELD
    priority_aging: float = DEFAULT_PRIORITY_AGING
    # How far down the line the dispatcher looks for a job whose models a GPU holds.
    model_window: int = DEFAULT_MODEL_WINDOW
    # Host names and CIDRs webhooks may reach whatever their address (CYLINDRIA_CALLBACK_ALLOW).
    callback_allow: tuple[str, ...] = ()
    # The reverse proxies in front, by address or CIDR, whose X-Forwarded-For and
    # Forwarded headers name the client (CYLINDRIA_TRUSTED_PROXIES).
    trusted_proxies: tuple[str, ...] = ()
    # Client connections held at once, in all and per client address (0: no cap per
    # address); None derives each from the process's file descriptor limit
    # (CYLINDRIA_MAX_CONNECTIONS, CYLINDRIA_MAX_CONNECTIONS_PER_ADDRESS).
    max_connections: int | None = None
    max_connections_per_address: int | None = None
    # Input files: the store's size (least recently used inputs no job in flight uses
    # go beyond it) and the largest single file (CYLINDRIA_INPUT_STORE_MAX, _INPUT_MAX).
    input_store_max: int = DEFAULT_INPUT_STORE_MAX
    input_max: int = DEFAULT_INPUT_MAX
    faults: frozenset[str] = frozenset()
    timing: Timing = field(default_factory=Timing)

    def __post_init__(self) -> None:
        validate(self)

    def gpu_url(self, gpu_id: int) -> str:
        """Base URL of the ComfyUI serving GPU `gpu_id`: the base URL's port + gpu_id."""
        parts = urlsplit(self.comfy_url)
        netloc = f"{bracket(parts.hostname or '')}:{parts.port + gpu_id}"
        return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))

    @property
    def gpu_urls(self) -> list[str]:
        return [self.gpu_url(n) for n in range(self.num_gpus)]

    @property
    def input_dir(self) -> Path | None:
        """The input store's folder, beside the state file (None: a temporary one)."""
        if self.state_file is None:
            return None
        return self.state_file.with_name(self.state_file.stem + "-inputs")


def validate(s: Settings) -> None:
    """Raise ConfigError with one line naming the setting and what is allowed."""
    if not 1 <= s.num_gpus <= MAX_GPUS:
        raise ConfigError(f"{_named('num_gpus')} must be between 1 and {MAX_GPUS} (got "
                          f"{s.num_gpus})")
    if not 1 <= s.port <= 65535:
        raise ConfigError(f"port must be between 1 and 65535 (got {s.port})")
    if s.log_level not in LOG_LEVELS:
        raise ConfigError(f"log-level must be one of {', '.join(LOG_LEVELS)} (got "
                          f"{s.log_level!r})")
    parts = urlsplit(s.comfy_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{_named('comfy_url')} must look like http://HOST:PORT "
                          f"(got {s.comfy_url!r})")
    try:
        base_port = parts.port
    except ValueError:
        base_port = None
    if base_port is None:
        raise ConfigError(f"{_named('comfy_url')} must include a port, e.g. "
                          f"http://127.0.0.1:8188 (got {s.comfy_url!r})")
    if parts.query or parts.fragment:
        raise ConfigError(f"{_named('comfy_url')} must not carry a query or fragment "
                          f"(got {s.comfy_url!r})")
    last = base_port + s.num_gpus - 1
    if last > 65535:
        raise ConfigError(f"{_named('comfy_url')} port {base_port} with {s.num_gpus} GPUs "
                          f"needs ports up to {last}, past 65535; lower the base port")
    if same_host(parts.hostname, s.host) and base_port <= s.port <= last:
        raise ConfigError(f"{_named('comfy_url')} ports {base_port}..{last} include "
                          f"Cylindria's own {s.host}:{s.port}; point it at ComfyUI (default "
                          "port 8188) or change --port")
    if not is_loopback(s.host) and not s.api_key and not s.insecure_no_auth:
        raise ConfigError(
            f"host {s.host} is reachable from other machines and CYLINDRIA_API_KEY is not "
            "set: anyone could submit jobs to your GPUs. Set CYLINDRIA_API_KEY, or pass "
            "--insecure-no-auth if the network is trusted"
        )
    if s.default_gpu != "auto" and (
            not isinstance(s.default_gpu, int) or not 0 <= s.default_gpu < s.num_gpus):
        raise ConfigError(f"{_named('default_gpu')} must be 'auto' or a GPU number from 0 "
                          f"to {s.num_gpus - 1} (got {s.default_gpu!r})")
    if s.max_event_streams < 1:
        raise ConfigError(f"max_event_streams must be 1 or more (got {s.max_event_streams})")
    if s.max_event_streams_per_address < 1:
        raise ConfigError("CYLINDRIA_MAX_EVENT_STREAMS_PER_ADDRESS must be 1 or more (got "
                          f"{s.max_event_streams_per_address})")
    if min(s.max_waiters, s.max_waiters_per_address) < 1 or not 1 <= s.max_wait <= MAX_WAIT:
        raise ConfigError("CYLINDRIA_MAX_WAITERS and CYLINDRIA_MAX_WAITERS_PER_ADDRESS must be 1 "
                          f"or more, CYLINDRIA_MAX_WAIT 1 to {MAX_WAIT} seconds (got "
                          f"{s.max_waiters}, {s.max_waiters_per_address}, {s.max_wait})")
    if s.max_attempts < 1:
        raise ConfigError(f"CYLINDRIA_MAX_ATTEMPTS must be 1 or more (got {s.max_attempts})")
    if not s.retention_days > 0:
        raise ConfigError("CYLINDRIA_RETENTION_DAYS must be a number of days above 0 "
                          f"(got {s.retention_days})")
    if s.memory_jobs < 0:
        raise ConfigError(f"CYLINDRIA_MEMORY_JOBS must be 0 or more (got {s.memory_jobs})")
    if s.max_nodes < 1:
        raise ConfigError(f"CYLINDRIA_MAX_NODES must be 1 or more (got {s.max_nodes})")
    if s.retry_lost < 0:
        raise ConfigError(f"CYLINDRIA_RETRY_LOST must be 0 or more (got {s.retry_lost})")
    if s.gpu_prefetch < 0:
        raise ConfigError(f"CYLINDRIA_GPU_PREFETCH must be 0 or more (got {s.gpu_prefetch})")
    if s.model_window < 1:
        raise ConfigError(f"CYLINDRIA_MODEL_WINDOW must be 1 or more (got {s.model_window})")
    if s.max_held < 1:
        raise ConfigError(f"CYLINDRIA_MAX_HELD must be 1 or more (got {s.max_held})")
    if not s.priority_aging > 0:
        raise ConfigError("CYLINDRIA_PRIORITY_AGING must be a number of seconds above 0 "
                          f"(got {s.priority_aging})")
    if s.max_connections is not None and s.max_connections < 1:
        raise ConfigError("CYLINDRIA_MAX_CONNECTIONS must be 1 or more (got "
                          f"{s.max_connections}); leave it unset to derive it from the "
                          "file descriptor limit")
    if s.max_connections_per_address is not None and s.max_connections_per_address < 0:
        raise ConfigError("CYLINDRIA_MAX_CONNECTIONS_PER_ADDRESS must be 0 (no cap) or more "
                          f"(got {s.max_connections_per_address})")
    if s.input_max < 1 or s.input_store_max < s.input_max:
        raise ConfigError("CYLINDRIA_INPUT_MAX must be 1 byte or more, and "
                          "CYLINDRIA_INPUT_STORE_MAX at least as large (got "
                          f"{s.input_max} and {s.input_store_max})")
    unknown = s.faults - FAULTS
    if unknown:
        raise ConfigError(f"CYLINDRIA_FAULTS knows {', '.join(sorted(FAULTS))} (got "
                          f"{', '.join(sorted(unknown))})")
    try:
        parse_allow(s.callback_allow)
    except ValueError as exc:
        raise ConfigError(
            f"CYLINDRIA_CALLBACK_ALLOW entry {str(exc)!r} is neither a CIDR, an IP address "
            "nor a host name; list them separated by commas, e.g. "
            "hooks.example.com,10.0.0.0/8,::1") from None
    try:
        trusted_networks(s.trusted_proxies)
    except ValueError as exc:
        raise ConfigError(
            f"CYLINDRIA_TRUSTED_PROXIES entry {str(exc)!r} is neither an IP address nor a "
            "CIDR (whose host bits are zero); list the proxies in front of Cylindria "
            "separated by commas, e.g. 127.0.0.1,::1,10.0.0.0/24") from None
    if s.api_key is not None and not s.api_key.strip():
        raise ConfigError("CYLINDRIA_API_KEY is set but empty; give it a value or unset it")
    if s.database_url is not None and (problem := database_url_problem(s.database_url)):
        raise ConfigError(f"--database-url / CYLINDRIA_DATABASE_URL {problem}; give it as "
                          "postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    if problem := nodes.node_name_problem(s.node_name) or (
            s.advertise_url is not None and nodes.advertise_url_problem(s.advertise_url)):
        raise ConfigError(problem)


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number (got {value!r})") from None


def _float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number (got {value!r})") from None


def _size(name: str, value: str) -> int:
    """Bytes, as a whole number with an optional K, M, G or T (powers of 1024)."""
    word = value.strip().lower().removesuffix("ib").removesuffix("b")
    unit = word[-1:] if word[-1:] in SIZE_UNITS and word[-1:] else ""
    digits = word[:-1] if unit else word
    if not digits.isdigit():
        raise ConfigError(f"{name} must be a size in bytes, with K, M, G or T for KiB, MiB, "
                          f"GiB or TiB (got {value!r})")
    return int(digits) * SIZE_UNITS[unit]


def parse_default_gpu(name: str, value: str) -> int | str:
    word = value.strip().lower()
    if word == "auto":
        return "auto"
    try:
        return int(word)
    except ValueError:
        raise ConfigError(f"{name} must be 'auto' or a GPU number (got {value!r})") from None


def _bool(name: str, value: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{name} must be one of 1/0, true/false, yes/no, on/off (got {value!r})")


# Settings that are one number read from one environment variable (their ranges are
# checked by `validate`).
_NUMBERS: tuple[tuple[str, str, Callable[[str, str], float]], ...] = (
    ("max_event_streams", "CYLINDRIA_MAX_EVENT_STREAMS", _int),
    ("max_event_streams_per_address", "CYLINDRIA_MAX_EVENT_STREAMS_PER_ADDRESS", _int),
    ("max_waiters", "CYLINDRIA_MAX_WAITERS", _int),
    ("max_waiters_per_address", "CYLINDRIA_MAX_WAITERS_PER_ADDRESS", _int),
    ("max_wait", "CYLINDRIA_MAX_WAIT", _int),
    ("max_attempts", "CYLINDRIA_MAX_ATTEMPTS", _int),
    ("retention_days", "CYLINDRIA_RETENTION_DAYS", _float),
    ("memory_jobs", "CYLINDRIA_MEMORY_JOBS", _int),
    ("max_nodes", "CYLINDRIA_MAX_NODES", _int),
    ("retry_lost", "CYLINDRIA_RETRY_LOST", _int),
    ("gpu_prefetch", "CYLINDRIA_GPU_PREFETCH", _int),
    ("model_window", "CYLINDRIA_MODEL_WINDOW", _int),
    ("max_held", "CYLINDRIA_MAX_HELD", _int),
    ("priority_aging", "CYLINDRIA_PRIORITY_AGING", _float),
    ("input_store_max", "CYLINDRIA_INPUT_STORE_MAX", _size),
    ("input_max", "CYLINDRIA_INPUT_MAX", _size),
    ("max_connections", "CYLINDRIA_MAX_CONNECTIONS", _int),
    ("max_connections_per_address", "CYLINDRIA_MAX_CONNECTIONS_PER_ADDRESS", _int),
)
# Timing fields read from the environment: numbers above 0.
_TIMINGS = (("poll_interval", "CYLINDRIA_POLL_INTERVAL"),
            ("lost_grace", "CYLINDRIA_LOST_GRACE"), ("node_grace", "CYLINDRIA_NODE_GRACE"),
            ("body_timeout", "CYLINDRIA_BODY_TIMEOUT"),
            ("body_min_rate", "CYLINDRIA_BODY_MIN_RATE"),
            ("heartbeat_interval", "CYLINDRIA_HEARTBEAT_INTERVAL"))


def load_settings(
    flags: Mapping[str, object], environ: Mapping[str, str] | None = None
) -> Settings:
    """Build Settings: a flag given on the command line wins over the environment,
    which wins over the default. `flags` holds only the flags actually given."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}

    if "COMFYUI_BASE_URL" in env:
        values["comfy_url"] = env["COMFYUI_BASE_URL"].strip()
    if "CYLINDRIA_NUM_GPUS" in env:
        values["num_gpus"] = _int("CYLINDRIA_NUM_GPUS", env["CYLINDRIA_NUM_GPUS"])
    if env.get("CYLINDRIA_API_KEY") is not None:
        values["api_key"] = env["CYLINDRIA_API_KEY"]
    if "CYLINDRIA_DEV_MODE" in env:
        values["dev_mode"] = _bool("CYLINDRIA_DEV_MODE", env["CYLINDRIA_DEV_MODE"])
    if env.get("CYLINDRIA_METRICS_PUBLIC"):
        values["metrics_public"] = _bool("CYLINDRIA_METRICS_PUBLIC",
                                         env["CYLINDRIA_METRICS_PUBLIC"])
    if env.get("CYLINDRIA_WEBHOOK_SECRET"):
        values["webhook_secret"] = env["CYLINDRIA_WEBHOOK_SECRET"]
    if env.get("CYLINDRIA_DEFAULT_GPU"):
        values["default_gpu"] = parse_default_gpu("CYLINDRIA_DEFAULT_GPU",
                                                  env["CYLINDRIA_DEFAULT_GPU"])
    if env.get("CYLINDRIA_DEV_SAVE_DIR"):
        values["dev_save_dir"] = Path(env["CYLINDRIA_DEV_SAVE_DIR"])
    values["state_file"] = Path(env.get("CYLINDRIA_STATE_FILE") or DEFAULT_STATE_FILE)
    values["database_url"] = env.get("CYLINDRIA_DATABASE_URL") or None
    values.update({key: env[name].strip() for key, name in nodes.NODE_ENV if env.get(name)})
    if env.get("CYLINDRIA_STATE_SYNC"):
        sync = env["CYLINDRIA_STATE_SYNC"].strip().lower()
        if sync not in ("normal", "full"):
            raise ConfigError(f"CYLINDRIA_STATE_SYNC must be normal or full (got {sync!r})")
        values["state_sync_full"] = sync == "full"
    for key, name, parse in _NUMBERS:
        if env.get(name):
            values[key] = parse(name, env[name])
    timing: dict[str, float] = {}
    for key, name in _TIMINGS:
        if env.get(name):
            timing[key] = _float(name, env[name])
            if not timing[key] > 0:
                raise ConfigError(f"{name} must be a number above 0 (got {env[name]!r})")
    if timing:
        values["timing"] = replace(Timing(), **timing)
    if env.get("CYLINDRIA_CALLBACK_ALLOW"):
        values["callback_allow"] = tuple(entry.strip() for entry in
                                         env["CYLINDRIA_CALLBACK_ALLOW"].split(",")
                                         if entry.strip())
    if env.get("CYLINDRIA_TRUSTED_PROXIES"):
        values["trusted_proxies"] = tuple(entry.strip() for entry in
                                          env["CYLINDRIA_TRUSTED_PROXIES"].split(",")
                                          if entry.strip())
    if env.get("CYLINDRIA_FAULTS"):
        values["faults"] = frozenset(f.strip() for f in env["CYLINDRIA_FAULTS"].split(",")
                                     if f.strip())

    for key in ("host", "port", "comfy_url", "num_gpus", "dev_mode", "log_level",
                "insecure_no_auth", "node_name", "advertise_url"):
        if flags.get(key) is not None:
            values[key] = flags[key]
    if flags.get("default_gpu") is not None:
        values["default_gpu"] = parse_default_gpu("--default-gpu", str(flags["default_gpu"]))
    if flags.get("dev_save_dir") is not None:
        values["dev_save_dir"] = Path(str(flags["dev_save_dir"]))
    if flags.get("state_file") is not None:
        values["state_file"] = Path(str(flags["state_file"]))
    if flags.get("database_url") is not None:
        values["database_url"] = str(flags["database_url"])
    if flags.get("no_state"):
        if flags.get("database_url") is not None:
            raise ConfigError("--no-state keeps jobs in memory only: drop it or --database-url")
        values["state_file"] = values["database_url"] = None
    if isinstance(values.get("comfy_url"), str):
        values["comfy_url"] = str(values["comfy_url"]).rstrip("/")
    given_as = {key: _FLAG_NAMES[key] if flags.get(key) is not None else _ENV_NAMES[key]
                for key in _FLAG_NAMES if key in values}
    token = _GIVEN_AS.set(given_as)
    try:
        settings = Settings(**values)  # type: ignore[arg-type]
    finally:
        _GIVEN_AS.reset(token)
    # Here rather than in Settings: tests build Settings with short keys of their own.
    check_api_key(settings.api_key)
    return settings


def check_api_key(key: str | None) -> None:
    """Raise ConfigError, in one line saying how to make a good key, unless `key` is
    long and varied enough that guessing it is out of reach, and goes in an HTTP header
    and the sign-in form as it is."""
    if key is None:
        return
    if not (key.isascii() and key.isprintable()) or " " in key:
        problem = "holds a space or a character that is not printable ASCII"
    elif len(key) < KEY_MIN_LENGTH:
        problem = (f"is shorter than {KEY_MIN_LENGTH} characters (it has {len(key)}): its "
                   "length is what stops guessing")
    elif len(set(key)) < KEY_MIN_DISTINCT:
        problem = (f"has fewer than {KEY_MIN_DISTINCT} different characters (it has "
                   f"{len(set(key))}): it is easy to guess")
    elif len(key) > KEY_MAX_LENGTH:
        problem = (f"is longer than the {KEY_MAX_LENGTH} characters the dashboard's "
                   f"sign-in form takes (it has {len(key)})")
    else:
        return
    raise ConfigError(f"CYLINDRIA_API_KEY {problem}; make a good one with {MAKE_A_KEY}")

