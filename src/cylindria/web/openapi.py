"""GET /openapi.json: the API's contract, OpenAPI 3.1, and GET /docs, its page.

The document is written here by hand, route by route, for the settings the server runs
with (its GPUs, whether a key guards it); a test walks the router and fails when a route
or method is missing from it, so the two cannot drift.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import swagger_ui_bundle
from aiohttp import web

from .. import __version__
from ..appkeys import SETTINGS
from ..config import Settings
from ..jsonio import json_response
from . import openapi_dashboard, openapi_inputs, openapi_parts
from .api import DEFAULT_PAGE, MAX_PAGE
from .auth import Access, access
from .openapi_parts import (
    CSRF_HEADER,
    JOB_ID,
    JOB_ID_CHARACTERS,
    JSON,
    NODE_SCHEMAS,
    NUMBER,
    RETRY_AFTER,
    SESSION_REFUSED,
    Shape,
    answer,
    optional,
    ref,
)
from .params import MAX_CALLBACK_URL, PRIORITY_RANGE

routes = web.RouteTableDef()

STATES = "(queued|running|completed|failed|cancelled|rejected)"
# params.priority (PRIORITY_RANGE) and the page size of /jobs/ (MAX_PAGE) as patterns.
PRIORITY = optional("0|-?([1-9][0-9]{0,2}|1000)")
LIMIT = optional("[1-9][0-9]?|[1-4][0-9]{2}|500")
# An http(s) URL with a host name, or an IP address (IPv6 in brackets), and a port:
# what params.callback_url takes before the address policy has its say. No user name or
# password; empty asks for no callback.
H16 = "[0-9A-Fa-f]{1,4}"
OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
LS32 = f"({H16}:{H16}|{OCTET}(\\.{OCTET}){{3}})"


def ipv6_pattern() -> str:
    """RFC 3986's IPv6address: eight groups, or fewer around one `::`."""
    forms = [f"({H16}:){{6}}{LS32}", f"::({H16}:){{5}}{LS32}"]
    for before, after in ((0, 4), (1, 3), (2, 2), (3, 1), (4, 0)):
        head = f"(({H16}:){{0,{before}}}{H16})?" if before else f"({H16})?"
        forms.append(f"{head}::" + (f"({H16}:){{{after}}}" if after else "") + LS32)
    forms += [f"(({H16}:){{0,5}}{H16})?::{H16}", f"(({H16}:){{0,6}}{H16})?::"]
    return "(" + "|".join(forms) + ")"


PORT = "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
CALLBACK_URL = optional(f"[Hh][Tt][Tt][Pp][Ss]?://([A-Za-z0-9.-]+|\\[{ipv6_pattern()}\\])"
                        f"(:{PORT})?([/?#][\\x21-\\x7e]*)?")


