"""What the desktop tester sends with a job: its workflow, its files, the multipart form."""

# Standard library only, like desktop.py: the tester runs from a checkout, uninstalled.

from __future__ import annotations

import json
import mimetypes
import unicodedata
import uuid
from collections.abc import Iterable
from pathlib import Path

MAX_WORKFLOW_BYTES = 32 * 1024 * 1024  # the service refuses larger bodies with a 413
# The form is built in memory before it is sent; this keeps that within reason.
MAX_ATTACHED_BYTES = 512 * 1024 * 1024


class InputError(ValueError):
    """Something the user typed or picked cannot be used; the message says what to fix."""


def load_workflow(path: str | Path) -> bytes:
    """Read a workflow file and return it as a JSON request body, or raise InputError."""
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
    # Sent re-encoded so a byte order mark or odd encoding never reaches the service.
    return json.dumps(data).encode()


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
    if (total := sum(result.values())) > MAX_ATTACHED_BYTES:
        raise InputError(f"These files come to {total:,} bytes; the tester sends at most "
                         f"{MAX_ATTACHED_BYTES:,} bytes with one job. Attach fewer.")
    return result


def multipart_form(workflow: bytes, files: Iterable[Path],
                   boundary: str | None = None) -> tuple[bytearray, str]:
    """A job's multipart/form-data body and its Content-Type. It reads the files: call it
    on a worker thread, after `attach` has checked them."""
    boundary = boundary or f"cylindria-tester-{uuid.uuid4().hex}"

    def head(disposition: str, media_type: str) -> bytes:
        return (f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n"
                f"Content-Type: {media_type}\r\n\r\n").encode()
    body = bytearray(head('name="workflow"', "application/json") + workflow + b"\r\n")
    for path in files:
        quoted = path.name.replace("\\", "\\\\").replace('"', '\\"')
        body += head(f'name="file"; filename="{quoted}"',
                     mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        try:
            body += path.read_bytes()
        except OSError as exc:
            raise InputError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
        body += b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"
