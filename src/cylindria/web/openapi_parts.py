"""What every part of the contract is built of: references, answers, shared parameters,
and what the settings decide (a key, the GPUs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..nodes import NODE_NAME

JSON = "application/json"
HTML = {"text/html": {"schema": {"type": "string"}}}
# Whole numbers as core/numbers reads them: ASCII digits, no sign, no leading zero.
NUMBER = "(0|[1-9][0-9]{0,17})"
COUNTING = "[1-9][0-9]{0,17}"
# Not only dots: URLs fold '.' and '..' path segments away.
JOB_ID_CHARACTERS = r"(?!\.+$)[A-Za-z0-9._-]{1,128}"
JOB_ID = {"name": "job_id", "in": "path", "required": True,
          "description": "1 to 128 letters, digits, '.', '_' or '-', not only dots.",
          "schema": {"type": "string", "pattern": f"^{JOB_ID_CHARACTERS}$"}}
CSRF_HEADER = {"name": "X-CSRF-Token", "in": "header", "required": False,
               "description": "With a dashboard sign-in (not the key): the token of the "
                              "page, from its `csrf-token` meta tag.",
               "schema": {"type": "string"}}


def optional(pattern: str) -> str:
    """A query value that may also be empty, which means the same as leaving it out."""
    return f"^({pattern})?$"


def whole_up_to(most: int) -> str:
    """A pattern for the whole numbers 1 to `most` (at least 1) in plain digits."""
    digits = str(most)
    # Fewer digits than `most`, then as many, digit by digit below it, then itself.
    forms = [f"[1-9][0-9]{{0,{len(digits) - 2}}}"] if len(digits) > 1 else []
    for at, digit in enumerate(digits):
        low = 0 if at else 1
        if int(digit) > low:
            forms.append(f"{digits[:at]}[{low}-{int(digit) - 1}][0-9]{{{len(digits) - at - 1}}}")
    return "|".join([*forms, digits])


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
                               "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
UNAUTHORIZED = answer("The API key is missing or wrong.")
THROTTLED = answer("Too many wrong keys from this address (`too_many_attempts`).",
                   headers=RETRY_AFTER)
SESSION_REFUSED = answer("A dashboard sign-in without this page's X-CSRF-Token "
                         "(`csrf_token_invalid`), or from another site's page "
                         "(`origin_refused`). The API key needs neither.")


@dataclass(frozen=True, slots=True)
class Shape:
    """What the contract says that follows from the settings: whether a key guards the
    API (and /metrics), how many GPUs there are, how large a workflow may be, and
    whether nodes share a PostgreSQL database."""

    keyed: bool
    metrics_keyed: bool
    gpus: int
    max_nodes: int
    max_wait: int
    clustered: bool = False

    @classmethod
    def of(cls, settings: Settings) -> Shape:
        keyed = bool(settings.api_key)
        return cls(keyed, keyed and not settings.metrics_public, settings.num_gpus,
                   settings.max_nodes, settings.max_wait, settings.database_url is not None)

    def named_gpu(self, auto: bool = False, default: str | None = None) -> dict[str, Any]:
        """GpuId of a submission or /serverstatus: with nodes sharing a database, also
        any node's GPU by its name."""
        gpu = self.gpu_parameter("GpuId", "query", auto=auto, default=default)
        if self.clustered:
            gpu["description"] += (" Or any node's GPU by its name across the nodes, "
                                   "NODE:N as GET /gpus/ names it (e.g. gpu-b:0): a "
                                   "submission is passed to that node; its status is "
                                   "its node's last heartbeat.")
            gpu["schema"]["pattern"] = (f"^([0-{self.gpus - 1}]{'|auto' if auto else ''}|"
                                        f"{NODE_NAME.pattern}:{NUMBER})$")
        return gpu

    def jobs_filters(self) -> list[dict[str, Any]]:
        """`gpu` and `before` of GET /jobs/, which mean more with nodes sharing a
        database: any node's GPU, and the order across the nodes."""
        gpu = self.gpu_parameter("gpu", "query", empty=True)
        before = {"name": "before", "in": "query", "required": False,
                  "description": "A page's `next_before`: the jobs older than it (a job's "
                                 "number on this server).",
                  "schema": {"type": "string", "pattern": optional(COUNTING)}}
        if self.clustered:
            gpu["description"] += (" Or any node's GPU by its name across the nodes, "
                                   "NODE:N as GET /gpus/ names it (e.g. gpu-b:0); a bare "
                                   "number is this node's GPU.")
            gpu["schema"]["pattern"] = optional(
                f"[0-{self.gpus - 1}]|{NODE_NAME.pattern}:{NUMBER}")
            before["description"] = (
                "A page's `next_before`: the jobs older than it in the order across the "
                "nodes (a number the database gives each job when it is first written "
                "and at each new attempt; not a job's number on its node).")
        return [gpu, before]

    def wait_parameter(self) -> dict[str, Any]:
        """`?wait=`: seconds to wait for the job to finish before answering."""
        return {"name": "wait", "in": "query", "required": False,
                "description": "Answer as soon as the job is finished, or after this many "
                               f"whole seconds (1 to {self.max_wait}, CYLINDRIA_MAX_WAIT) "
                               "with the job as it stands then. Empty or left out: at once.",
                "schema": {"type": "string", "pattern": optional(whole_up_to(self.max_wait))}}

    def waited(self, finished: bool = False, repeat: bool = False) -> dict[str, Any]:
        """What `?wait=` adds to an operation's answers: 429 when too many requests wait
        and, for a submission (`finished`), 200 with the job's status once it finished
        within the wait (`repeat`: beside the reply to a repeated submission)."""
        busy = answer("Too many requests wait with ?wait= (`too_many_waiters`), in all or "
                      "from this client address: ask without it and poll, or retry later"
                      + (", or wrong keys." if self.keyed else "."), headers=RETRY_AFTER)
        if not finished:
            return {"429": busy}
        if repeat:
            return {"200": answer("The same job and workflow were accepted before (nothing "
                                  "is sent again); or, with ?wait=, the job finished within "
                                  "the wait: its status, as GET /jobstatus/ answers it.",
                                  {"anyOf": [ref("StartReply"), ref("JobStatus")]}),
                    "429": busy}
        return {"200": answer("With ?wait=: the job finished within the wait; its status, "
                              "as GET /jobstatus/ answers it.", "JobStatus"), "429": busy}

    def gpu_parameter(self, name: str, location: str, auto: bool = False,
                      empty: bool = False, default: str | None = None) -> dict[str, Any]:
        """A GPU's number (at most 8 GPUs: one digit), or `auto`; `empty` for a filter
        that an empty value leaves out."""
        pattern = f"[0-{self.gpus - 1}]" + ("|auto" if auto else "")
        what = (f"A GPU number from 0 to {self.gpus - 1}" if self.gpus > 1
                else "The GPU's number, 0")
        what += ", or `auto` for placement." if auto else "."
        if default is not None:
            what += f" Default {default}."
        return {"name": name, "in": location, "required": location == "path",
                "description": what,
                "schema": {"type": "string",
                           "pattern": optional(pattern) if empty else f"^({pattern})$"}}

    def page(self) -> dict[str, Any]:
        """The answers of a page of the dashboard or of /docs."""
        answers: dict[str, Any] = {"200": {"description": "An HTML page.", "content": HTML}}
        if self.keyed:
            answers["303"] = {"description": "Not signed in: to the sign-in form."}
        return answers

    def operation(self, summary: str, responses: dict[str, Any], *,
                  parameters: list[Any] = (), body: dict[str, Any] | None = None,
                  secured: bool = True, tags: tuple[str, ...] = ("jobs",)) -> dict[str, Any]:
        """`secured`: whether the key guards the route when the server has one."""
        op: dict[str, Any] = {"summary": summary, "tags": list(tags),
                              "parameters": list(parameters), "responses": dict(responses)}
        if body is not None:
            op["requestBody"] = body
        if not self.keyed:
            return op
        if secured:
            op["responses"].setdefault("401", UNAUTHORIZED)
            op["responses"].setdefault("429", THROTTLED)
        else:
            op["security"] = []
        return op