def schemas(shape: Shape) -> dict[str, Any]:
    nullable_str = {"type": ["string", "null"]}
    nullable_int = {"type": ["integer", "null"]}
    time = {"type": ["string", "null"], "format": "date-time"}
    return {
        "Error": {
            "type": "object", "required": ["error"],
            "description": "Every error: a stable `code` and a sentence saying what to do.",
            "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string", "enum": ERROR_CODES},
                               "message": {"type": "string"}}}}},
        "Output": {
            "type": "object", "required": ["node_id", "kind"],
            "properties": {
                "node_id": {"type": "string"},
                "kind": {"type": "string",
                         "enum": ["image", "gif", "video", "audio", "file", "text"]},
                "filename": {"type": "string"}, "subfolder": {"type": "string"},
                "type": {"type": "string"}, "url": {"type": "string"},
                "text": {"type": "string"}, "truncated": {"type": "boolean"}}},
        "JobStatus": {
            "type": "object",
            "required": ["job_id", "state", "gpu_id", "submitted_at", "updated_at",
                         "progress", "detail"],
            "properties": {
                "job_id": {"type": "string"},
                "state": {"type": "string", "enum": ["queued", "running", "completed",
                                                     "failed", "cancelled", "rejected"]},
                "gpu_id": nullable_int, "prompt_id": nullable_str,
                "submitted_at": time, "updated_at": time, "started_at": time,
                "finished_at": time, "progress": {"type": "number", "minimum": 0,
                                                  "maximum": 1},
                "detail": nullable_str, "queue_position": nullable_int,
                "current_node": nullable_str,
                "node_progress": {"type": ["object", "null"]},
                "error": {"type": ["object", "null"]},
                "outputs": {"type": "array", "items": ref("Output")},
                "outputs_reused": {"type": "boolean"},
                "inputs": {"type": "array", "items": ref("JobInput"),
                           "description": "The input files the job uses."},
                "cancel_requested": {"type": "boolean"},
                "webhook": {"type": ["object", "null"]},
                "attempt": {"type": "integer"}, "attempts_total": {"type": "integer"},
                "attempts": {"type": "array", "items": {"type": "object"},
                             "description": "The last 20 attempts, this one last."},
                "priority": {"type": "integer"},
                "placement": {**nullable_str, "description": "Why `auto` chose its GPU."},
                "eta_seconds": {"type": ["number", "null"], "minimum": 0,
                                "description": "Expected seconds until it ends (the line "
                                               "ahead included); null until learned."},
                "expected_finish_at": time,
                "node_errors": {"type": ["object", "null"]}, **openapi_parts.ELSEWHERE}},
        "StartReply": {
            "type": "object", "required": ["job_id", "accepted", "detail", "gpu_id"],
            "description": "The answer of PUT /startjob and POST /retryjob; refusals carry "
                           "`error` as well.",
            "properties": {
                "job_id": {"type": "string"}, "accepted": {"type": "boolean"},
                "detail": {"type": "string"}, "gpu_id": nullable_int,
                "prompt_id": {"type": "string"}, "state": {"type": "string"},
                "attempt": {"type": "integer"},
                "held": {"type": "boolean", "description": "GpuId=auto with no GPU free: "
                                                           "waiting in Cylindria's queue."},
                "queue_position": {"type": ["integer", "null"]},
                "priority": {"type": "integer"},
                "error": {"type": "object"}, "node_errors": {"type": ["object", "null"]}}},
        "StartRefusal": {"allOf": [ref("StartReply"), ref("Error")]},
        "FinishedJob": {"allOf": [ref("JobStatus"), ref("Error")],
                        "description": "The job as it stands, with the error."},
        "JobsPage": {
            "type": "object", "required": ["jobs", "next_before"],
            "properties": {"jobs": {"type": "array", "items": ref("JobStatus")},
                           "next_before": nullable_int}},
        "GpuStatus": {
            "type": "object", "required": ["status", "gpu_id", "reachable"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "degraded"]},
                "comfy_url": {"type": "string"}, "reachable": {"type": "boolean"},
                "gpu_id": {"type": "integer"}, "listener_connected": {"type": "boolean"},
                "queue_remaining": nullable_int,
                "comfyui_version": nullable_str,
                "devices": {"type": "array", "items": {"type": "object"}},
                "running_job": {"type": ["object", "null"]},
                "queue_depth": {"type": "integer"}, "load": {"type": "number"},
                "drained": {"type": "boolean"},
                "expected_seconds_to_finish": {
                    "type": ["number", "null"],
                    "description": "In /gpus/: when the GPU should be done with what "
                                   "Cylindria sent it; null until learned."}}},
        "Health": {"type": "object", "required": ["status"],
                   "properties": {"status": {"type": "string"},
                                  "gpus": {"type": "integer"},
                                  "listeners_connected": {"type": "integer"}}},
        "Readiness": {"type": "object", "required": ["status", "usable_gpus", "reasons"],
                      "properties": {"status": {"type": "string",
                                                "enum": ["ready", "not_ready"]},
                                     "usable_gpus": {"type": "array",
                                                     "items": {"type": "integer"}},
                                     "usable_elsewhere": {"type": "integer"},
                                     "reasons": {"type": "object"}}},
        "Workflow": {
            "type": "object", "minProperties": 1,
            "description": "An API-format workflow, the bare graph: `{node_id: {class_type, "
                           "inputs}}`, no node named `prompt` (an object with `prompt` is "
                           "ComfyUI's envelope, WorkflowWithInputs), at most "
                           f"{shape.max_nodes} nodes (CYLINDRIA_MAX_NODES; else 413). Which "
                           "node types exist, and what inputs they take, is for the ComfyUI "
                           "behind to say (422).",
            "additionalProperties": {
                "type": "object", "required": ["class_type"],
                "properties": {"class_type": {"type": "string"},
                               "inputs": {"type": "object"}}}},
        "Event": {
            "type": "object", "required": ["event", "data"],
            "description": "One server-sent event.",
            "properties": {
                "event": {"type": "string", "enum": ["job", "resync"]},
                "id": {"type": "string", "pattern": f"^{NUMBER}$",
                       "description": "Increasing. With PostgreSQL, the database's, the "
                                      "same on every node; a passing change (progress) "
                                      "of the node's own job comes without one."},
                "data": {"type": "string", "contentMediaType": JSON,
                         "description": "`job`: the job's status, as GET /jobstatus/ "
                                        "answers it; `resync`: what to do when events "
                                        "were missed."}}},
        **openapi_inputs.schemas(), **NODE_SCHEMAS,
    }


