"""What the desktop tester checks before it calls: the connection, a workflow, files."""

from __future__ import annotations

import json
import re
import unicodedata
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_WORKFLOW_BYTES = 32 * 1024 * 1024  # the service refuses larger bodies with a 413
WHOLE_NUMBER = re.compile(r"-?[0-9]+")


class InputError(ValueError):
    """Something the user typed or picked cannot be used; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go, validated from the form."""

    base_url: str
    gpu_id: int
    api_key: str

    def url(self, path: str, query: dict[str, str] | None = None) -> str:
        suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
        return f"{self.base_url}{path}{suffix}"


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


def load_workflow(path: str | Path) -> dict[str, Any]:
    """Read a workflow file and return its nodes, or raise InputError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_WORKFLOW_BYTES:
            raise InputError(f"{path.name} is {size} bytes; Cylindria takes at most "
                             f"{MAX_WORKFLOW_BYTES} bytes.")
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path.name} is not a JSON workflow: it is not UTF-8 text "
                         f"(byte {exc.start}).") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{path.name} is not a JSON workflow: {exc.msg} at line "
                         f"{exc.lineno}, column {exc.colno}.") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path.name} holds JSON but not a workflow: expected an object "
                         f"of nodes, got {type(data).__name__}. Export it from ComfyUI "
                         "with Workflow > Export (API).")
    # The client sends it re-encoded, so a byte order mark never reaches the service.
    return data


def attach(attached: dict[Path, int], chosen: Iterable[str | Path]) -> dict[Path, int]:
    """The attached files (path: size) with the chosen ones added, or InputError."""
    result = dict(attached)
    for path in map(Path, chosen):
        try:
            info = path.stat()
        except OSError as exc:
            raise InputError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
        if any(unicodedata.category(c) in ("Cc", "Cs") for c in path.name):
            raise InputError(f"{path.name!r} holds characters a form cannot carry (a line "
                             "break or a byte that is not text): rename it.")
        if same := next((p for p in result if p.name == path.name and p != path), None):
            raise InputError(f"Two files are named {path.name} ({same} and {path}); a job "
                             "tells its files apart by name. Rename one, or Clear files.")
        result[path] = info.st_size
    return result
