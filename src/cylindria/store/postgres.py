"""The jobs in PostgreSQL: connecting, the node's lock, migrations, every statement."""

from __future__ import annotations

import secrets
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import psycopg

from ..core.ports import HeldElsewhere, Listed
from ..core.records import Job
from ..errors import StateFileError
from ..nodes import GRACE_BEATS, NodeInfo
from . import listing, queue
from .backend import IN_FLIGHT_STATES, Loaded, Row, decode_job, decode_run_times, encode_record
from .cancels import MIGRATION as CANCEL_REQUESTS
from .events import MIGRATION as JOB_EVENTS
from .pgconnect import connect, connection_params, display_name, unreachable, unusable
from .shared_inputs import MIGRATION as INPUT_FILES

# Connections of their own (the listener's) are opened the same way.
_connect = connect

T = TypeVar("T")

# Advisory lock keys, (class, object): the class is "Cyli" in ASCII, so other users of
# advisory locks in the same database are not in the way. Keys are per database.
LOCK_CLASS = 0x43796C69
# What a Cylindria of schema 1 held, one per database: a node migrating to schema 2
# checks that none still runs.
SINGLE_NODE_LOCK = (LOCK_CLASS, 1)
MIGRATION_LOCK = (LOCK_CLASS, 2)
# Each node's own lock: class "Cyln", object a hash of its name.
NODE_LOCK_CLASS = 0x43796C6E
# The schema's versions in order; each is applied once, in one transaction with the
# others a start-up applies, and recorded in schema_migrations. A version is never
# changed once released: a change of schema is a new version at the end.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
        """CREATE TABLE jobs (
            seq bigint PRIMARY KEY,
            job_id text NOT NULL UNIQUE,
            state text NOT NULL,
            gpu_id integer,
            finished_at double precision,
            record text NOT NULL)""",
        "CREATE INDEX jobs_by_state ON jobs (state, seq)",
        "CREATE INDEX jobs_by_gpu ON jobs (gpu_id, seq)",
        "CREATE INDEX jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL",
        "CREATE TABLE workflows (job_id text PRIMARY KEY, workflow bytea NOT NULL)",
    )),
    # Nodes: several Cylindrias share the database, each with the jobs it took (job ids
    # and numbers are each node's own). The node that migrates adopts the jobs written
    # before (`%(node)s` is its name).
    (2, (
        "ALTER TABLE jobs ADD COLUMN node text",
        "ALTER TABLE workflows ADD COLUMN node text",
        "UPDATE jobs SET node = %(node)s WHERE node IS NULL",
        "UPDATE workflows SET node = %(node)s WHERE node IS NULL",
        "ALTER TABLE jobs ALTER COLUMN node SET NOT NULL, DROP CONSTRAINT jobs_pkey, "
        "DROP CONSTRAINT jobs_job_id_key, ADD PRIMARY KEY (node, seq), "
        "ADD UNIQUE (node, job_id)",
        "ALTER TABLE workflows ALTER COLUMN node SET NOT NULL, "
        "DROP CONSTRAINT workflows_pkey, ADD PRIMARY KEY (node, job_id)",
        "DROP INDEX jobs_by_state",
        "CREATE INDEX jobs_by_state ON jobs (node, state, seq)",
        "DROP INDEX jobs_by_gpu",
        "CREATE INDEX jobs_by_gpu ON jobs (node, gpu_id, seq)",
        "DROP INDEX jobs_by_finish",
        "CREATE INDEX jobs_by_finish ON jobs (node, finished_at) "
        "WHERE finished_at IS NOT NULL",
        # One row per node, written by its heartbeats: its GPUs as it last saw them;
        # stopped_at is set when it stops cleanly (the row stays).
        """CREATE TABLE nodes (
            name text PRIMARY KEY,
            advertise_url text NOT NULL,
            started_at timestamptz NOT NULL,
            heartbeat_at timestamptz NOT NULL,
            heartbeat_seconds double precision NOT NULL,
            stopped_at timestamptz,
            gpus jsonb NOT NULL)""",
    )),
    # Any node answers the status of another node's job: jobs by id, whichever node's.
    (3, (
        "CREATE INDEX jobs_by_job_id ON jobs (job_id)",
    )),
    # Cancels passed from one node to the node that holds the job (see cancels.py).
    (4, CANCEL_REQUESTS),
    # Job ids unique across nodes, and the one queue of held jobs (see queue.py).
    (5, queue.MIGRATION),
    # Every node's jobs listed in one order across the nodes (see listing.py).
    (6, listing.MIGRATION),
    # Input files every node reads, in parts (see shared_inputs.py).
    (7, INPUT_FILES),
    # Every lasting change of every node's jobs, for event streams (see events.py).
    (8, JOB_EVENTS),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