ERROR_CODES = ["bad_request", "invalid_workflow", "payload_too_large",
               "unsupported_encoding", "too_many_nodes", "callback_not_allowed",
               "validation_failed", "unauthorized", "job_not_found", "output_not_found",
               "job_id_conflict", "job_finished", "not_retryable", "attempts_exhausted",
               "gpu_drained", "unknown_gpu", "too_many_streams", "too_many_attempts",
               "backend_error", "backend_unavailable", "backend_timeout",
               "state_unavailable", "queue_full", "not_found", "method_not_allowed",
               "origin_refused", "csrf_token_invalid", "internal_error", "too_many_waiters",
               *openapi_inputs.ERROR_CODES]


def start_errors() -> dict[str, Any]:
    """What PUT /startjob and POST /retryjob may answer besides taking the job."""
    return {
        "400": answer("Bad job_id, GpuId or wait, a body that is not a JSON object, a "
                      "workflow holding NaN or Infinity (naming the node and input), a "
                      "compressed body that does not decompress, an X-Callback-Url that "
                      "is no http(s) URL, or a multipart form without one `workflow` part "
                      "or with two files of one name.", "StartRefusal"),
        "408": answer("The body came too slowly or stopped (`body_timeout`).",
                      "StartRefusal"),
        "409": answer("The job exists with another workflow or other input files, the "
                      "GPU is drained, or (retry) an input is no longer stored "
                      "(`input_gone`) or the job ran CYLINDRIA_MAX_ATTEMPTS attempts "
                      "(`attempts_exhausted`).", "StartRefusal"),
        "413": answer("The body is over 32 MiB, a file over CYLINDRIA_INPUT_MAX, or too "
                      "many nodes.", "StartRefusal"),
        "415": answer("An unsupported Content-Encoding, or a multipart type other than "
                      "form-data.", "StartRefusal"),
        "422": answer("Not a workflow ComfyUI can run, refused by ComfyUI's validation, "
                      "a callback URL that may not be called (credentials in it, or a host "
                      "that does not resolve or resolves to a closed address), a "
                      "reference to no stored input (`unknown_input`, naming the node and "
                      "input), an input sent that no node uses or that is not valid base64 "
                      "(`invalid_input`), or an input URL that could not be fetched "
                      "(`input_unavailable`).", "StartRefusal"),
        "507": answer("The input store is full of inputs jobs in flight use.",
                      "StartRefusal", headers=RETRY_AFTER),
        "502": answer("ComfyUI unreachable or answering with an error.", "StartRefusal"),
        "503": answer("Cylindria's queue for `auto` is full (`queue_full`), or the state "
                      "file takes no writes (`state_unavailable`).",
                      "StartRefusal", headers=RETRY_AFTER),
        "504": answer("ComfyUI did not answer in time and had not queued the job.",
                      "StartRefusal"),
    }