# `GET /gpus/`; with PostgreSQL (nodes sharing the database) its GPUs are named across
# the nodes and `nodes` lists every node with its GPUs.
_NODE_GPU = {
    "type": "object", "required": ["name", "node", "gpu_id", "reachable", "drained"],
    "description": "A GPU as its node's heartbeat carries it (this node's: live).",
    "properties": {
        "name": {"type": "string", "description": "NODE:N, e.g. gpu-a:0."},
        "node": {"type": "string"}, "gpu_id": {"type": "integer"},
        "status": {"type": "string", "enum": ["ok", "degraded"]},
        "reachable": {"type": "boolean"}, "drained": {"type": "boolean"},
        "queue_depth": {"type": "integer"},
        "queue_remaining": {"type": ["integer", "null"]},
        "running_job": {"type": ["string", "null"]}, "load": {"type": "number"},
        "models": {"type": "array", "items": {"type": "string"},
                   "description": "Model files its recent jobs loaded, oldest first."},
        "devices": {"type": "array", "items": {"type": "object"}}}}
NODE_SCHEMAS: dict[str, Any] = {
    "GpuList": {
        "type": "object", "required": ["gpus"],
        "properties": {
            "gpus": {"type": "array", "items": {"allOf": [ref("GpuStatus"), {
                "type": "object",
                "properties": {"name": {"type": "string", "description": "With "
                                        "PostgreSQL: NODE:N, e.g. gpu-a:0."},
                               "node": {"type": "string"}}}]}},
            "nodes": {"type": "array", "items": ref("ClusterNode"),
                      "description": "With PostgreSQL only: every node sharing the "
                                     "database, this one first, then the others by name "
                                     "as their last heartbeat showed them."}}},
    "ClusterNode": {
        "type": "object",
        "required": ["name", "advertise_url", "self", "alive", "stopped",
                     "last_seen_seconds", "gpus"],
        "properties": {
            "name": {"type": "string"}, "advertise_url": {"type": "string"},
            "self": {"type": "boolean", "description": "The node that answered."},
            "alive": {"type": "boolean", "description": "Its last heartbeat is within "
                      "three of its heartbeat intervals, and it did not stop."},
            "stopped": {"type": "boolean", "description": "It stopped cleanly."},
            "last_seen_seconds": {"type": "number"},
            "started_at": {"type": ["string", "null"]},
            "gpus": {"type": "array", "items": _NODE_GPU}}},
}

