"""Job records: their states, the moves between them, and what a record knows of itself."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import ujson

from ..jsonio import dumps
from .estimates import NodeCost, Timeline


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED,
                      JobState.REJECTED})
IN_FLIGHT = frozenset({JobState.QUEUED, JobState.RUNNING})
# A finished job in one of these states may run again, as a new attempt.
RETRYABLE = frozenset({JobState.FAILED, JobState.CANCELLED, JobState.REJECTED})

# Which state may follow which. Terminal states have no way out: a late or
# duplicated ComfyUI event can never reopen a finished job (only a retry can).
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.COMPLETED, JobState.FAILED,
                                JobState.CANCELLED, JobState.REJECTED}),
    JobState.RUNNING: frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
    JobState.REJECTED: frozenset(),
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return _isoformat(moment)


@functools.lru_cache(maxsize=8192)
def _isoformat(moment: datetime) -> str:
    # Cached: a job's status shows the same moments again at every change.
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True, eq=False)
class Job:
    """One job: its current attempt in full, earlier attempts in summary.

    Fields that most jobs never use stay None, so a finished record is small.
    `version` counts changes; `lasting_version` is the last one the journal must hold
    and `saved_version` the last one it does.
    """

    job_id: str
    # None for a job refused before it was placed on a GPU.
    gpu_id: int | None
    fingerprint: str
    prompt_id: str
    nodes: frozenset[str]
    submitted_at: datetime
    updated_at: datetime
    seq: int = 0
    state: JobState = JobState.QUEUED
    confirmed: bool = False
    detail: str = "Submitting to ComfyUI."
    # Placed by GpuId=auto: a new attempt may go to another GPU.
    auto: bool = False
    attempt: int = 1
    automatic_retries: int = 0
    # Lost, with an automatic retry due that could not be placed yet (no GPU ready).
    retry_owed: bool = False
    # Order in Cylindria's own queue (GpuId=auto), higher first.
    priority: int = 0
    # Model files the workflow loads, and why the dispatcher chose its GPU.
    models: frozenset[str] | None = None
    placement: str | None = None
    earlier_attempts: list[dict[str, Any]] | None = None
    queue_position: int | None = None
    current_node: str | None = None
    node_progress: dict[str, Any] | None = None
    done_nodes: set[str] | None = None
    planned_nodes: frozenset[str] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: dict[str, Any] | None = None
    node_errors: dict[str, Any] | None = None
    outputs: dict[str, Any] | None = None
    cached_nodes: set[str] | None = None
    missing_since: datetime | None = None
    cancel_requested_at: datetime | None = None
    callback_url: str | None = None
    webhook: dict[str, Any] | None = None
    # Input files the job uses: {"ref", "id", "name", "size", "media_type"} each, where
    # `ref` is the string in the workflow that stands for the file.
    inputs: list[dict[str, Any]] | None = None
    # Seconds this attempt spent putting its inputs on its GPU's ComfyUI.
    upload_seconds: float | None = None
    # Loaded from the journal at start-up and not yet checked against ComfyUI.
    unverified: bool = False
    # Cylindria may have missed some of this attempt's events (it restarted, or its
    # listener reconnected while the job ran): its end is taken from ComfyUI's history,
    # which holds every output. `ending` keeps the end the events told meanwhile.
    events_missed: bool = False
    ending: tuple[str, dict[str, Any]] | None = None
    # Once finished, a job is made compact: what its node sets told is kept as two
    # values, its outputs as JSON text (no containers for the garbage collector).
    final_progress: float | None = None
    final_reused: bool = False
    outputs_text: str | None = None
    version: int = 0
    # The last version the journal must hold, and the last one it does.
    lasting_version: int = 0
    saved_version: int = -1
    # Held in memory only: the cost of each node (from the workflow) and, while it
    # runs, the timeline that learns run times and weighs progress by them.
    costs: dict[str, NodeCost] | None = None
    timeline: Timeline | None = None
    # The last forecast for it (seconds, and the moment it should end).
    eta_seconds: float | None = None
    expected_finish_at: datetime | None = None
    # The serialized status body and the version it was made for.
    body: bytes | None = None
    body_version: int = -1

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def held(self) -> bool:
        """Waiting in Cylindria's own queue for a GPU (GpuId=auto)."""
        return self.gpu_id is None and self.state is JobState.QUEUED

    @property
    def outputs_reused(self) -> bool:
        """ComfyUI served an output node from its cache: the files are an earlier run's."""
        if self.final_progress is not None:
            return self.final_reused
        return bool(self.outputs and self.cached_nodes
                    and any(node in self.cached_nodes for node in self.outputs))

    def output_map(self) -> dict[str, Any]:
        """ComfyUI's outputs by node id."""
        if self.outputs_text is not None:
            return ujson.loads(self.outputs_text)
        return self.outputs or {}

    def output_entries(self) -> list[dict[str, Any]]:
        """Every file or text ComfyUI reported, in a stable order, one entry each; an
        entry's place in the list is its index under /joboutput."""
        entries: list[dict[str, Any]] = []
        for node_id, output in self.output_map().items():
            if not isinstance(output, dict):
                continue
            for key, items in output.items():
                kind = OUTPUT_KINDS.get(key)
                if kind is None or not isinstance(items, list):
                    continue
                for item in items:
                    if kind == "text":
                        entries.append({"node_id": node_id, "kind": "text",
                                        "text": item if isinstance(item, str) else str(item)})
                    elif isinstance(item, dict) and isinstance(item.get("filename"), str):
                        entries.append({
                            "node_id": node_id, "kind": kind, "filename": item["filename"],
                            "subfolder": str(item.get("subfolder") or ""),
                            "type": str(item.get("type") or "output"),
                        })
        return entries

    @property
    def progress(self) -> float:
        if self.state is JobState.COMPLETED:
            return 1.0
        if self.final_progress is not None:
            return self.final_progress
        if self.timeline is not None:
            # Weighed by learned times: a sampler's steps count for what they cost.
            return round(self.timeline.fraction(), 4)
        plan = self.planned_nodes or self.nodes
        if not plan:
            return 0.0
        done_nodes = self.done_nodes or set()
        done = len(done_nodes & plan)
        fraction = 0.0
        np = self.node_progress
        if np and np.get("node") not in done_nodes:
            fraction = _share(np.get("value"), np.get("max"))
        # Never report 1.0 before ComfyUI says the job succeeded.
        return round(min((done + fraction) / len(plan), 0.999), 4)

    def compact(self) -> None:
        """Fold a finished job's working state into final values."""
        if self.final_progress is not None:
            return
        self.final_reused = self.outputs_reused
        self.final_progress = self.progress
        if self.outputs and not _has_long_text(self.outputs):
            self.outputs_text = dumps(self.outputs)
            self.outputs = None
        self.nodes = NO_NODES
        self.done_nodes = self.cached_nodes = self.planned_nodes = None
        self.costs = self.timeline = None

    def reopen(self, nodes: Iterable[str]) -> None:
        """Clear what a finished attempt left, for a new attempt of these nodes."""
        self.final_progress = None
        self.final_reused = False
        self.outputs_text = None
        self.nodes = frozenset(nodes)

    def attempt_summary(self) -> dict[str, Any]:
        """The current attempt as it stands in the `attempts` list."""
        summary = {"attempt": self.attempt, "prompt_id": self.prompt_id,
                   "gpu_id": self.gpu_id, "state": self.state.value,
                   "submitted_at": isoformat(self.submitted_at),
                   "finished_at": isoformat(self.finished_at), "error": self.error}
        if self.upload_seconds is not None:
            summary["upload_seconds"] = self.upload_seconds
        return summary

    def attempts(self) -> list[dict[str, Any]]:
        """The last ATTEMPTS_SHOWN attempts, oldest first, this one last (`attempt` is
        the count of all)."""
        earlier = self.earlier_attempts or ()
        return [*earlier[max(len(earlier) + 1 - ATTEMPTS_SHOWN, 0):], self.attempt_summary()]


