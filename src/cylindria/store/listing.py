"""Nodes sharing a PostgreSQL database: every node's jobs in one listing, newest first,
by a number the database gives each job (the nodes' sequence numbers are each node's
own, so they cannot order the jobs of several)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg

from ..core.ports import HeldElsewhere, Listed
from ..nodes import GRACE_BEATS
from .backend import decode_job

# Migration 6: `listed`, the order across the nodes. A row takes the next number of one
# sequence when it is first written, and a new one when its job starts a new attempt
# (its seq changes on its node: a trigger, whichever statement writes it), as a node's
# own listing puts a retried job first. Rows written before are numbered in (node, seq)
# order.
MIGRATION = (
    "CREATE SEQUENCE jobs_listed AS bigint",
    "ALTER TABLE jobs ADD COLUMN listed bigint",
    """UPDATE jobs SET listed = numbered.listed FROM (
        SELECT node, seq, row_number() OVER (ORDER BY node, seq) AS listed FROM jobs
    ) numbered WHERE jobs.node = numbered.node AND jobs.seq = numbered.seq""",
    "SELECT setval('jobs_listed', (SELECT COALESCE(MAX(listed), 0) + 1 FROM jobs), false)",
    "ALTER TABLE jobs ALTER COLUMN listed SET DEFAULT nextval('jobs_listed'), "
    "ALTER COLUMN listed SET NOT NULL",
    "ALTER SEQUENCE jobs_listed OWNED BY jobs.listed",
    """CREATE FUNCTION jobs_listed_anew() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.listed := nextval('jobs_listed');
        RETURN NEW;
    END $$""",
    # The WHEN clause is checked without calling the function: rows whose seq stays
    # (nearly every write) cost nothing more. A job another node takes from the shared
    # line gets a number of that node's (queue.py) and keeps its place here.
    "CREATE TRIGGER jobs_listed_anew BEFORE UPDATE OF seq ON jobs FOR EACH ROW "
    "WHEN (NEW.seq IS DISTINCT FROM OLD.seq AND NEW.node = OLD.node) "
    "EXECUTE FUNCTION jobs_listed_anew()",
    "CREATE UNIQUE INDEX jobs_by_listed ON jobs (listed)",
    "CREATE INDEX jobs_listed_by_state ON jobs (state, listed)",
    "CREATE INDEX jobs_listed_by_gpu ON jobs (node, gpu_id, listed)",
)
# Above every number the sequence gives: the first page.
NEWEST = 2**63 - 1
# Whether a job's node is alive (`n` its row in `nodes`, `grace` its beats), by the
# database's clock.
NODE_ALIVE = ("COALESCE(n.stopped_at IS NULL AND n.heartbeat_at > now() - "
              "make_interval(secs => {grace} * n.heartbeat_seconds), false)")
# A page of every node's jobs, newest first, by which filters it has (states; a GPU,
# which is one node's), one statement each so that each is planned on the index that
# fits it. Each row has what `/jobstatus/` shows of another node's job: the URL its node
# advertises, and whether that node is alive.
_PAGE = ("SELECT j.listed, j.node, n.advertise_url, "
         + NODE_ALIVE.format(grace="%(grace)s") + ", j.record "
         "FROM jobs j LEFT JOIN nodes n ON n.name = j.node "
         "WHERE j.listed < %(before)s{states}{gpu} ORDER BY j.listed DESC LIMIT %(limit)s")
PAGES = {(states, gpu): _PAGE.format(
             states=" AND j.state = ANY(%(states)s)" if states else "",
             gpu=" AND j.node = %(node)s AND j.gpu_id = %(gpu)s" if gpu else "")
         for states in (False, True) for gpu in (False, True)}


def page(conn: psycopg.Connection[Any], states: Iterable[str] | None,
         gpu: tuple[str, int] | None, before: int | None, limit: int) -> list[Listed]:
    """Up to `limit` jobs of every node, newest first, below `before` in the order across
    the nodes (None: from the newest); `gpu` is (node, GPU number)."""
    args: dict[str, Any] = {"grace": GRACE_BEATS, "limit": limit,
                            "before": NEWEST if before is None else before,
                            "states": None if states is None else sorted(states),
                            "node": None if gpu is None else gpu[0],
                            "gpu": None if gpu is None else gpu[1]}
    rows = conn.execute(PAGES[states is not None, gpu is not None], args).fetchall()
    return [Listed(key, HeldElsewhere(node, url, alive, decode_job(record)))
            for key, node, url, alive, record in rows]