# `GET /jobstatus/` of another node's job (nodes sharing a PostgreSQL database): the
# status as that node last wrote it, with these fields; a node's own jobs have none but
# `node` in `GET /jobs/`.
ELSEWHERE: dict[str, Any] = {
    "node": {"type": "string", "description": "With PostgreSQL, in the answer about "
             "another node's job, and on every job GET /jobs/ lists: the node that holds "
             "it. Another node's job is as that node last wrote it (output and input URLs "
             "are on its advertise_url, or left out when it has none on record)."},
    "node_alive": {"type": "boolean", "description": "With `node`: its last heartbeat "
                   "is within three of its intervals, and it did not stop."},
    "as_of": {"type": "string", "format": "date-time", "description": "With `node`: "
              "the time of the last change that node wrote (progress and ETA are not "
              "written in between, and `eta_seconds` is null)."},
    "message": {"type": "string", "description": "With `node`, in the answer of POST "
                "/canceljob: the cancel was passed to that node, which cancels the job at "
                "once (at its next heartbeat at the latest); follow it with GET "
                "/jobstatus/."},
}
CANCEL_CONFLICT = answer(
    "The job is finished (`job_finished`); with PostgreSQL, the node that holds it is not "
    "alive (`node_not_alive`, `error.node` names it): both with the job's status fields "
    "beside `error` (as FinishedJob). Or several other nodes hold one of that id "
    "(`ambiguous_job_id`).")
# GET /joboutput/ of another node's job, streamed from that node.
FORWARDED_HEADER = {
    "name": "X-Cylindria-Forwarded", "in": "header", "required": False,
    "description": "Set by a node that passes the request on to the node holding the "
                   "job (its name): such a request is answered from that node's own jobs "
                   "and never passed on again.", "schema": {"type": "string"}}
OUTPUT_ERRORS = {
    "409": answer("With PostgreSQL: several other nodes hold a job of that id "
                  "(`ambiguous_job_id`)."),
    "502": answer("ComfyUI unreachable; with PostgreSQL, the node that holds the job "
                  "cannot be reached (`backend_unavailable`, `error.node` names it)."),
    "504": answer("ComfyUI, or the node that holds the job, did not answer in time.")}
AMBIGUOUS = {"409": answer(
    "With PostgreSQL: no job of this id on this node, and several other nodes hold one "
    "(`ambiguous_job_id`; `error.nodes` names them): ask the node it was submitted to.")}

# A retry (POST /retryjob) of another node's job is passed to that node, whose answer
# comes back as it gave it; what passing it on adds.
_PASSED_ON = {
    "409": " With PostgreSQL: the node that holds the job is not alive (`node_not_alive`; "
           "`error.node` and `node` name it, `state` is the job's), or several other nodes "
           "hold one of that id (`ambiguous_job_id`).",
    "502": " With PostgreSQL: the node that holds the job cannot be reached "
           "(`backend_unavailable`, `error.node` names it).",
    "504": " Or the node that holds the job did not answer in time."}


def passed_on(answers: dict[str, Any]) -> dict[str, Any]:
    """`answers`, with what passing a request to the node holding the job adds."""
    return {code: {**body, "description": body["description"] + _PASSED_ON.get(code, "")}
            for code, body in answers.items()}


# GET /events/ with PostgreSQL: ?job_id= of another node's job is that node's stream,
# passed through; a resume reads the database.
EVENTS_ELSEWHERE = {
    "409": answer("With PostgreSQL: several other nodes hold a job of that id "
                  "(`ambiguous_job_id`)."),
    "502": answer("With PostgreSQL: the node that holds the job cannot be reached "
                  "(`backend_unavailable`, `error.node` names it); said before the "
                  "stream starts."),
    "503": answer("With PostgreSQL: a resume (Last-Event-ID) cannot read the database "
                  "now (`state_unavailable`).", headers=RETRY_AFTER),
    "504": answer("With PostgreSQL: the node that holds the job did not answer in time.")}
EVENTS_RESUME = [
    {"name": "last_event_id", "in": "query", "required": False,
     "description": "Last-Event-ID, for clients that cannot send the header; the header "
                    "wins.", "schema": {"type": "string", "pattern": f"^{NUMBER}?$"}},
    FORWARDED_HEADER]
