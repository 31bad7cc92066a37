"""Nodes sharing PostgreSQL: the jobs of a node that died, settled as lost by another.

A node is dead when its heartbeat is older than the grace period and its session is
gone: its advisory lock is free (a node that is merely slow still holds it). One node
at a time rescues (an advisory lock of its own), in one transaction; each job's row is
rewritten only if it is unchanged since it was read, and the dead node's row is locked
meanwhile, so a node coming back under that name loads its jobs after the rescue. Its
held jobs are not settled: they wait in the nodes' one line, for the others' GPUs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from ..core.elsewhere import lose_on_dead_node, requeue_from_dead_node
from ..core.records import Job, to_record
from ..nodes import GRACE_BEATS
from . import queue
from .backend import IN_FLIGHT_STATES, decode_job, encode_record
from .postgres import PostgresDatabase, node_lock

# The rescuers' lock: class "Cyrs" in ASCII, apart from the nodes' own ("Cyln").
RESCUE_LOCK = (0x43797273, 1)
TRY_RESCUE_LOCK = "SELECT pg_try_advisory_xact_lock(%s, %s)"
# Nodes silent past the grace period (or GRACE_BEATS of their own interval, when that
# is longer) that did not stop cleanly and still have jobs in flight; by the database's
# clock. A node stopped cleanly keeps its jobs for when it starts again.
SILENT = """
SELECT n.name, n.heartbeat_at FROM nodes n
WHERE n.name <> %s AND n.stopped_at IS NULL
  AND n.heartbeat_at < now() - make_interval(secs => greatest(%s, %s * n.heartbeat_seconds))
  AND EXISTS (SELECT 1 FROM jobs j WHERE j.node = n.name AND j.state = ANY(%s)
              AND (j.queue_key IS NULL OR j.gpu_id IS NOT NULL))
ORDER BY n.name
"""
TRY_NODE = "SELECT pg_try_advisory_lock(%s, %s)"
UNLOCK_NODE = "SELECT pg_advisory_unlock(%s, %s)"
# The node's row, locked until the rescue commits, and only if its heartbeat is the one
# read (a node that came back has written a new one).
HOLD_NODE = ("SELECT 1 FROM nodes WHERE name = %s AND heartbeat_at = %s "
             "AND stopped_at IS NULL FOR UPDATE")
# Its held jobs wait in the nodes' one line and go to the others' GPUs: left alone, and
# those it had claimed but not yet written as sent (it died in between) put back.
BACK_IN_LINE = ("UPDATE jobs SET gpu_id = NULL WHERE node = %s AND queue_key IS NOT NULL "
                "AND gpu_id IS NOT NULL")
ITS_JOBS = ("SELECT record FROM jobs WHERE node = %s AND state = ANY(%s) "
            "AND queue_key IS NULL")
# Each row rewritten only where its record is still the one read.
# A job run again (CYLINDRIA_RETRY_LOST) goes back in the nodes' one line: no GPU, a
# key in the line. Every row settled is fenced: the node, if it was only late, cannot
# write over it (until it starts again, and loads it as settled).
SETTLE = """
UPDATE jobs j SET state = u.state, gpu_id = u.gpu_id, finished_at = u.finished_at,
    record = u.record, queue_key = u.queue_key, models = u.models, fenced = true
FROM unnest(%s::text[], %s::text[], %s::text[], %s::integer[], %s::double precision[],
            %s::text[], %s::double precision[], %s::text[])
     AS u(job_id, old, state, gpu_id, finished_at, record, queue_key, models)
WHERE j.node = %s AND j.job_id = u.job_id AND j.record = u.old
"""


@dataclass(frozen=True, slots=True)
class Rescued:
    """A dead node whose jobs in flight were settled: how many, and of those how many
    were put back in the nodes' one line to run again (CYLINDRIA_RETRY_LOST)."""

    node: str
    silent_since: datetime
    jobs: int
    requeued: int = 0


@dataclass(frozen=True, slots=True)
class Retries:
    """What CYLINDRIA_RETRY_LOST and CYLINDRIA_MAX_ATTEMPTS allow a lost job."""

    retry_lost: int = 0
    max_attempts: int = 1

    def allow(self, job: Job) -> bool:
        return (job.automatic_retries < self.retry_lost
                and job.attempt < self.max_attempts)


def rescue(database: PostgresDatabase, grace: float,
           retries: Retries = Retries()) -> list[Rescued]:
    """Settle the jobs in flight of every dead node as lost (or run them again, as
    `retries` allow); on the journal's thread. Nothing when another node is rescuing."""
    return database._run(lambda conn: _rescue(conn, database, grace, retries))


def _rescue(conn: psycopg.Connection[Any], database: PostgresDatabase, grace: float,
            retries: Retries) -> list[Rescued]:
    states = list(IN_FLIGHT_STATES)
    done: list[Rescued] = []
    with conn.transaction():
        if not conn.execute(TRY_RESCUE_LOCK, RESCUE_LOCK).fetchone()[0]:
            return done
        for node, heartbeat_at in conn.execute(SILENT, (database.node.name, grace,
                                                        GRACE_BEATS, states)).fetchall():
            key = node_lock(node)
            if not conn.execute(TRY_NODE, key).fetchone()[0]:
                continue  # its session lives: slow, not dead
            conn.execute(UNLOCK_NODE, key)
            if conn.execute(HOLD_NODE, (node, heartbeat_at)).fetchone() is None:
                continue  # it came back meanwhile
            done.append(_settle(conn, node, heartbeat_at, states, retries,
                                database.aging))
        if any(rescued.requeued for rescued in done):
            queue.announce(conn)
    return done


def _settle(conn: psycopg.Connection[Any], node: str, since: datetime,
            states: list[str], retries: Retries, aging: float) -> Rescued:
    now = datetime.now(UTC)
    conn.execute(BACK_IN_LINE, (node,))
    columns: list[list[Any]] = [[], [], [], [], [], [], [], []]
    requeued = 0
    for (text,) in conn.execute(ITS_JOBS, (node, states)).fetchall():
        job = decode_job(text)
        if not lose_on_dead_node(job, node, since, now):
            continue
        if retries.allow(job):
            requeue_from_dead_node(job, now)
            requeued += 1
        record = to_record(job)
        finished = job.finished_at.timestamp() if job.finished_at is not None else None
        state = job.state.value
        values = (job.job_id, text, state, job.gpu_id, finished, encode_record(record),
                  queue.queue_key(record, state, job.gpu_id, aging),
                  queue.models_text(record))
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    if not columns[0]:
        return Rescued(node, since, 0)
    count = conn.execute(SETTLE, (*columns, node)).rowcount
    return Rescued(node, since, count, min(requeued, count))
