"""Job records: their states, the moves between them, and what a record knows of itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


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

# Which state may follow which. Terminal states have no way out: a late or
# duplicated ComfyUI event can never reopen a finished job.
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
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True, eq=False)
class Job:
    job_id: str
    gpu_id: int
    fingerprint: str
    prompt_id: str
    nodes: frozenset[str]
    submitted_at: datetime
    updated_at: datetime
    state: JobState = JobState.QUEUED
    confirmed: bool = False
    detail: str = "Submitting to ComfyUI."
    queue_position: int | None = None
    current_node: str | None = None
    node_progress: dict[str, Any] | None = None
    done_nodes: set[str] = field(default_factory=set)
    planned_nodes: frozenset[str] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: dict[str, Any] | None = None
    node_errors: dict[str, Any] | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    cached_nodes: set[str] = field(default_factory=set)
    missing_since: datetime | None = None
    seq: int = 0
    cancel_requested_at: datetime | None = None
    callback_url: str | None = None
    webhook: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def outputs_reused(self) -> bool:
        """ComfyUI served an output node from its cache: the files are an earlier run's."""
        return any(node in self.cached_nodes for node in self.outputs)

    def output_entries(self) -> list[dict[str, Any]]:
        """Every file or text ComfyUI reported, in a stable order, one entry each; an
        entry's place in the list is its index under /joboutput."""
        entries: list[dict[str, Any]] = []
        for node_id, output in self.outputs.items():
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
        plan = self.planned_nodes or self.nodes
        if not plan:
            return 0.0
        done = len(self.done_nodes & plan)
        fraction = 0.0
        np = self.node_progress
        if np and np.get("max") and np.get("node") not in self.done_nodes:
            fraction = min(max(float(np["value"]) / float(np["max"]), 0.0), 1.0)
        # Never report 1.0 before ComfyUI says the job succeeded.
        return round(min((done + fraction) / len(plan), 0.999), 4)



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
