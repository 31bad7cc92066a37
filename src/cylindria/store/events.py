"""Nodes sharing a PostgreSQL database: every lasting change of every node's jobs as a
row of `job_events`, ids increasing across the nodes, so that an event stream on any
node carries every node's jobs, and resumes on any node with `Last-Event-ID`.

A row is written by a trigger on `jobs` whenever a row of it is inserted, or updated
with another record or node (the journal's commits, a claim from the nodes' one line,
a dead node's job settled by another): an event exists exactly when its job's row was
written, in the same transaction, and the trigger's NOTIFY wakes every node's reader.

Ids come from a sequence, taken before commit: a transaction may commit after another
that took a later id. The reader hands on rows in id order without a gap; a gap is
waited for until every transaction in progress when it was seen has ended (the
snapshot's xmin passed its xmax), and is then final (a rolled back write)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg

from ..core.records import Job
from .backend import SharedDatabase, decode_job
from .pgconnect import ConnectionThread

CHANNEL = "cylindria_events"
# Migration 8.
MIGRATION = (
    """CREATE TABLE job_events (
        id bigserial PRIMARY KEY,
        job_id text NOT NULL,
        node text NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        record text NOT NULL)""",
    "CREATE INDEX job_events_by_job ON job_events (job_id, id)",
    f"""CREATE FUNCTION cylindria_job_event() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO job_events (job_id, node, record)
        VALUES (NEW.job_id, NEW.node, NEW.record);
        PERFORM pg_notify('{CHANNEL}', '');
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER jobs_event_inserted AFTER INSERT ON jobs FOR EACH ROW "
    "EXECUTE FUNCTION cylindria_job_event()",
    "CREATE TRIGGER jobs_event_changed AFTER UPDATE ON jobs FOR EACH ROW "
    "WHEN (OLD.record IS DISTINCT FROM NEW.record OR OLD.node IS DISTINCT FROM NEW.node) "
    "EXECUTE FUNCTION cylindria_job_event()",
)
# New rows after an id, with the statement's snapshot: the oldest transaction still in
# progress (xmin) and the first not yet begun (xmax). One row with no event when none.
READ = """
SELECT pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint,
       e.id, e.job_id, e.node, e.record
FROM pg_current_snapshot() AS s LEFT JOIN LATERAL (
    SELECT id, job_id, node, record FROM job_events WHERE id > %s ORDER BY id LIMIT %s
) AS e ON true
ORDER BY e.id
"""
LATEST = "SELECT COALESCE(MAX(id), 0) FROM job_events"
# A resume: the events in (after, through], of one job or all; and the oldest id kept,
# to tell a gap pruned away.
HISTORY = """
SELECT id, node, record FROM job_events
WHERE id > %s AND id <= %s AND (%s::text IS NULL OR job_id = %s)
ORDER BY id LIMIT %s
"""
OLDEST = "SELECT MIN(id) FROM job_events"
# Among the oldest rows, those past the retention, or beyond the count kept.
PRUNE = """
DELETE FROM job_events WHERE id IN (SELECT id FROM job_events ORDER BY id LIMIT %s)
    AND (at < to_timestamp(%s) OR id <= (SELECT MAX(id) FROM job_events) - %s)
"""
# Events kept at most, whatever their age.
KEEP = 1_000_000
# Rows read at a time by the reader, and deleted at a time by the pruning.
READ_LIMIT = 500
PRUNE_BATCH = 5000
# The reader reads at least this often without a notification (the safety net), and
# this often while it waits for a gap to be filled.
POLL = 0.5
GAP_POLL = 0.05
RECONNECT = 2.0

# One event read: (id, job_id, node, job as the row was written).
Read = tuple[int, str, str, Job]


def history(db: SharedDatabase, after: int, through: int, job_id: str | None,
            limit: int) -> tuple[int, list[tuple[int, str, Job]]]:
    """The oldest id kept (0: none), and the events in (after, through], oldest first,
    of `job_id` or of every job, `limit` at most: (id, node, job)."""
    def read(conn: psycopg.Connection[Any]) -> tuple[int, list[tuple[int, str, Job]]]:
        oldest = conn.execute(OLDEST).fetchone()[0] or 0
        rows = conn.execute(HISTORY, (after, through, job_id, job_id, limit)).fetchall()
        return oldest, [(event_id, node, decode_job(record)) for event_id, node, record in rows]
    return db.run(read)


def prune(db: SharedDatabase, before: float) -> int:
    """Delete one batch of events older than `before` (a timestamp) or beyond KEEP."""
    return db.run(lambda conn: conn.execute(PRUNE, (PRUNE_BATCH, before, KEEP)).rowcount)


class Cursor:
    """Which rows read may be handed on: in id order, without a gap but a final one."""

    def __init__(self, last: int) -> None:
        self.last = last
        # While a gap is open: the xmax of the snapshot that saw it, and the highest id
        # read then; every id up to it is final once a snapshot's xmin reaches the xmax.
        self.horizon: int | None = None
        self.bound = 0

    def take(self, xmin: int, xmax: int, rows: list[tuple[int, Any]], full: bool
             ) -> list[tuple[int, Any]]:
        out: list[tuple[int, Any]] = []
        if self.horizon is not None and xmin >= self.horizon:
            ready = [row for row in rows if row[0] <= self.bound]
            out.extend(ready)
            if full and len(ready) == len(rows):
                self.last = rows[-1][0]
                return out
            self.last = max(self.last, self.bound)
            self.horizon = None
            rows = rows[len(ready):]
        for row in rows:
            if row[0] != self.last + 1:
                if self.horizon is None:
                    self.horizon, self.bound = xmax, rows[-1][0]
                return out
            out.append(row)
            self.last = row[0]
        return out


class EventsReader(ConnectionThread):
    """LISTENs on CHANNEL, reads the new rows when notified (and every POLL seconds all
    the same), decodes them, and hands them to `deliver` on the event loop, in id
    order. `deliver` is called once with no rows as it starts, after `last` is set: the
    newest id then."""

    name = "events-reader"
    doing = "reading the nodes' job events"
    reconnect = RECONNECT
    longest_wait = POLL + 5

    def __init__(self, params: dict[str, Any], loop: asyncio.AbstractEventLoop,
                 deliver: Callable[[int, list[Read]], None]) -> None:
        super().__init__(params, loop)
        self._deliver = deliver
        self._cursor: Cursor | None = None

    def _session(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(f"LISTEN {CHANNEL}")
        if self._cursor is None:
            self._cursor = Cursor(conn.execute(LATEST).fetchone()[0])
            self._call(self._deliver, self._cursor.last, [])
        self._recovered()
        self._follow(conn, self._cursor)

    def _follow(self, conn: psycopg.Connection[Any], cursor: Cursor) -> None:
        while not self._stopping.is_set():
            rows = conn.execute(READ, (cursor.last, READ_LIMIT)).fetchall()
            xmin, xmax = rows[0][0], rows[0][1]
            found = [(row[2], row[3:]) for row in rows if row[2] is not None]
            full = len(found) == READ_LIMIT
            before = cursor.last
            taken = cursor.take(xmin, xmax, found, full)
            if cursor.last != before:
                self._call(self._deliver, cursor.last, [(event_id, job_id, node, decode_job(record))
                                         for event_id, (job_id, node, record) in taken])
            if full and taken:
                continue
            wait = GAP_POLL if cursor.horizon is not None else POLL
            for _ in conn.notifies(timeout=wait, stop_after=1):
                pass