TRY_NODE_LOCK = "SELECT pg_try_advisory_lock(%s, %s)"
UNLOCK_NODE = "SELECT pg_advisory_unlock(%s, %s)"
LOCK_MIGRATIONS = "SELECT pg_advisory_xact_lock(%s, %s)"
TRY_SINGLE_NODE_LOCK = "SELECT pg_try_advisory_xact_lock(%s, %s)"
CREATE_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now())
"""
CURRENT_VERSION = "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
RECORD_VERSION = "INSERT INTO schema_migrations (version) VALUES (%s)"
ADD_META = "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING"
SET_META = """
INSERT INTO meta (key, value) VALUES (%s, %s)
ON CONFLICT (key) DO UPDATE SET value = excluded.value
"""
GET_META = "SELECT value FROM meta WHERE key = %s"
# A commit, in one statement and so one round trip: every row, then the workflows of
# the rows written, each list as one array (a batch holds each job once). Job ids are
# unique across nodes: a row another node has taken is left as it is (fenced by node),
# with its workflow, and the ids written come back, so the journal knows which were
# not. A job put in line wakes the other nodes (a notification, sent at the commit).
WRITE = """
WITH upserted AS (
    INSERT INTO jobs (node, seq, job_id, state, gpu_id, finished_at, record, queue_key,
                      models)
    SELECT %s, * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::integer[],
                             %s::double precision[], %s::text[], %s::double precision[],
                             %s::text[])
    ON CONFLICT (job_id) DO UPDATE SET seq = excluded.seq, state = excluded.state,
        gpu_id = excluded.gpu_id, finished_at = excluded.finished_at,
        record = excluded.record, queue_key = excluded.queue_key, models = excluded.models
    WHERE jobs.node = excluded.node AND NOT jobs.fenced
    RETURNING job_id, queue_key),
written AS (
    INSERT INTO workflows (node, job_id, workflow)
    SELECT %s, w.job_id, w.workflow FROM unnest(%s::text[], %s::bytea[]) AS w(job_id, workflow)
    WHERE w.job_id IN (SELECT job_id FROM upserted)
    ON CONFLICT (node, job_id) DO UPDATE SET workflow = excluded.workflow)
SELECT job_id, CASE WHEN queue_key IS NOT NULL THEN pg_notify(%s, '')::text END
FROM upserted
"""
# Every statement on jobs is the node's own: its first parameter is the node's name.
IN_FLIGHT = "SELECT record FROM jobs WHERE node = %s AND state = ANY(%s)"
NEWEST_FINISHED = ("SELECT record FROM jobs WHERE node = %s AND finished_at IS NOT NULL "
                   "ORDER BY seq DESC LIMIT %s")
LAST_SEQ = "SELECT COALESCE(MAX(seq), 0) FROM jobs WHERE node = %s"
FIRST_EVICTED = ("SELECT seq FROM jobs WHERE node = %s AND finished_at IS NOT NULL "
                 "ORDER BY seq DESC LIMIT 1 OFFSET %s")
COUNT = "SELECT COUNT(*) FROM jobs WHERE node = %s"
# The other nodes' jobs in flight, by node: left alone, and named in the log.
ELSEWHERE = ("SELECT node, COUNT(*) FROM jobs WHERE node <> %s AND state = ANY(%s) "
             "GROUP BY node ORDER BY node")
PRUNE_JOBS = """
DELETE FROM jobs WHERE node = %s AND seq IN (
    SELECT seq FROM jobs WHERE node = %s AND finished_at < %s LIMIT %s)