def paths(shape: Shape) -> dict[str, Any]:
    op = shape.operation
    status = answer("The job.", "JobStatus")
    refused = {"403": SESSION_REFUSED} if shape.keyed else {}
    not_found = answer("No such job (`job_not_found`).")
    event_id = f"^{NUMBER}?$"
    return {
        "/healthz": {"get": op(
            "Liveness: Cylindria itself is up.", {"200": answer("Up.", "Health")},
            secured=False, tags=("health",))},
        "/readyz": {"get": op(
            "Readiness: a job can be taken now.",
            {"200": answer("Ready.", "Readiness"),
             "503": answer("Not ready, with the reasons.", "Readiness")},
            secured=False, tags=("health",))},
        "/serverstatus": {"get": op(
            "The state of one GPU.",
            {"200": answer("The GPU (`degraded` when ComfyUI or the listener is down).",
                           "GpuStatus"),
             "400": answer("A GpuId that is no GPU (`unknown_gpu`).")},
            parameters=[shape.named_gpu(default="0")], tags=("gpus",))},
        "/startjob/{job_id}/": {"put": op(
            "Submit a workflow under your job id.",
            {"202": answer("Accepted by ComfyUI, or held in Cylindria's queue until a "
                           "GPU frees (GpuId=auto; `held` is true).", "StartReply"),
             **shape.waited(finished=True, repeat=True), **start_errors()},
            parameters=[JOB_ID, shape.named_gpu(auto=True),
                        {"name": "priority", "in": "query", "required": False,
                         "description": f"For GpuId=auto: higher leaves Cylindria's queue "
                                        f"first (-{PRIORITY_RANGE} to {PRIORITY_RANGE}, "
                                        "default 0).",
                         "schema": {"type": "string", "pattern": PRIORITY}},
                        {"name": "X-Callback-Url", "in": "header", "required": False,
                         "description": "An http(s) URL to POST the final status to: no "
                                        "user name or password in it, and a host that "
                                        "resolves to an address webhooks may go to "
                                        "(else 422). Empty: no callback.",
                         "schema": {"type": "string", "maxLength": MAX_CALLBACK_URL,
                                    "pattern": CALLBACK_URL}}, shape.wait_parameter()],
            body={"required": True,
                  "description": "The body may be compressed, as its Content-Encoding "
                                 "says (gzip or deflate).",
                  "content": {
                      JSON: {"schema": {"anyOf": [ref("Workflow"),
                                                  ref("WorkflowWithInputs")]}},
                      "multipart/form-data": openapi_inputs.multipart_job()}})},
        "/jobstatus/{job_id}/": {"get": op(
            "Where a job is.", {"200": status, "400": answer("A bad job_id or wait."),
                                "404": not_found, **openapi_parts.AMBIGUOUS,
                                **shape.waited()},
            parameters=[JOB_ID, shape.wait_parameter()])},
        "/joboutput/{job_id}/{index}": {"get": op(
            "One output of a job, streamed from its GPU (or from the node holding it).",
            {"200": {"description": "The file (or text).",
                     "content": {"*/*": {"schema": {"type": "string",
                                                    "format": "binary"}}}},
             "206": {"description": "The range asked for.",
                     "content": {"*/*": {"schema": {"type": "string",
                                                    "format": "binary"}}}},
             "400": answer("A bad job_id or index."),
             "404": answer("No such job or output, or ComfyUI no longer has the file."),
             **openapi_parts.OUTPUT_ERRORS},
            parameters=[JOB_ID, {"name": "index", "in": "path", "required": True,
                                 "schema": {"type": "string", "pattern": f"^{NUMBER}$"}},
                        {"name": "Range", "in": "header", "required": False,
                         "schema": {"type": "string"}}, openapi_parts.FORWARDED_HEADER])},
        "/canceljob/{job_id}/": {"post": op(
            "Cancel a queued or running job (a job held for a GPU at once).",
            {"202": answer("Asked (or passed to the node holding it); the job.", "JobStatus"),
             "400": answer("A bad job_id."), "404": not_found,
             "409": openapi_parts.CANCEL_CONFLICT,
             **refused},
            parameters=[JOB_ID, CSRF_HEADER])},
        "/retryjob/{job_id}/": {"post": op(
            "Run a failed, cancelled or rejected job again.",
            {"202": answer("A new attempt, accepted (or held for a GPU).", "StartReply"),
             "404": not_found, **openapi_parts.passed_on(start_errors()),
             **shape.waited(finished=True), **refused},
            parameters=[JOB_ID, shape.gpu_parameter("GpuId", "query", auto=True), CSRF_HEADER,
                        shape.wait_parameter(), openapi_parts.FORWARDED_HEADER])},
        "/jobs/": {"get": op(
            "Jobs, newest first, a page at a time.",
            {"200": answer("A page.", "JobsPage"),
             "400": answer("A bad state, gpu, limit or before.")},
            parameters=[
                {"name": "state", "in": "query", "required": False,
                 "description": "One state or a comma-separated list (empty: all).",
                 "schema": {"type": "string",
                            "pattern": f"^\\s*{STATES}?\\s*(,\\s*{STATES}?\\s*)*$"}},
                {"name": "limit", "in": "query", "required": False,
                 "description": f"Jobs a page, 1 to {MAX_PAGE} (default {DEFAULT_PAGE}).",
                 "schema": {"type": "string", "pattern": LIMIT}},
                *shape.jobs_filters()])},
        "/gpus/": {"get": op("Every GPU (with PostgreSQL, every node's).",
                             {"200": answer("The GPUs.", "GpuList")}, tags=("gpus",))},
        "/gpus/{gpu_id}/drain": {"post": drain(shape, "Stop automatic placement on a GPU.")},
        "/gpus/{gpu_id}/undrain": {"post": drain(shape, "Open a drained GPU again.")},
        "/events/": {"get": op(
            "A server-sent event stream of job changes.",
            {"200": {"description": "Events `job` (data: the job's status JSON) and "
                                    "`resync` (data: what to do), each with an "
                                    "increasing id. With PostgreSQL, every node's jobs "
                                    "(another node's with `node`), with ids every node "
                                    "shares, so a stream resumes on any node.",
                     "content": {"text/event-stream": {"schema": ref("Event")}}},
             "400": answer("A bad job_id or Last-Event-ID."),
             "429": answer("Too many open streams (`too_many_streams`), in all or "
                           "from this client address"
                           + (", or wrong keys." if shape.keyed else "."),
                           headers=RETRY_AFTER), **openapi_parts.EVENTS_ELSEWHERE},
            parameters=[{**JOB_ID, "in": "query", "required": False,
                         "description": "Only this job's events (empty: every job's).",
                         "schema": {"type": "string",
                                    "pattern": optional(JOB_ID_CHARACTERS)}},
                        {"name": "Last-Event-ID", "in": "header", "required": False,
                         "description": "The id of the last event received: the stream "
                                        "starts with what changed since (empty: now).",
                         "schema": {"type": "string", "pattern": event_id}},
                        *openapi_parts.EVENTS_RESUME])},
        "/metrics": {"get": op(
            "Metrics in Prometheus' text format (docs/monitoring.md).",
            {"200": {"description": "The metrics.",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
            secured=shape.metrics_keyed, tags=("operations",))},
        "/openapi.json": {"get": op(
            "This document.", {"200": {"description": "OpenAPI 3.1.",
                                       "content": {JSON: {"schema": {"type": "object"}}}}},
            tags=("operations",))},
        "/docs": {"get": op("This document, for people.", shape.page(),
                            tags=("operations",))},
        "/docs/openapi-3.0.json": {"get": op(
            "This document in OpenAPI 3.0 form, for the page's viewer.",
            {"200": {"description": "OpenAPI 3.0.",
                     "content": {JSON: {"schema": {"type": "object"}}}}},
            tags=("operations",))},
        "/docs/static/{filename}": {"get": op(
            "The page's assets.", {"200": {"description": "A file."},
                                   "404": {"description": "No such file."}},
            parameters=[{"name": "filename", "in": "path", "required": True,
                         "schema": {"type": "string"}}], secured=False,
            tags=("operations",))},
        **openapi_dashboard.paths(shape),
        **openapi_inputs.paths(shape),
    }


def drain(shape: Shape, summary: str) -> dict[str, Any]:
    return shape.operation(
        summary, {"200": answer("The GPU.", "GpuStatus"),
                  "400": answer("No such GPU (`unknown_gpu`)."),
                  **({"403": SESSION_REFUSED} if shape.keyed else {})},
        parameters=[shape.gpu_parameter("gpu_id", "path"), CSRF_HEADER], tags=("gpus",))


def document(settings: Settings) -> dict[str, Any]:
    """The contract of a server run with `settings`."""
    shape = Shape.of(settings)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Cylindria", "version": __version__,
                 "description": "One job service in front of the ComfyUI instances of a "
                                "multi-GPU machine."},
        "paths": paths(shape),
        "components": {"schemas": schemas(shape)},
    }
    if shape.keyed:
        # Without a key nothing is asked for, so nothing is declared.
        doc["components"]["securitySchemes"] = {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                       "description": "The server's key (CYLINDRIA_API_KEY)."},
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "The same key as a Bearer token."}}
        doc["security"] = [{"apiKey": []}, {"bearer": []}]
    return doc


