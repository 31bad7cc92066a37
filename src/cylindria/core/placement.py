"""Choosing a GPU: GPU numbers from requests, and a GPU's load."""

from __future__ import annotations

from ..errors import UnknownGpu
from .numbers import canonical_int


def gpu_number(raw: str, count: int, name: str = "GpuId") -> int:
    """The GPU numbered `raw` among `count`; a clear 400 naming `name` and the range
    otherwise."""
    gpu_id = canonical_int(raw)
    if gpu_id is None:
        raise UnknownGpu(f"{name} must be a whole number from 0 to {count - 1}, in plain "
                         f"digits (got {raw[:40]!r}).")
    if not 0 <= gpu_id < count:
        raise UnknownGpu(f"{name} {gpu_id} does not exist: this server has {count} "
                         f"GPU(s), numbered 0 to {count - 1}.")
    return gpu_id


def load(in_flight: int, queue_remaining: int | None) -> int:
    """Running plus queued work: the jobs Cylindria knows, or ComfyUI's own count when
    it is higher (jobs submitted to ComfyUI by someone else)."""
    return max(in_flight, queue_remaining or 0)