RETURNING job_id
"""
PRUNE_WORKFLOWS = "DELETE FROM workflows WHERE node = %s AND job_id = ANY(%s)"
ONE_JOB = "SELECT record FROM jobs WHERE node = %s AND job_id = %s"
ONE_WORKFLOW = "SELECT workflow FROM workflows WHERE node = %s AND job_id = %s"
# The other nodes' jobs of one id (a few at most), with what their rows in `nodes` say:
# the URL each advertises, and whether it is alive (by the database's clock).
ELSEWHERE_JOB = """
SELECT j.node, n.advertise_url, """ + listing.NODE_ALIVE.format(grace="%s") + """, j.record
FROM jobs j LEFT JOIN nodes n ON n.name = j.node
WHERE j.job_id = %s AND j.node <> %s ORDER BY j.node LIMIT %s
"""
# How many other nodes' jobs of one id are read (and named in a 409) at most.
ELSEWHERE_LIMIT = 10
# A page of jobs, newest first, by which filters it has (states, GPU): one statement
# each, so each is planned on the index that fits it.
PAGES = {
    (False, False): "SELECT record FROM jobs WHERE node = %s AND seq < %s "
                    "ORDER BY seq DESC LIMIT %s",
    (True, False): "SELECT record FROM jobs WHERE node = %s AND seq < %s "
                   "AND state = ANY(%s) ORDER BY seq DESC LIMIT %s",
    (False, True): "SELECT record FROM jobs WHERE node = %s AND seq < %s AND gpu_id = %s "
                   "ORDER BY seq DESC LIMIT %s",
    (True, True): "SELECT record FROM jobs WHERE node = %s AND seq < %s "
                  "AND state = ANY(%s) AND gpu_id = %s ORDER BY seq DESC LIMIT %s",
}
# The node's row: written at start-up (started now, no GPUs seen yet), by each
# heartbeat, and when it stops. A heartbeat reads the other nodes' rows in the same
# round trip, their ages by the database's clock (so the hosts' clocks do not matter).
JOIN = """
INSERT INTO nodes (name, advertise_url, started_at, heartbeat_at, heartbeat_seconds, gpus)
VALUES (%s, %s, now(), now(), %s, '[]')
ON CONFLICT (name) DO UPDATE SET advertise_url = excluded.advertise_url,
    started_at = now(), heartbeat_at = now(), heartbeat_seconds = excluded.heartbeat_seconds,
    stopped_at = NULL, gpus = excluded.gpus
"""
BEAT = """
WITH beat AS (
    INSERT INTO nodes (name, advertise_url, started_at, heartbeat_at, heartbeat_seconds, gpus)
    VALUES (%s, %s, now(), now(), %s, %s::jsonb)
    ON CONFLICT (name) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL,
        gpus = excluded.gpus)
SELECT name, advertise_url, started_at, heartbeat_seconds, stopped_at IS NOT NULL,
       EXTRACT(EPOCH FROM now() - heartbeat_at)::double precision, gpus
