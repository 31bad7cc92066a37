"""Workflows: reading a request body, fingerprints, the node plan, and ComfyUI's verdicts."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ujson

from ..config import DEFAULT_MAX_NODES
from ..errors import BadRequest, InvalidWorkflow, TooManyNodes
from ..jsonio import first_non_finite, pretty, word
from .estimates import NodeCost, models_of, node_costs
from .inputs import InlineInput, Reference, find_references, read_inline

log = logging.getLogger(__name__)


# Past this many nodes a workflow is refused (CYLINDRIA_MAX_NODES sets it): checking
# and running one costs Cylindria and ComfyUI in proportion.
MAX_NODES = DEFAULT_MAX_NODES


@dataclass(slots=True, frozen=True)
class Workflow:
    """A checked workflow: `data` is the JSON document (UTF-8) sent to ComfyUI and kept by
    the journal (`{"prompt": ..., "extra_data": ...}`, nodes in the client's order), and
    `fingerprint` is equal for equal workflows however their keys are ordered."""

    data: bytes
    fingerprint: str
    nodes: tuple[str, ...]
    # Model files its loader nodes name (the dispatcher prefers GPUs holding them),
    # and what each node costs (run times are learned and forecast by it).
    models: frozenset[str] = frozenset()
    costs: dict[str, NodeCost] = field(default_factory=dict)
    # String inputs that name input files, and files sent inline in the JSON form
    # (dropped once they are in the input store).
    references: tuple[Reference, ...] = ()
    inline: tuple[InlineInput, ...] = ()

    def parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(prompt, extra_data)."""
        document = ujson.loads(self.data)
        return document["prompt"], document["extra_data"]


def read_workflow(raw: bytes | str | list[bytes], max_nodes: int = MAX_NODES,
                  names: frozenset[str] = frozenset()) -> Workflow:
    """Decode, check and fingerprint a PUT /startjob body (one buffer or its chunks); an
    ApiError says what is wrong. `names` are the files sent beside it (a multipart
    form's); the JSON form may carry more under `inputs`. Plain Python with no shared
    state, so a worker process can run it."""
    try:
        body = ujson.loads(b"".join(raw) if isinstance(raw, list) else raw)
    except (ValueError, RecursionError):
        raise BadRequest("The body is not valid JSON (or is nested too deeply). Send an "
                         "API-format workflow as a JSON object.") from None
    prompt, extra = split_workflow(body)
    if len(prompt) > max_nodes:
        raise TooManyNodes(f"The workflow has {len(prompt)} nodes; this server takes at most "
                           f"{max_nodes} (its CYLINDRIA_MAX_NODES). Split it into smaller "
                           "jobs.")
    document = {"prompt": prompt, "extra_data": extra}
    try:
        # allow_nan=False: a NaN or an infinity is refused below, never sent on.
        data = ujson.dumps(document, ensure_ascii=False, escape_forward_slashes=False,
                           allow_nan=False).encode()
        digest = hashlib.sha256(ujson.dumps(document, sort_keys=True, ensure_ascii=False,
                                            allow_nan=False).encode()).hexdigest()
    except UnicodeEncodeError:
        raise BadRequest("The body holds a lone UTF-16 surrogate (such as \\ud800), which "
                         "is not text. Send valid Unicode.") from None
    except (OverflowError, RecursionError, ValueError):
        refuse_non_finite(prompt, extra)
        raise BadRequest("The workflow is nested too deeply to handle. Send an API-format "
                         "workflow.") from None
    inline = tuple(read_inline(body)) if "prompt" in body else ()
    clash = names & {item.name for item in inline}
    if clash:
        raise BadRequest(f"Two inputs are named {sorted(clash)[0]!r} (a file part and an "
                         "entry of 'inputs'); give each its own name.")
    references = find_references(prompt, names | {item.name for item in inline})
    return Workflow(data, digest, tuple(prompt), models_of(prompt), node_costs(prompt),
                    tuple(references), inline)


def split_workflow(body: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(prompt, extra_data) from a bare API-format graph or ComfyUI's envelope."""
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object: an API-format workflow "
                         f"(got a JSON {type(body).__name__}).")
    if looks_like_ui_export(body) or looks_like_ui_export(body.get("prompt")):
        raise InvalidWorkflow(
            "This is a UI-format workflow (it has 'nodes' and 'links'). ComfyUI cannot run "
            "it as is: in ComfyUI, use Workflow > Export (API) and send that file.")
    if "prompt" in body:
        prompt = body["prompt"]
        extra = body.get("extra_data", {})
        if extra is None:
            extra = {}
        if not isinstance(extra, dict):
            raise BadRequest("'extra_data' must be a JSON object.")
    else:
        prompt, extra = body, {}
    if not isinstance(prompt, dict):
        raise BadRequest("'prompt' must be a JSON object mapping node ids to nodes.")
    if not prompt:
        raise InvalidWorkflow("The workflow has no nodes. Send an API-format workflow "
                              "with at least one output node (e.g. SaveImage).")
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise InvalidWorkflow(
                f"Node {node_id!r} is not an API-format node: each node must be an object "
                "with a 'class_type' string and an 'inputs' object. Export the workflow "
                "with Workflow > Export (API).", extra={"node_id": node_id})
        if not isinstance(node.get("inputs", {}), dict):
            raise InvalidWorkflow(f"Node {node_id!r} ({node['class_type']}): 'inputs' must "
                                  "be an object.", extra={"node_id": node_id})
    # Cylindria routes ComfyUI's events by its own client id; a client's would steal them.
    extra = {k: v for k, v in extra.items() if k != "client_id"}
    return prompt, extra


def refuse_non_finite(prompt: dict[str, Any], extra: dict[str, Any]) -> None:
    """BadRequest naming where the workflow holds NaN or an infinity (written NaN,
    Infinity, -Infinity, or a number too large for a float, such as 1e999), if it does.
    Those are not JSON: sent on, ComfyUI's answers and every status body would carry
    them, and strict parsers would refuse them whole. Found only once encoding failed,
    so a workflow without one costs nothing more."""
    for node_id, node in prompt.items():
        for key, value in node.items():
            places = value.items() if key == "inputs" else ((None, value),)
            for name, item in places:
                found = first_non_finite(item)
                if found is None:
                    continue
                where = (f"input {name!r}" if key == "inputs" else f"field {key!r}")
                extra_info = {"node_id": node_id, "value": word(found)}
                if key == "inputs":
                    extra_info["input_name"] = name
                raise BadRequest(f"Node {node_id!r} ({node['class_type']}) {where} "
                                 f"{_holds(found)}", extra=extra_info)
    found = first_non_finite(extra)
    if found is not None:
        raise BadRequest(f"'extra_data' {_holds(found)}", extra={"value": word(found)})


def _holds(number: float) -> str:
    said = word(number)
    if said != "NaN":
        said += " (or a number too large for a float, such as 1e999, which reads as one)"
    return (f"holds {said}, which is not a JSON number and cannot go to ComfyUI. Send a "
            "finite number in its place, one the input takes (such as 0 or 1.0).")


def looks_like_ui_export(value: Any) -> bool:
    return isinstance(value, dict) and "nodes" in value and "links" in value


def plan_nodes(prompt: dict[str, Any], outputs: Iterable[str]) -> frozenset[str]:
    """The nodes ComfyUI will run for `outputs`: the outputs and all their ancestors."""
    seen: set[str] = set()
    stack = [str(o) for o in outputs]
    while stack:
        node_id = stack.pop()
        if node_id in seen or node_id not in prompt:
            continue
        seen.add(node_id)
        node = prompt[node_id]
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict):
            for value in inputs.values():
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    stack.append(value[0])
    return frozenset(seen)


