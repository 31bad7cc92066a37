"""GET /openapi.json: the API's contract, OpenAPI 3.1, and GET /docs, its page.

The document is written here by hand, route by route; a test walks the router and
fails when a route or method is missing from it, so the two cannot drift.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import swagger_ui_bundle
from aiohttp import web

from .. import __version__
from ..jsonio import json_response
from . import openapi_inputs
from .auth import Access, access

routes = web.RouteTableDef()

JOB_ID = {"name": "job_id", "in": "path", "required": True,
          "description": "1 to 128 letters, digits, '.', '_' or '-'.",
          "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"}}
GPU_QUERY = {"name": "GpuId", "in": "query", "required": False,
             "description": "A GPU number (ASCII digits), or `auto` for placement.",
             "schema": {"type": "string", "pattern": "^([0-9]+|auto)$"}}
JSON = "application/json"
CSRF_HEADER = {"name": "X-CSRF-Token", "in": "header", "required": False,
               "description": "With a dashboard sign-in (not the key): the token of the "
                              "page, from its `csrf-token` meta tag.",
               "schema": {"type": "string"}}
FAILURE_FILTERS = [
    {"name": "state", "in": "query", "required": False,
     "description": "failed, rejected, cancelled, or several separated by commas.",
     "schema": {"type": "string"}},
    {"name": "gpu", "in": "query", "required": False, "schema": {"type": "string",
                                                                  "pattern": "^[0-9]+$"}},
    {"name": "before", "in": "query", "required": False,
     "schema": {"type": "string", "pattern": "^[0-9]+$"}}]


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def answer(description: str, schema: str | dict[str, Any] = "Error",
           media: str = JSON, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"description": description,
            "content": {media: {"schema": ref(schema) if isinstance(schema, str) else schema}}}
    if headers:
        body["headers"] = headers
    return body


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.",
                               "schema": {"type": "string"}}}
UNAUTHORIZED = answer("The API key is missing or wrong (only when the server has "
                      "CYLINDRIA_API_KEY).")
THROTTLED = answer("Too many wrong keys from this address (`too_many_attempts`).",
                   headers=RETRY_AFTER)
SESSION_REFUSED = answer("A dashboard sign-in without this page's X-CSRF-Token "
                         "(`csrf_token_invalid`), or from another site's page "
                         "(`origin_refused`). The API key needs neither.")


def operation(summary: str, responses: dict[str, Any], *, parameters: list[Any] = (),
              body: dict[str, Any] | None = None, secured: bool = True,
              tags: tuple[str, ...] = ("jobs",)) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": list(tags),
                          "parameters": list(parameters), "responses": dict(responses)}
    if body is not None:
        op["requestBody"] = body
    if secured:
        op["responses"].setdefault("401", UNAUTHORIZED)
        op["responses"].setdefault("429", THROTTLED)
    else:
        op["security"] = []
    return op


def schemas() -> dict[str, Any]:
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
                "attempt": {"type": "integer"},
                "attempts": {"type": "array", "items": {"type": "object"}},
                "priority": {"type": "integer"},
                "placement": {**nullable_str, "description": "Why `auto` chose its GPU."},
                "eta_seconds": {"type": ["number", "null"], "minimum": 0,
                                "description": "Expected seconds until it ends (the line "
                                               "ahead included); null until learned."},
                "expected_finish_at": time,
                "node_errors": {"type": ["object", "null"]}}},
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
                                     "reasons": {"type": "object"}}},
        "Workflow": {"type": "object",
                     "description": "An API-format workflow: the bare graph `{node_id: "
                                    "{class_type, inputs}}`, or ComfyUI's envelope "
                                    "`{prompt, extra_data}`, which may carry `inputs` "
                                    "(WorkflowWithInputs)."},
        **openapi_inputs.schemas(ref),
    }


ERROR_CODES = ["bad_request", "invalid_workflow", "payload_too_large",
               "unsupported_encoding", "too_many_nodes", "callback_not_allowed",
               "validation_failed", "unauthorized", "job_not_found", "output_not_found",
               "job_id_conflict", "job_finished", "not_retryable", "gpu_drained",
               "unknown_gpu", "too_many_streams", "too_many_attempts",
               "backend_error", "backend_unavailable", "backend_timeout",
               "state_unavailable", "queue_full", "not_found", "method_not_allowed",
               "origin_refused", "csrf_token_invalid", "internal_error",
               *openapi_inputs.ERROR_CODES]


def paths() -> dict[str, Any]:
    status = answer("The job.", "JobStatus")
    refused = {"403": SESSION_REFUSED}
    not_found = answer("No such job (`job_not_found`).")
    start_errors = {
        "400": answer("Bad job_id or GpuId, a body that is not a JSON object, a "
                      "compressed body that does not decompress, or a multipart form "
                      "without one `workflow` part or with two files of one name.",
                      "StartRefusal"),
        "408": answer("A multipart body stopped arriving (`body_timeout`).",
                      "StartRefusal"),
        "409": answer("The job exists with another workflow or other input files, the "
                      "GPU is drained, or (retry) an input is no longer stored "
                      "(`input_gone`).", "StartRefusal"),
        "413": answer("The body is over 32 MiB, a file over CYLINDRIA_INPUT_MAX, or too "
                      "many nodes.", "StartRefusal"),
        "415": answer("An unsupported Content-Encoding, or a multipart type other than "
                      "form-data.", "StartRefusal"),
        "422": answer("Not a workflow ComfyUI can run, refused by ComfyUI's validation, "
                      "a callback URL that may not be called, a reference to no stored "
                      "input (`unknown_input`, naming the node and input), an input sent "
                      "that no node uses or that is not valid base64 (`invalid_input`), "
                      "or an input URL that could not be fetched (`input_unavailable`).",
                      "StartRefusal"),
        "507": answer("The input store is full of inputs jobs in flight use.",
                      "StartRefusal", headers=RETRY_AFTER),
        "502": answer("ComfyUI unreachable or answering with an error.", "StartRefusal"),
        "503": answer("Cylindria's queue for `auto` is full (`queue_full`), or the state "
                      "file takes no writes (`state_unavailable`).",
                      "StartRefusal", headers=RETRY_AFTER),
        "504": answer("ComfyUI did not answer in time and had not queued the job.",
                      "StartRefusal"),
    }
    html = {"text/html": {"schema": {"type": "string"}}}
    page = {"200": {"description": "An HTML page.", "content": html},
            "303": {"description": "Not signed in: to the sign-in form."}}
    return {
        "/healthz": {"get": operation(
            "Liveness: Cylindria itself is up.", {"200": answer("Up.", "Health")},
            secured=False, tags=("health",))},
        "/readyz": {"get": operation(
            "Readiness: a job can be taken now.",
            {"200": answer("Ready.", "Readiness"),
             "503": answer("Not ready, with the reasons.", "Readiness")},
            secured=False, tags=("health",))},
        "/serverstatus": {"get": operation(
            "The state of one GPU.",
            {"200": answer("The GPU (`degraded` when ComfyUI or the listener is down).",
                           "GpuStatus"),
             "400": answer("A GpuId that is no GPU (`unknown_gpu`).")},
            parameters=[{**GPU_QUERY, "schema": {"type": "string", "pattern": "^[0-9]+$"}}],
            tags=("gpus",))},
        "/startjob/{job_id}/": {"put": operation(
            "Submit a workflow under your job id.",
            {"202": answer("Accepted by ComfyUI, or held in Cylindria's queue until a "
                           "GPU frees (GpuId=auto; `held` is true).", "StartReply"),
             "200": answer("The same job and workflow were accepted before; nothing is "
                           "sent again.", "StartReply"), **start_errors},
            parameters=[JOB_ID, GPU_QUERY,
                        {"name": "priority", "in": "query", "required": False,
                         "description": "For GpuId=auto: higher leaves Cylindria's queue "
                                        "first (-1000 to 1000, default 0).",
                         "schema": {"type": "string", "pattern": "^-?[0-9]+$"}},
                        {"name": "X-Callback-Url", "in": "header", "required": False,
                         "description": "An http(s) URL to POST the final status to.",
                         "schema": {"type": "string"}},
                        {"name": "Content-Encoding", "in": "header", "required": False,
                         "schema": {"type": "string",
                                    "enum": ["identity", "gzip", "deflate"]}}],
            body={"required": True, "content": {
                JSON: {"schema": {"anyOf": [ref("Workflow"),
                                            ref("WorkflowWithInputs")]}},
                "multipart/form-data": openapi_inputs.multipart_job()}})},
        "/jobstatus/{job_id}/": {"get": operation(
            "Where a job is.", {"200": status, "400": answer("A bad job_id."),
                                "404": not_found}, parameters=[JOB_ID])},
        "/joboutput/{job_id}/{index}": {"get": operation(
            "One output of a job, streamed from its GPU.",
            {"200": {"description": "The file (or text).",
                     "content": {"*/*": {"schema": {"type": "string",
                                                    "format": "binary"}}}},
             "206": {"description": "The range asked for.",
                     "content": {"*/*": {"schema": {"type": "string",
                                                    "format": "binary"}}}},
             "400": answer("A bad job_id or index."),
             "404": answer("No such job or output, or ComfyUI no longer has the file."),
             "502": answer("ComfyUI unreachable.")},
            parameters=[JOB_ID, {"name": "index", "in": "path", "required": True,
                                 "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                        {"name": "Range", "in": "header", "required": False,
                         "schema": {"type": "string"}}])},
        "/canceljob/{job_id}/": {"post": operation(
            "Cancel a queued or running job (a job held for a GPU at once).",
            {"202": answer("Asked; the job as it stands.", "JobStatus"),
             "400": answer("A bad job_id."), "404": not_found,
             "409": answer("The job is finished (`job_finished`).", "FinishedJob"),
             **refused},
            parameters=[JOB_ID, CSRF_HEADER])},
        "/retryjob/{job_id}/": {"post": operation(
            "Run a failed, cancelled or rejected job again.",
            {"202": answer("A new attempt, accepted (or held for a GPU).", "StartReply"),
             "404": not_found, **start_errors, **refused},
            parameters=[JOB_ID, GPU_QUERY, CSRF_HEADER])},
        "/jobs/": {"get": operation(
            "Jobs, newest first, a page at a time.",
            {"200": answer("A page.", "JobsPage"),
             "400": answer("A bad state, gpu, limit or before.")},
            parameters=[
                {"name": "state", "in": "query", "required": False,
                 "description": "One state or a comma-separated list.",
                 "schema": {"type": "string"}},
                {"name": "gpu", "in": "query", "required": False,
                 "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                {"name": "before", "in": "query", "required": False,
                 "schema": {"type": "string", "pattern": "^[0-9]+$"}}])},
        "/gpus/": {"get": operation(
            "Every GPU.", {"200": answer("The GPUs.", {
                "type": "object", "required": ["gpus"],
                "properties": {"gpus": {"type": "array", "items": ref("GpuStatus")}}})},
            tags=("gpus",))},
        "/gpus/{gpu_id}/drain": {"post": _drain("Stop automatic placement on a GPU.")},
        "/gpus/{gpu_id}/undrain": {"post": _drain("Open a drained GPU again.")},
        "/events/": {"get": operation(
            "A server-sent event stream of job changes.",
            {"200": {"description": "Events `job` (data: the job's status JSON) and "
                                    "`resync`, each with an increasing id.",
                     "content": {"text/event-stream": {"schema": {"type": "string"}}}},
             "400": answer("A bad job_id or Last-Event-ID."),
             "429": answer("Too many open streams (`too_many_streams`) or wrong keys.",
                           headers=RETRY_AFTER)},
            parameters=[{**JOB_ID, "in": "query", "required": False},
                        {"name": "Last-Event-ID", "in": "header", "required": False,
                         "schema": {"type": "string", "pattern": "^[0-9]+$"}}])},
        "/metrics": {"get": operation(
            "Metrics in Prometheus' text format (docs/monitoring.md).",
            {"200": {"description": "The metrics.",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
            tags=("operations",))},
        "/openapi.json": {"get": operation(
            "This document.", {"200": {"description": "OpenAPI 3.1.",
                                       "content": {JSON: {"schema": {"type": "object"}}}}},
            tags=("operations",))},
        "/docs": {"get": operation("This document, for people.", page, tags=("operations",))},
        "/docs/openapi-3.0.json": {"get": operation(
            "This document in OpenAPI 3.0 form, for the page's viewer.",
            {"200": {"description": "OpenAPI 3.0.",
                     "content": {JSON: {"schema": {"type": "object"}}}}},
            tags=("operations",))},
        "/docs/static/{filename}": {"get": operation(
            "The page's assets.", {"200": {"description": "A file."},
                                   "404": {"description": "No such file."}},
            parameters=[{"name": "filename", "in": "path", "required": True,
                         "schema": {"type": "string"}}], secured=False,
            tags=("operations",))},
        "/": {"get": operation("The dashboard.", page, tags=("dashboard",))},
        "/dashboard/state": {"get": operation(
            "The dashboard's data.", {"200": answer("GPUs and recent jobs.",
                                                    {"type": "object"})},
            tags=("dashboard",))},
        "/dashboard/failures": {"get": operation(
            "Failed, rejected and cancelled jobs, with counts for the last hour.",
            {**page, "400": answer("A bad state, gpu or before.")},
            parameters=FAILURE_FILTERS, tags=("dashboard",))},
        "/dashboard/failures/state": {"get": operation(
            "The failures page's data.",
            {"200": answer("A page of failures.", {"type": "object"}),
             "400": answer("A bad state, gpu or before.")},
            parameters=FAILURE_FILTERS, tags=("dashboard",))},
        "/dashboard/job/{job_id}": {"get": operation(
            "A job's page.", {**page, "404": {"description": "No such job."}},
            parameters=[JOB_ID], tags=("dashboard",))},
        "/dashboard/job/{job_id}/state": {"get": operation(
            "A job page's data.", {"200": answer("The job.", {"type": "object"}),
                                   "404": not_found},
            parameters=[JOB_ID], tags=("dashboard",))},
        "/dashboard/login": {
            "get": operation("The sign-in form.", {"200": page["200"]}, secured=False,
                             tags=("dashboard",)),
            "post": operation("Sign in with the API key.",
                              {"303": {"description": "Signed in: to the dashboard."},
                               "400": answer("The form could not be read."),
                               "429": THROTTLED,
                               "401": {"description": "A wrong key: the form again.",
                                       "content": html}},
                              body={"content": {"application/x-www-form-urlencoded": {
                                  "schema": {"type": "object",
                                             "properties": {"key": {"type": "string"},
                                                            "next": {"type": "string"}}}}}},
                              secured=False, tags=("dashboard",))},
        **openapi_inputs.paths(operation, answer, RETRY_AFTER),
        "/dashboard/logout": {"post": operation(
            "Sign out.", {"303": {"description": "To the sign-in form."}},
            tags=("dashboard",))},
        "/dashboard/static/{filename}": {"get": operation(
            "The dashboard's assets.", {"200": {"description": "A file."},
                                        "404": {"description": "No such file."}},
            parameters=[{"name": "filename", "in": "path", "required": True,
                         "schema": {"type": "string"}}], secured=False,
            tags=("dashboard",))},
    }


def _drain(summary: str) -> dict[str, Any]:
    return operation(summary, {"200": answer("The GPU.", "GpuStatus"),
                               "400": answer("No such GPU (`unknown_gpu`)."),
                               "403": SESSION_REFUSED},
                     parameters=[{"name": "gpu_id", "in": "path", "required": True,
                                  "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                                 CSRF_HEADER],
                     tags=("gpus",))


@functools.cache
def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cylindria", "version": __version__,
                 "description": "One job service in front of the ComfyUI instances of a "
                                "multi-GPU machine."},
        "paths": paths(),
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                           "description": "Needed when the server has CYLINDRIA_API_KEY."},
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "The same key as a Bearer token."}}},
        "security": [{"apiKey": []}, {"bearer": []}],
    }


@routes.get("/openapi.json", name="openapi")
async def get_openapi(request: web.Request) -> web.Response:
    return json_response(document())


def as_openapi_30(node: Any) -> Any:
    """The document in OpenAPI 3.0 form: `type: [t, "null"]` becomes `type: t,
    nullable: true` (the page's viewer reads 3.0 only)."""
    if isinstance(node, dict):
        out = {key: as_openapi_30(value) for key, value in node.items()}
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


@functools.cache
def document_30() -> dict[str, Any]:
    doc = as_openapi_30(copy.deepcopy(document()))
    doc["openapi"] = "3.0.3"
    return doc


@routes.get("/docs/openapi-3.0.json", name="openapi_ui")
@access(Access.FEED)  # what the page reads: the key, or a dashboard sign-in
async def get_openapi_30(request: web.Request) -> web.Response:
    return json_response(document_30())


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
    app.add_routes(routes)
    app.router.add_static("/docs/static", Path(swagger_ui_bundle.swagger_ui_path),
                          name="docs_static")