FROM nodes WHERE name <> %s ORDER BY name
"""
LEAVE = "UPDATE nodes SET heartbeat_at = now(), stopped_at = now() WHERE name = %s"


def open_postgres(url: str, memory_jobs: int,
                  node: NodeInfo) -> tuple[PostgresDatabase, Loaded]:
    """Connect, take the node's lock, bring the schema up to date, write the node's row
    and load its jobs. Every failure is a StateFileError that names the database (never
    its password) and says what to do."""
    params = connection_params(url)
    name = display_name(params)
    try:
        conn = connect(params)
    except psycopg.Error as exc:
        raise unreachable(name, exc) from None
    try:
        if not conn.execute(TRY_NODE_LOCK, node_lock(node.name)).fetchone()[0]:
            raise StateFileError(
                f"node {node.name} is running on database {name} already; stop that "
                "Cylindria first, or give this one another --node-name / "
                "CYLINDRIA_NODE_NAME")
        migrate(conn, name, node.name)
        conn.execute(JOIN, (node.name, node.advertise_url, node.heartbeat_seconds))
        database = PostgresDatabase(conn, params, name, node)
        return database, database.load(memory_jobs)
    except psycopg.Error as exc:
        conn.close()
        raise unusable(name, exc) from None
    except StateFileError:
        conn.close()
        raise


def node_lock(node: str) -> tuple[int, int]:
    """The advisory lock of the node named `node`: (class, a signed 32-bit hash)."""
    digest = zlib.crc32(node.encode())
    return NODE_LOCK_CLASS, digest - (1 << 32) if digest >= 1 << 31 else digest


def migrate(conn: psycopg.Connection[Any], name: str, node: str) -> None:
    """Apply the migrations the database lacks, in order, in one transaction; under an
    advisory lock, so that Cylindrias starting at once take turns. A database of a newer
    Cylindria is refused, and so is one a Cylindria of schema 1 still uses. `node`
    adopts the jobs written before nodes."""
    with conn.transaction():
        conn.execute(LOCK_MIGRATIONS, MIGRATION_LOCK)
        conn.execute(CREATE_MIGRATIONS)
        current = conn.execute(CURRENT_VERSION).fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StateFileError(
                f"database {name} has schema {current} and this Cylindria knows schemas "
                f"up to {SCHEMA_VERSION}: it was written by a newer Cylindria; upgrade "
                "Cylindria, or pass another --database-url")
        if 0 < current < 2 and not conn.execute(TRY_SINGLE_NODE_LOCK,
                                                 SINGLE_NODE_LOCK).fetchone()[0]:
            raise StateFileError(
                f"database {name} is in use by a Cylindria of an earlier version; stop it "
                "first, then start this one (it brings the database up to date)")
        for version, statements in MIGRATIONS:
            if version > current:
                refusal = queue.check_ids(conn, name) if version == 5 else None
                if refusal is not None:
                    raise StateFileError(refusal)
                for statement in statements:
                    if "%(node)s" in statement:
                        conn.execute(statement, {"node": node})
                    else:
                        conn.execute(statement)
                conn.execute(RECORD_VERSION, (version,))
        conn.execute(ADD_META, ("install_id", secrets.token_hex(4)))


class PostgresDatabase:
    """One connection to PostgreSQL, holding the node's advisory lock for as long as it
    lives; used from the journal's thread only. A statement that finds the connection
    lost (PostgreSQL restarted, the network dropped it) opens another, takes the lock
    again, and runs once more: every statement here may run twice (writes are upserts)."""

    kind = "database"
    errors = (psycopg.Error,)
    # Each commit is a round trip to the server: never on the event loop.
    commits_inline = False
    look_at = "the database server"

    # Nodes share the database: each writes its row and reads the others' (heartbeats).
    clustered = True
    # Seconds of waiting worth one priority level in the shared queue (queue.py).
    aging = 60.0

    def __init__(self, conn: psycopg.Connection[Any], params: dict[str, Any],
                 name: str, node: NodeInfo) -> None:
        self._conn = conn
        self._params = params
        self.name = name
        self.node = node

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn.closed or self._conn.broken:
            self._conn.close()
            conn = connect(self._params)
            if not conn.execute(TRY_NODE_LOCK, node_lock(self.node.name)).fetchone()[0]:
                conn.close()
                raise psycopg.OperationalError(
                    f"the connection was lost, and another Cylindria runs as node "
                    f"{self.node.name} now")
            self._conn = conn
        return self._conn

    @property
    def params(self) -> dict[str, Any]:
        return self._params

    def run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        return self._run(work)

    def _run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        try:
            return work(self._connection())
        except psycopg.OperationalError:
            if not self._conn.broken:
                raise
        return work(self._connection())

    def load(self, memory_jobs: int) -> Loaded:
        return self._run(lambda conn: self._load(conn, memory_jobs))

    def _load(self, conn: psycopg.Connection[Any], memory_jobs: int) -> Loaded:
        (install_id,) = conn.execute(GET_META, ("install_id",)).fetchone()
        loaded = Loaded(install_id=install_id)
        node = self.node.name
        states = list(IN_FLIGHT_STATES)
        rows = conn.execute(IN_FLIGHT, (node, states)).fetchall()
        finished = conn.execute(NEWEST_FINISHED, (node, memory_jobs)).fetchall()
        loaded.jobs = [decode_job(r[0]) for r in (*rows, *reversed(finished))]
        queue.back_in_line(conn, node, [job.job_id for job in loaded.jobs if job.held])
        loaded.last_seq = conn.execute(LAST_SEQ, (node,)).fetchone()[0]
        older = conn.execute(FIRST_EVICTED, (node, memory_jobs)).fetchone()
        loaded.evicted_through = older[0] if older else 0
        loaded.held = conn.execute(COUNT, (node,)).fetchone()[0]
        loaded.elsewhere = dict(conn.execute(ELSEWHERE, (node, states)).fetchall())
        row = conn.execute(GET_META, ("run_times",)).fetchone()
        loaded.run_times = decode_run_times(row[0] if row else None)
        return loaded

    def set_meta(self, key: str, value: str) -> None:
        self._run(lambda conn: conn.execute(SET_META, (key, value)))

    def close(self) -> None:
        # Closing the session releases its advisory lock, but only once the server has
        # ended it: released first, so that a Cylindria started right after finds the
        # node free.
        if not (self._conn.closed or self._conn.broken):
            try:
                self._conn.execute(UNLOCK_NODE, node_lock(self.node.name))
            except psycopg.Error:
                pass  # the session's end releases it all the same
        self._conn.close()

    # -- writing --------------------------------------------------------------------

    def write(self, rows: Sequence[Row], workflows: Sequence[tuple[str, bytes]]
              ) -> list[str]:
        """One transaction (one statement): the workflows first written, then every row.
        Returns the ids of the rows left alone, because another node has taken them."""
        columns: list[list[Any]] = [[], [], [], [], [], [], [], []]
        for seq, job_id, state, gpu, finished, record in rows:
            values = (seq, job_id, state, gpu, finished, encode_record(record),
                      queue.queue_key(record, state, gpu, self.aging),
                      queue.models_text(record))
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        ids = [job_id for job_id, _ in workflows]
        blobs = [data.encode() if isinstance(data, str) else data for _, data in workflows]
        node = self.node.name
        args = (node, *columns, node, ids, blobs, queue.CHANNEL)
        written = self._run(lambda conn: {row[0] for row in conn.execute(WRITE, args)})
        return [job_id for job_id in columns[1] if job_id not in written]

    def prune(self, before: float, batch: int) -> int:
        node = self.node.name

        def prune(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                doomed = [r[0] for r in conn.execute(PRUNE_JOBS, (node, node, before, batch))]
                if doomed:
                    conn.execute(PRUNE_WORKFLOWS, (node, doomed))
            return len(doomed)

        return self._run(prune)

    # -- the node's row -------------------------------------------------------------

    def beat(self, gpus: str) -> list[tuple[Any, ...]]:
        """Write this node's heartbeat with its GPUs (JSON); the other nodes' rows:
        (name, advertise_url, started_at, heartbeat_seconds, stopped, age in seconds,
        gpus)."""
        node = self.node
        return self._run(lambda conn: conn.execute(
            BEAT, (node.name, node.advertise_url, node.heartbeat_seconds, gpus,
                   node.name)).fetchall())

    def leave(self) -> None:
        """The node stops: its row says when (and stays)."""
        self._run(lambda conn: conn.execute(LEAVE, (self.node.name,)))

    # -- reading ------------------------------------------------------------------------

    def job(self, job_id: str) -> Job | None:
        row = self._run(lambda conn: conn.execute(ONE_JOB, (self.node.name,
                                                          job_id)).fetchone())
        return None if row is None else decode_job(row[0])

    def elsewhere(self, job_id: str) -> list[HeldElsewhere]:
        """The other nodes' jobs of this id, by node name."""
        args = (GRACE_BEATS, job_id, self.node.name, ELSEWHERE_LIMIT)
        rows = self._run(lambda conn: conn.execute(ELSEWHERE_JOB, args).fetchall())
        return [HeldElsewhere(node, url, alive, decode_job(record))
                for node, url, alive, record in rows]

    def workflow(self, job_id: str) -> bytes | None:
        row = self._run(lambda conn: conn.execute(ONE_WORKFLOW, (self.node.name,
                                                               job_id)).fetchone())
        return None if row is None else bytes(row[0])

    def page(self, states: Iterable[str] | None, gpu_id: int | None, before: int,
             limit: int) -> list[Job]:
        args: list[Any] = [self.node.name, before]
        if states is not None:
            args.append(sorted(states))
        if gpu_id is not None:
            args.append(gpu_id)
        args.append(limit)
        statement = PAGES[states is not None, gpu_id is not None]
        rows = self._run(lambda conn: conn.execute(statement, args).fetchall())
        return [decode_job(r[0]) for r in rows]

    def listing(self, states: Iterable[str] | None, gpu: tuple[str, int] | None,
                before: int | None, limit: int) -> list[Listed]:
        """Every node's jobs, newest first across the nodes (see listing.py)."""
        return self._run(lambda conn: listing.page(conn, states, gpu, before, limit))

    def held(self) -> int:
        return self._run(lambda conn: conn.execute(COUNT, (self.node.name,)).fetchone()[0])