def _share(value: Any, maximum: Any) -> float:
    """`value` of `maximum` (a progress tick's), within [0, 1]; 0 for anything that is
    not two finite numbers (ComfyUI's NaN arrives as the word, see core/answers.py)."""
    try:
        share = float(value) / float(maximum)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return 0.0
    return min(max(share, 0.0), 1.0) if math.isfinite(share) else 0.0


# Attempts a status body lists (and the journal keeps): the last ones, so the answers
# about a job retried many times stay small (CYLINDRIA_MAX_ATTEMPTS caps the count).
ATTEMPTS_SHOWN = 20

NO_NODES: frozenset[str] = frozenset()
# Outputs holding a text this long stay as they are when a job is made compact: turning
# them into JSON and back would hold the event loop for longer than it is worth.
LONG_TEXT = 64 * 1024


def _has_long_text(outputs: dict[str, Any]) -> bool:
    return any(isinstance(text, str) and len(text) > LONG_TEXT
               for output in outputs.values() if isinstance(output, dict)
               for items in output.values() if isinstance(items, list)
               for text in items)

# ComfyUI's UI output keys and what each holds: files, or plain strings for text.
OUTPUT_KINDS = {"images": "image", "gifs": "gif", "videos": "video", "video": "video",
                "audio": "audio", "files": "file", "3d": "file", "text": "text"}


