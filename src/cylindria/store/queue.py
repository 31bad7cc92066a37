"""Nodes sharing PostgreSQL: one queue of `GpuId=auto` jobs for all of them.

A held job stays the row of the node that took it, with a sort key (`queue_key`: the
time it was put in line, less its priority times the aging step, so that waiting
raises a job as a higher priority would) and the models it loads. When a GPU of any
node has room, that node claims the first job of the line in one statement: the rows
at the head are locked with FOR UPDATE SKIP LOCKED in a CTE (claimers at the same
moment take different rows, none waits for another), one is picked (within the model
window, the first whose models the GPU holds, else the first), and its row becomes
the claimer's (node, a number of its own, the GPU), its workflow with it.

Job ids are unique across nodes (a unique index), and every write of a job is fenced
by its node: a node's write of a job that another node has taken, or that the rescuer
settled while the node seemed dead, changes nothing, and the journal tells the node,
which lets the job go. A notification on one channel tells
the nodes that a job was put in line (any may take it) or that one was taken (its old
node lets it go); polling covers every lost notification."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg

from ..core.records import Job
from .backend import SharedDatabase, decode_job

# Notifications: the payload is empty for a job put in line, else the name of the node
# whose job another node took.
CHANNEL = "cylindria_queue"
# Migration 5. A node's rows that were held before it are put in line first, in their
# node's order (their keys, sequence numbers, are far below any time in seconds).
MIGRATION = (
    "CREATE UNIQUE INDEX jobs_unique_job_id ON jobs (job_id)",
    "DROP INDEX jobs_by_job_id",
    "ALTER TABLE jobs ADD COLUMN queue_key double precision, ADD COLUMN models text",
    # Set on a row the rescuer settled for a dead node: that node's writes of it change
    # nothing from then on (it may only be late, not dead), until it starts again.
    "ALTER TABLE jobs ADD COLUMN fenced boolean NOT NULL DEFAULT false",
    "UPDATE jobs SET queue_key = seq WHERE state = 'queued' AND gpu_id IS NULL",
    # The line: only held jobs no GPU was given have a key here.
    "CREATE INDEX jobs_queue ON jobs (queue_key) "
    "WHERE queue_key IS NOT NULL AND gpu_id IS NULL",
)
# Before migration 5: ids held by several nodes (written by nodes of schema 2 to 4,
# when ids were each node's own), which the unique index would refuse.
SHARED_IDS = ("SELECT job_id, string_agg(node, ', ' ORDER BY node) FROM jobs "
              "GROUP BY job_id HAVING COUNT(*) > 1 ORDER BY job_id LIMIT 5")
# The claim, one statement: the head of the line locked, skipping rows other claimers
# hold; one picked; its workflow and row moved to the claimer, the workflow returned
# with the record (as the statement found it), so sending it takes no second read.
CLAIM = """
WITH head AS (
    SELECT node, job_id, queue_key, models FROM jobs
    WHERE queue_key IS NOT NULL AND gpu_id IS NULL
    ORDER BY queue_key LIMIT %(window)s
    FOR UPDATE SKIP LOCKED
), pick AS (
    SELECT node, job_id FROM head
    ORDER BY COALESCE(string_to_array(models, E'\\n') && %(models)s::text[], false) DESC,
             queue_key
    LIMIT 1
), moved AS (
    UPDATE workflows w SET node = %(me)s FROM pick
    WHERE w.node = pick.node AND w.job_id = pick.job_id AND pick.node <> %(me)s
)
UPDATE jobs j SET node = %(me)s, gpu_id = %(gpu)s, fenced = false,
    seq = CASE WHEN j.node = %(me)s THEN j.seq ELSE %(seq)s END
FROM pick WHERE j.node = pick.node AND j.job_id = pick.job_id
RETURNING pick.node, j.record,
    CASE WHEN pick.node <> %(me)s THEN pg_notify(%(channel)s, pick.node) END,
    (SELECT w.workflow FROM workflows w WHERE w.node = pick.node AND w.job_id = pick.job_id)
