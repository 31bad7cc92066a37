"""A state file full of finished jobs, written straight through the journal's database."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import ujson
from support import quick

from cylindria.core.records import Job, JobState, to_record
from cylindria.core.workflow import read_workflow
from cylindria.store.database import open_database

BATCH = 20_000


def fill(path: Path, count: int, gpus: int) -> None:
    """`count` completed jobs, each with one image output and its workflow, as a busy
    host leaves them behind."""
    database, _ = open_database(path, memory_jobs=0)
    now = time.time()
    workflow = read_workflow(ujson.dumps(quick(1))).data
    try:
        for start in range(0, count, BATCH):
            rows = []
            workflows = []
            for n in range(start, min(count, start + BATCH)):
                moment = datetime.fromtimestamp(now - (count - n) * 0.01, UTC)
                job = Job(job_id=f"old-{n}", gpu_id=n % gpus, fingerprint="0" * 64,
                          prompt_id=f"00000000-0000-4000-8000-{n:012d}",
                          nodes=frozenset({"1", "2", "3"}), submitted_at=moment,
                          updated_at=moment, seq=n + 1, state=JobState.COMPLETED,
                          confirmed=True, detail="Completed.", started_at=moment,
                          finished_at=moment, done_nodes={"1", "2", "3"},
                          outputs={"3": {"images": [{"filename": f"q_{n:05}_.png",
                                                     "subfolder": "bench",
                                                     "type": "output"}]}})
                rows.append((job.seq, job.job_id, job.state.value, job.gpu_id,
                             job.finished_at.timestamp(), to_record(job)))
                workflows.append((job.job_id, workflow))
            database.write(rows, workflows)
    finally:
        database.close()