# JSON Schema keywords that OpenAPI 3.0's schemas lack; they only narrow or annotate.
NOT_IN_30 = frozenset({"propertyNames", "contentMediaType"})


def as_openapi_30(node: Any) -> Any:
    """The document in OpenAPI 3.0 form: `type: [t, "null"]` becomes `type: t,
    nullable: true`, and what 3.0 lacks is left out (the page's viewer reads 3.0 only)."""
    if isinstance(node, dict):
        out = {key: as_openapi_30(value) for key, value in node.items()
               if key not in NOT_IN_30}
        kinds = out.get("type")
        if isinstance(kinds, list):
            rest = [k for k in kinds if k != "null"]
            out["type"] = rest[0] if len(rest) == 1 else "object"
            if "null" in kinds:
                out["nullable"] = True
        return out
    if isinstance(node, list):
        return [as_openapi_30(item) for item in node]
    return node


def document_30(settings: Settings) -> dict[str, Any]:
    doc = as_openapi_30(copy.deepcopy(document(settings)))
    doc["openapi"] = "3.0.3"
    return doc


@dataclass(frozen=True, slots=True)
class Documents:
    """The contract of one app, built once from its settings."""

    v31: dict[str, Any]
    v30: dict[str, Any]


DOCUMENTS: web.AppKey[Documents] = web.AppKey("openapi_documents", Documents)


@routes.get("/openapi.json", name="openapi")
async def get_openapi(request: web.Request) -> web.Response:
    return json_response(request.app[DOCUMENTS].v31)


@routes.get("/docs/openapi-3.0.json", name="openapi_ui")
@access(Access.FEED)  # what the page reads: the key, or a dashboard sign-in
async def get_openapi_30(request: web.Request) -> web.Response:
    return json_response(request.app[DOCUMENTS].v30)


# Swagger UI runs its own scripts from this server, and sets styles inline.
DOCS_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"),
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@routes.get("/docs", name="docs")
@access(Access.PAGE)
async def get_docs(request: web.Request) -> web.Response:
    response = aiohttp_jinja2.render_template("docs.html", request, {})
    response.headers.update(DOCS_HEADERS)
    return response


def setup(app: web.Application) -> None:
    settings = app[SETTINGS]
    app[DOCUMENTS] = Documents(document(settings), document_30(settings))
    app.add_routes(routes)
    app.router.add_static("/docs/static", Path(swagger_ui_bundle.swagger_ui_path),
                          name="docs_static")