"""
# A node's own held job taken out of the line (it is being cancelled), if still there.
TAKE_BACK = ("UPDATE jobs SET queue_key = NULL WHERE node = %s AND job_id = %s "
             "AND queue_key IS NOT NULL AND gpu_id IS NULL RETURNING job_id")
# Of these ids, the ones no longer this node's (taken by another, or gone).
STILL_MINE = "SELECT job_id FROM jobs WHERE node = %s AND job_id = ANY(%s)"
# At start-up: the node's jobs it claimed and had not yet written as given a GPU (it
# stopped in between) go back in line.
BACK_IN_LINE = ("UPDATE jobs SET gpu_id = NULL WHERE node = %s AND job_id = ANY(%s) "
                "AND queue_key IS NOT NULL AND gpu_id IS NOT NULL")
NOTIFY = "SELECT pg_notify(%s, %s)"
# At start-up, what the rescuer settled while this node was away is what it loads: its
# writes count again.
UNFENCE = "UPDATE jobs SET fenced = false WHERE node = %s AND fenced"


def queue_key(record: dict[str, Any], state: str, gpu_id: int | None,
              aging: float) -> float | None:
    """The job's place in the line (lower goes first), or None when it is not in it."""
    if state != "queued" or gpu_id is not None or not record.get("auto"):
        return None
    since = record.get("submitted_at") or record.get("updated_at") or 0.0
    return since - record.get("priority", 0) * aging


def models_text(record: dict[str, Any]) -> str | None:
    models = record.get("models")
    return "\n".join(models) if models else None


def check_ids(conn: psycopg.Connection[Any], name: str) -> str | None:
    """Before migration 5: why it cannot apply (ids several nodes hold), or None."""
    rows = conn.execute(SHARED_IDS).fetchall()
    if not rows:
        return None
    held = "; ".join(f"{job_id!r} by {nodes}" for job_id, nodes in rows)
    return (f"database {name}: job ids are unique across nodes from this version on, and "
            f"some are held by several nodes ({held}). Delete all but one of each "
            "(DELETE FROM jobs WHERE node = '...' AND job_id = '...'), then start again")


def claim(db: SharedDatabase, gpu: int, models: Iterable[str], window: int,
          seq: int) -> tuple[str, Job, bytes | None] | None:
    """The first job of the line for this node's GPU `gpu`, now this node's, with the
    node that held it and its workflow; None when the line is empty (or every head row
    is being taken). `seq`: its number here if it comes from another node."""
    args = {"window": max(1, window), "models": sorted(models), "me": db.node.name,
            "gpu": gpu, "seq": seq, "channel": CHANNEL}
    row = db.run(lambda conn: conn.execute(CLAIM, args).fetchone())
    if row is None:
        return None
    job = decode_job(row[1])
    if row[0] != db.node.name:
        job.seq = seq
    return row[0], job, None if row[3] is None else bytes(row[3])


def take_back(db: SharedDatabase, job_id: str) -> bool:
    """Take this node's held job out of the line; False when another node has it."""
    args = (db.node.name, job_id)
    return db.run(lambda conn: conn.execute(TAKE_BACK, args).fetchone()) is not None


def gone(db: SharedDatabase, job_ids: list[str]) -> list[str]:
    """Of these jobs of this node, the ones the database says are no longer its."""
    args = (db.node.name, job_ids)
    mine = {row[0] for row in db.run(lambda conn: conn.execute(STILL_MINE, args))}
    return [job_id for job_id in job_ids if job_id not in mine]


def back_in_line(conn: psycopg.Connection[Any], node: str, held: list[str]) -> None:
    """At start-up: the node's claimed jobs not yet written as sent go back in line,
    and the rows the rescuer settled while it was away are its own to write again."""
    if held:
        conn.execute(BACK_IN_LINE, (node, held))
    conn.execute(UNFENCE, (node,))


def announce(conn: psycopg.Connection[Any]) -> None:
    """A job was put in line: any node with room may take it."""
    conn.execute(NOTIFY, (CHANNEL, ""))