def error_summary(data: dict[str, Any]) -> dict[str, Any]:
    """What a client needs of ComfyUI's execution_error (which can be megabytes)."""
    traceback = data.get("traceback") or []
    if isinstance(traceback, str):
        traceback = [traceback]
    return {
        "type": data.get("exception_type"),
        "message": str(data.get("exception_message", "")).strip(),
        "node_id": data.get("node_id"),
        "node_type": data.get("node_type"),
        "traceback": [str(line) for line in traceback][-20:],
    }


# -- the journal's form of a record -------------------------------------------------

_TIMES = ("submitted_at", "updated_at", "started_at", "finished_at", "missing_since",
          "cancel_requested_at")
_SETS = ("done_nodes", "cached_nodes")
_PLAIN = ("job_id", "gpu_id", "fingerprint", "prompt_id", "seq", "confirmed", "detail",
          "auto", "attempt", "automatic_retries", "retry_owed", "earlier_attempts",
          "queue_position", "priority", "placement",
          "current_node", "node_progress", "error", "node_errors", "outputs", "callback_url",
          "webhook", "inputs", "upload_seconds")


# Values not written, because a record read back gets them anyway.
_DEFAULTS: dict[str, Any] = {"auto": False, "attempt": 1, "automatic_retries": 0,
                             "retry_owed": False, "confirmed": False, "priority": 0}


def to_record(job: Job) -> dict[str, Any]:
    """A plain, JSON-ready copy of the job: taken on the event loop, written elsewhere."""
    record: dict[str, Any] = {"state": job.state.value, "nodes": sorted(job.nodes)}
    for name in _PLAIN:
        value = getattr(job, name)
        if value is not None and value != _DEFAULTS.get(name):
            record[name] = value
    for name in _TIMES:
        moment = getattr(job, name)
        if moment is not None:
            record[name] = moment.timestamp()
    for name in _SETS:
        values = getattr(job, name)
        if values:
            record[name] = sorted(values)
    if job.earlier_attempts and len(job.earlier_attempts) >= ATTEMPTS_SHOWN:
        record["earlier_attempts"] = job.earlier_attempts[1 - ATTEMPTS_SHOWN:]
    if job.planned_nodes is not None:
        record["planned_nodes"] = sorted(job.planned_nodes)
    if job.models:
        record["models"] = sorted(job.models)
    if job.outputs is not None:
        # A copy: the journal serializes it on another thread while this one goes on.
        record["outputs"] = dict(job.outputs)
    elif job.outputs_text is not None:
        record["outputs"] = ujson.loads(job.outputs_text)
    if job.final_progress is not None:
        record["final_progress"] = job.final_progress
        record["final_reused"] = job.final_reused
    if job.webhook is not None:
        record["webhook"] = dict(job.webhook)
    return record


def from_record(record: dict[str, Any]) -> Job:
    values: dict[str, Any] = {name: record[name] for name in _PLAIN if name in record}
    for name in _TIMES:
        if record.get(name) is not None:
            values[name] = datetime.fromtimestamp(record[name], UTC)
    for name in _SETS:
        if record.get(name):
            values[name] = set(record[name])
    if record.get("planned_nodes") is not None:
        values["planned_nodes"] = frozenset(record["planned_nodes"])
    if record.get("models"):
        values["models"] = frozenset(record["models"])
    # A job refused before any GPU saw it has no gpu_id, and None is not written.
    values.setdefault("gpu_id", None)
    job = Job(state=JobState(record["state"]), nodes=frozenset(record.get("nodes") or ()),
              **values)
    if job.terminal:
        if "final_progress" in record:
            job.final_progress = record["final_progress"]
            job.final_reused = record.get("final_reused", False)
        job.compact()
    return job
