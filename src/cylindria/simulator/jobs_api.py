"""ComfyUI's /api/jobs endpoints: one listing of queue and history, and one job in detail."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..jsonio import json_response
from .engine import Engine, QueueItem

JOB_STATUSES = ("pending", "in_progress", "completed", "failed")


def _drop_none(job: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in job.items() if value is not None}


def _workflow_id(extra_data: dict[str, Any]) -> Any:
    pnginfo = extra_data.get("extra_pnginfo")
    if isinstance(pnginfo, dict) and isinstance(pnginfo.get("workflow"), dict):
        return pnginfo["workflow"].get("id")
    return None


def _queued_job(item: QueueItem, status: str) -> dict[str, Any]:
    return _drop_none({"id": item[1], "status": status, "priority": item[0],
                       "create_time": item[3].get("create_time"), "outputs_count": 0,
                       "workflow_id": _workflow_id(item[3])})


def _history_job(prompt_id: str, entry: dict[str, Any], detail: bool) -> dict[str, Any]:
    number, _, prompt, extra_data, _ = entry["prompt"]
    status = entry["status"]
    start = end = error = None
    for event, data in status["messages"]:
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            if event == "execution_error":
                error = data
    count = 0
    preview = None
    for node_id, ui in entry["outputs"].items():
        for media, items in ui.items():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and "filename" in item:
                    count += 1
                    if preview is None and media in ("images", "video", "audio"):
                        preview = {**item, "nodeId": node_id, "mediaType": media}
    job = _drop_none({
        "id": prompt_id,
        "status": "completed" if status["status_str"] == "success" else "failed",
        "priority": number,
        "create_time": extra_data.get("create_time"),
        "execution_start_time": start,
        "execution_end_time": end,
        "execution_error": error,
        "outputs_count": count,
        "preview_output": preview,
        "workflow_id": _workflow_id(extra_data),
    })
    if detail:
        job["outputs"] = entry["outputs"]
        job["execution_status"] = status
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def _created(job: dict[str, Any]) -> float:
    return job.get("create_time") or 0


def _duration(job: dict[str, Any]) -> float:
    start, end = job.get("execution_start_time"), job.get("execution_end_time")
    return end - start if start is not None and end is not None else 0


class JobsHandlers:
    """GET /api/jobs and GET /api/jobs/{job_id}, read from the engine's queue and history."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _all_jobs(self) -> list[dict[str, Any]]:
        engine = self._engine
        jobs = []
        if engine.running is not None:
            jobs.append(_queued_job(engine.running.item, "in_progress"))
        jobs.extend(_queued_job(item, "pending") for item in engine.pending)
        jobs.extend(_history_job(prompt_id, entry, detail=False)
                    for prompt_id, entry in engine.history.items())
        return jobs

    async def get_jobs(self, request: web.Request) -> web.Response:
        query = request.query
        statuses: list[str] | None = None
        if "status" in query:
            statuses = [s.strip() for s in query["status"].split(",") if s.strip()]
            bad = [s for s in statuses if s not in JOB_STATUSES]
            if bad:
                return json_response({"error": f"Invalid status value(s): {', '.join(bad)}. "
                                               f"Valid values: {', '.join(JOB_STATUSES)}"},
                                     status=400)
        sort_by = query.get("sort_by", "created_at")
        if sort_by not in ("created_at", "execution_duration"):
            return json_response(
                {"error": "sort_by must be 'created_at' or 'execution_duration'"}, status=400)
        sort_order = query.get("sort_order", "desc")
        if sort_order not in ("asc", "desc"):
            return json_response({"error": "sort_order must be 'asc' or 'desc'"}, status=400)
        limit: int | None = None
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                limit = 0
            if limit <= 0:
                return json_response({"error": "limit must be a positive integer"}, status=400)
        try:
            offset = max(0, int(query.get("offset", 0)))
        except ValueError:
            return json_response({"error": "offset must be an integer"}, status=400)
        jobs = self._all_jobs()
        if statuses is not None:
            jobs = [job for job in jobs if job["status"] in statuses]
        if "workflow_id" in query:
            jobs = [job for job in jobs if job.get("workflow_id") == query["workflow_id"]]
        jobs.sort(key=_created if sort_by == "created_at" else _duration,
                  reverse=sort_order == "desc")
        total = len(jobs)
        page = jobs[offset:offset + limit] if limit is not None else jobs[offset:]
        return json_response({"jobs": page, "pagination": {
            "offset": offset, "limit": limit, "total": total,
            "has_more": offset + len(page) < total}})

    async def get_job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        engine = self._engine
        # Queue before history, so a job finishing in between is still found.
        if engine.running is not None and engine.running.prompt_id == job_id:
            return json_response(_queued_job(engine.running.item, "in_progress"))
        for item in engine.pending:
            if item[1] == job_id:
                return json_response(_queued_job(item, "pending"))
        entry = engine.history.get(job_id)
        if entry is not None:
            return json_response(_history_job(job_id, entry, detail=True))
        return json_response({"error": "Job not found"}, status=404)
