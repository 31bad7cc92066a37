"""Input files in workflows: references, the names clients give, and binding them to a GPU."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import ujson

from ..errors import BadRequest, InputInvalid, UnknownInput

# A stored input is referenced in a workflow as "cylindria:sha256-<hex>".
REF_PREFIX = "cylindria:"
ID_RE = re.compile(r"sha256-[0-9a-f]{64}", re.ASCII)
MAX_NAME = 255
# Inline inputs a job may carry, and stored inputs it may reference.
MAX_INPUTS = 64


@dataclass(slots=True, frozen=True)
class Reference:
    """One string input of one node that names an input file."""

    node_id: str
    input_name: str
    value: str


@dataclass(slots=True, frozen=True)
class InlineInput:
    """A file sent with the job in its JSON form: decoded base64 bytes, or a URL."""

    name: str
    data: bytes | None = None
    url: str | None = None


def input_id(digest: str) -> str:
    return f"sha256-{digest}"


def ref_of(value: str) -> str | None:
    """The input id a "cylindria:sha256-<hex>" string names, or None for other strings."""
    if not value.startswith(REF_PREFIX):
        return None
    return value[len(REF_PREFIX):]


def check_id(value: str) -> str:
    if not ID_RE.fullmatch(value):
        raise BadRequest(f"{value[:80]!r} is not an input id: ids look like sha256- followed "
                         "by 64 lowercase hex digits, as POST /inputs/ answers.")
    return value


def check_name(name: str, what: str = "An input's name") -> str:
    """A file name a client gave: one path segment of printable text, so that it can
    never name a folder or escape one."""
    problem = None
    if not name or len(name) > MAX_NAME:
        problem = f"must be 1 to {MAX_NAME} characters"
    elif name in (".", "..") or "/" in name or "\\" in name:
        problem = "must be a plain file name, without '/', '\\' or '..'"
    elif any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        problem = "must not hold control characters"
    elif name.startswith(REF_PREFIX):
        problem = f"must not start with {REF_PREFIX!r}, which marks stored inputs"
    if problem:
        raise InputInvalid(f"{what} {problem} (got {name[:80]!r}).",
                           extra={"input": name[:MAX_NAME]})
    return name


def find_references(prompt: Mapping[str, Any], names: Iterable[str]) -> list[Reference]:
    """Every string input of every node that is a stored input's reference or the name
    of an input sent with the job, whatever the node's type."""
    inline = set(names)
    found: list[Reference] = []
    for node_id, node in prompt.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for input_name, value in inputs.items():
            if isinstance(value, str) and (value.startswith(REF_PREFIX) or value in inline):
                found.append(Reference(str(node_id), str(input_name), value))
    return found


def check_references(references: Iterable[Reference], inline: Iterable[str],
                     known: Mapping[str, Any]) -> None:
    """422 for a reference to no stored input, and for an inline input no node uses."""
    used = set()
    for ref in references:
        used.add(ref.value)
        target = ref_of(ref.value)
        if target is not None and target not in known:
            raise UnknownInput(
                f"Node {ref.node_id} input '{ref.input_name}' references {ref.value[:90]!r}, "
                "which is no input stored here: upload the file with POST /inputs/ and use "
                "the 'ref' it answers, or send the file with the job.",
                extra={"node_id": ref.node_id, "input_name": ref.input_name})
    for name in inline:
        if name not in used:
            raise InputInvalid(
                f"The input {name!r} was sent with the job but no node uses it: put its name "
                "as the value of a loader's input (for example LoadImage's 'image').",
                extra={"input": name})


def read_inline(body: Any) -> list[InlineInput]:
    """The `inputs` object of a JSON submission: {"name": {"base64": ...} | {"url": ...}}.
    Base64 is decoded here (this may run in the worker process)."""
    raw = body.get("inputs") if isinstance(body, dict) else None
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise InputInvalid("'inputs' must be a JSON object mapping each file's name to "
                           '{"base64": "..."} or {"url": "https://..."}.')
    if len(raw) > MAX_INPUTS:
        raise InputInvalid(f"A job may carry at most {MAX_INPUTS} inputs (got {len(raw)}).")
    found: list[InlineInput] = []
    for name, spec in raw.items():
        check_name(name, f"The input name {name[:80]!r}")
        if not isinstance(spec, dict) or len(spec) != 1 or not (
                isinstance(spec.get("base64"), str) or isinstance(spec.get("url"), str)):
            raise InputInvalid(f"Input {name!r} must be {{\"base64\": \"...\"}} or "
                               '{"url": "https://..."}.', extra={"input": name})
        if "url" in spec:
            found.append(InlineInput(name, url=spec["url"]))
            continue
        try:
            data = base64.b64decode(_strip_data_url(spec["base64"]), validate=True)
        except (binascii.Error, ValueError):
            raise InputInvalid(f"Input {name!r} is not valid base64: send the file's bytes "
                               "in standard base64 (RFC 4648, with padding).",
                               extra={"input": name}) from None
        if not data:
            raise InputInvalid(f"Input {name!r} is empty.", extra={"input": name})
        found.append(InlineInput(name, data=data))
    return found


def _strip_data_url(text: str) -> str:
    # "data:image/png;base64,...." is what browsers make; the bytes follow the comma.
    if text.startswith("data:") and ";base64," in text[:200]:
        return text[text.index(";base64,") + 8:]
    return text


def bound_fingerprint(fingerprint: str, binding: Mapping[str, str]) -> str:
    """The fingerprint of a workflow with the files its references stand for: the same
    graph over other bytes is another job."""
    if not binding:
        return fingerprint
    digest = hashlib.sha256(fingerprint.encode())
    for value, target in sorted(binding.items()):
        digest.update(b"\0" + value.encode() + b"\0" + target.encode())
    return digest.hexdigest()


def bind(data: bytes, names: Mapping[str, str]) -> bytes:
    """The workflow document with every reference replaced by the name its file has on
    one ComfyUI (`names`: reference -> "cylindria/<file>"). Plain function of its
    arguments: a large workflow is rewritten in the worker process."""
    document = ujson.loads(data)
    for node in document["prompt"].values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for key, value in inputs.items():
            if isinstance(value, str) and value in names:
                inputs[key] = names[value]
    return ujson.dumps(document, ensure_ascii=False, escape_forward_slashes=False).encode()
