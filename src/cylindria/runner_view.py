"""What `cylindria run` shows while a job goes: one live progress line, drawn by rich."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn


class Bar:
    """The job's state, place in line, GPU and node, progress and ETA, on one line."""

    def __init__(self, job_id: str, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), TextColumn("{task.fields[state]}"),
            BarColumn(bar_width=30), TaskProgressColumn(),
            TextColumn("{task.fields[where]}"), TextColumn("{task.fields[eta]}"),
            console=console, refresh_per_second=8)
        self.task = self.progress.add_task(job_id, total=100, state="submitted",
                                           where="", eta="")
        self.shown = 0.0

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def update(self, status: Mapping[str, Any]) -> None:
        state = str(status.get("state") or "?")
        progress = status.get("progress")
        if isinstance(progress, int | float):
            # The service never lets progress go back; a late poll must not either.
            self.shown = max(self.shown, float(progress))
        if state == "completed":
            self.shown = 1.0
        self.progress.update(self.task, completed=round(self.shown * 100, 1),
                             state=describe(status), where=where(status),
                             eta=eta(status))


def describe(status: Mapping[str, Any]) -> str:
    """The state, and while it waits, its place in line."""
    state = str(status.get("state") or "?")
    place = status.get("queue_position")
    if state == "queued" and isinstance(place, int) and place > 0:
        if status.get("gpu_id") is None:
            return f"held, place {place} in line"
        return f"queued, place {place}"
    if state == "queued" and status.get("gpu_id") is None:
        return "held"
    if state == "running" and status.get("cancel_requested"):
        return "cancelling"
    return state


def where(status: Mapping[str, Any]) -> str:
    """The GPU, and the node that runs with its step."""
    gpu = status.get("gpu_id")
    text = "no GPU yet" if gpu is None else f"GPU {gpu}"
    node = status.get("current_node")
    if status.get("state") == "running" and node is not None:
        text += f" · node {node}"
        steps = status.get("node_progress")
        if isinstance(steps, Mapping) and steps.get("max"):
            text += f" {steps.get('value')}/{steps.get('max')}"
    return text


def eta(status: Mapping[str, Any]) -> str:
    seconds = status.get("eta_seconds")
    if status.get("state") not in ("queued", "running"):
        return ""
    if not isinstance(seconds, int | float):
        return "ETA --"
    seconds = max(0, round(seconds))
    minutes, rest = divmod(seconds, 60)
    return f"ETA {minutes}m{rest:02d}s" if minutes else f"ETA {rest}s"