def node_error_lines(node_errors: dict[str, Any]) -> list[str]:
    """One readable line per failing input of ComfyUI's node_errors; the details name
    the bad value."""
    lines: list[str] = []
    for node_id, info in node_errors.items():
        if not isinstance(info, dict):
            continue
        class_type = info.get("class_type", "?")
        for err in info.get("errors") or []:
            if not isinstance(err, dict):
                continue
            extra = err.get("extra_info") if isinstance(err.get("extra_info"), dict) else {}
            input_name = extra.get("input_name") or err.get("details") or "?"
            line = (f"node {node_id} ({class_type}) input '{input_name}': "
                    f"{err.get('message') or 'invalid'}")
            details = str(err.get("details") or "")
            if details and details != input_name:
                line += f" ({shorten(details, DETAILS_CHARS)})"
            lines.append(line)
    return lines


# ComfyUI's details can list every model it has; a sentence needs the start of it.
DETAILS_CHARS = 160


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def rejection_detail(body: dict[str, Any]) -> str:
    """The sentence for a workflow ComfyUI refused, from its 400 answer to /prompt."""
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    node_errors = body.get("node_errors") if isinstance(body.get("node_errors"), dict) else {}
    lines = node_error_lines(node_errors)
    if lines:
        return f"ComfyUI rejected the workflow: {'; '.join(lines)}."
    message = str(error.get("message") or "validation failed")
    details = str(error.get("details") or "")
    return f"ComfyUI rejected the workflow: {message}" + (f" ({details})." if details else "")


async def save_copy(directory: Path, job_id: str, workflow: Workflow) -> None:
    """Keep the workflow as a JSON file (dev mode); a failure is logged only."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    path = directory / f"{stamp}_{job_id}.json"

    def write() -> None:
        text = workflow.data.decode()
        if len(text) <= PRETTY_UP_TO:
            prompt, extra = workflow.parts()
            document = {"prompt": prompt, "extra_data": extra} if extra else prompt
            text = pretty(document)
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")

    try:
        await asyncio.to_thread(write)
        log.info("dev mode: saved the workflow of job %s to %s", job_id, path)
    except OSError as exc:
        log.error("dev mode: could not save the workflow of job %s to %s: %s", job_id, path,
                  exc)


# Larger workflows are saved as they came: reformatting would hold the interpreter.
PRETTY_UP_TO = 1 << 20
