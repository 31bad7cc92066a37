"""The jobs in PostgreSQL: connecting, the node's lock, migrations, every statement."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import psycopg
import ujson
from psycopg.conninfo import conninfo_to_dict

from ..core.records import Job, from_record
from ..errors import StateFileError
from .backend import IN_FLIGHT_STATES, Loaded, Row, encode_record

T = TypeVar("T")

# Advisory lock keys, (class, object): the class is "Cyli" in ASCII, so other users of
# advisory locks in the same database are not in the way. Keys are per database.
LOCK_CLASS = 0x43796C69
NODE_LOCK = (LOCK_CLASS, 1)
MIGRATION_LOCK = (LOCK_CLASS, 2)
# What a connection takes unless the URL says otherwise: seconds to connect, and
# keepalives, so that a server gone silent fails a statement within about half a
# minute instead of hanging the journal's thread.
CLIENT_DEFAULTS = {"connect_timeout": 5, "application_name": "cylindria",
                   "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                   "keepalives_count": 3, "tcp_user_timeout": 30_000}
# And the server's side of the same: when this host dies without closing its
# connection, PostgreSQL ends the session, and so frees the node's lock, within about
# half a minute rather than the system's two hours.
SERVER_KEEPALIVES = ("SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; "
                     "SET tcp_keepalives_count = 3")

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
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

TRY_NODE_LOCK = "SELECT pg_try_advisory_lock(%s, %s)"
LOCK_MIGRATIONS = "SELECT pg_advisory_xact_lock(%s, %s)"
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
# A commit, in one statement and so one round trip: the workflows first written, then
# every row, each list as one array (a batch holds each job once).
WRITE = """
WITH written AS (
    INSERT INTO workflows (job_id, workflow)
    SELECT * FROM unnest(%s::text[], %s::bytea[])
    ON CONFLICT (job_id) DO UPDATE SET workflow = excluded.workflow)
INSERT INTO jobs (seq, job_id, state, gpu_id, finished_at, record)
SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::integer[],
                     %s::double precision[], %s::text[])
ON CONFLICT (job_id) DO UPDATE SET seq = excluded.seq, state = excluded.state,
    gpu_id = excluded.gpu_id, finished_at = excluded.finished_at, record = excluded.record
"""
IN_FLIGHT = "SELECT record FROM jobs WHERE state = ANY(%s)"
NEWEST_FINISHED = ("SELECT record FROM jobs WHERE finished_at IS NOT NULL "
                   "ORDER BY seq DESC LIMIT %s")
LAST_SEQ = "SELECT COALESCE(MAX(seq), 0) FROM jobs"
FIRST_EVICTED = ("SELECT seq FROM jobs WHERE finished_at IS NOT NULL ORDER BY seq DESC "
                 "LIMIT 1 OFFSET %s")
COUNT = "SELECT COUNT(*) FROM jobs"
PRUNE_JOBS = """
DELETE FROM jobs WHERE seq IN (
    SELECT seq FROM jobs WHERE finished_at < %s LIMIT %s)
RETURNING job_id
"""
PRUNE_WORKFLOWS = "DELETE FROM workflows WHERE job_id = ANY(%s)"
ONE_JOB = "SELECT record FROM jobs WHERE job_id = %s"
ONE_WORKFLOW = "SELECT workflow FROM workflows WHERE job_id = %s"
# A page of jobs, newest first, by which filters it has (states, GPU): one statement
# each, so each is planned on the index that fits it.
PAGES = {
    (False, False): "SELECT record FROM jobs WHERE seq < %s ORDER BY seq DESC LIMIT %s",
    (True, False): "SELECT record FROM jobs WHERE seq < %s AND state = ANY(%s) "
                   "ORDER BY seq DESC LIMIT %s",
    (False, True): "SELECT record FROM jobs WHERE seq < %s AND gpu_id = %s "
                   "ORDER BY seq DESC LIMIT %s",
    (True, True): "SELECT record FROM jobs WHERE seq < %s AND state = ANY(%s) "
                  "AND gpu_id = %s ORDER BY seq DESC LIMIT %s",
}


def open_postgres(url: str, memory_jobs: int) -> tuple[PostgresDatabase, Loaded]:
    """Connect, take the node's lock, bring the schema up to date and load. Every
    failure is a StateFileError that names the database (never its password) and says
    what to do."""
    params = connection_params(url)
    name = display_name(params)
    try:
        conn = _connect(params)
    except psycopg.Error as exc:
        raise _unreachable(name, exc) from None
    try:
        if not conn.execute(TRY_NODE_LOCK, NODE_LOCK).fetchone()[0]:
            raise StateFileError(
                f"database {name} is in use by another running Cylindria; stop that one "
                "first, or give this one its own database (for now, one Cylindria per "
                "database)")
        migrate(conn, name)
        database = PostgresDatabase(conn, params, name)
        return database, database.load(memory_jobs)
    except psycopg.Error as exc:
        conn.close()
        raise _unusable(name, exc) from None
    except StateFileError:
        conn.close()
        raise


def connection_params(url: str) -> dict[str, Any]:
    """The URL's connection parameters, with Cylindria's defaults where it sets none."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise StateFileError(
            f"--database-url / CYLINDRIA_DATABASE_URL cannot be read ({_one_line(exc)}): "
            "give it as postgresql://USER:PASSWORD@HOST:PORT/DATABASE") from None
    return {**CLIENT_DEFAULTS, **params}


def display_name(params: dict[str, Any]) -> str:
    """The database as a URL without its password, for messages and logs."""
    user = f"{quote(str(params['user']), safe='')}@" if params.get("user") else ""
    host = str(params.get("host") or "")
    port = f":{params['port']}" if params.get("port") else ""
    dbname = quote(str(params.get("dbname") or ""), safe="")
    if host.startswith("/") or "," in host:
        return f"postgresql://{user}{port}/{dbname}?host={host}"
    return f"postgresql://{user}{host}{port}/{dbname}"


def migrate(conn: psycopg.Connection[Any], name: str) -> None:
    """Apply the migrations the database lacks, in order, in one transaction; under an
    advisory lock, so that Cylindrias starting at once take turns. A database of a newer
    Cylindria is refused."""
    with conn.transaction():
        conn.execute(LOCK_MIGRATIONS, MIGRATION_LOCK)
        conn.execute(CREATE_MIGRATIONS)
        current = conn.execute(CURRENT_VERSION).fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StateFileError(
                f"database {name} has schema {current} and this Cylindria knows schemas "
                f"up to {SCHEMA_VERSION}: it was written by a newer Cylindria; upgrade "
                "Cylindria, or pass another --database-url")
        for version, statements in MIGRATIONS:
            if version > current:
                for statement in statements:
                    conn.execute(statement)
                conn.execute(RECORD_VERSION, (version,))
        conn.execute(ADD_META, ("install_id", secrets.token_hex(4)))


def _connect(params: dict[str, Any]) -> psycopg.Connection[Any]:
    # Autocommit: a read is its own statement and leaves no transaction open; writes
    # take `conn.transaction()`.
    conn = psycopg.connect(**params, autocommit=True)
    try:
        conn.execute(SERVER_KEEPALIVES)
    except BaseException:
        conn.close()
        raise
    return conn


def _one_line(exc: BaseException) -> str:
    # The server's own sentence when there is one, without the statement it quotes.
    primary = getattr(getattr(exc, "diag", None), "message_primary", None)
    return " ".join((primary or str(exc)).split()) or exc.__class__.__name__


def _unreachable(name: str, exc: psycopg.Error) -> StateFileError:
    reason = _one_line(exc)
    if "password" in reason or "authentication" in reason or "role" in reason:
        hint = "check the user and password (in the URL, PGPASSWORD or ~/.pgpass)"
    elif "does not exist" in reason:
        hint = "create the database first (createdb), or fix its name in the URL"
    else:
        hint = "check that PostgreSQL runs there and takes connections from this host"
    return StateFileError(f"database {name} cannot be reached ({reason}): {hint}, or pass "
                          "another --database-url")


def _unusable(name: str, exc: psycopg.Error) -> StateFileError:
    reason = _one_line(exc)
    hint = "check the database and this user's rights in it"
    if "permission denied" in reason:
        hint = ("let this user create tables in the database (make it the database's "
                "owner)")
    return StateFileError(f"database {name} cannot be used ({reason}): {hint}, or pass "
                          "another --database-url")


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

    def __init__(self, conn: psycopg.Connection[Any], params: dict[str, Any],
                 name: str) -> None:
        self._conn = conn
        self._params = params
        self.name = name

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn.closed or self._conn.broken:
            self._conn.close()
            conn = _connect(self._params)
            if not conn.execute(TRY_NODE_LOCK, NODE_LOCK).fetchone()[0]:
                conn.close()
                raise psycopg.OperationalError(
                    "the connection was lost, and another Cylindria holds the database now")
            self._conn = conn
        return self._conn

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
        rows = conn.execute(IN_FLIGHT, (list(IN_FLIGHT_STATES),)).fetchall()
        finished = conn.execute(NEWEST_FINISHED, (memory_jobs,)).fetchall()
        loaded.jobs = [from_record(ujson.loads(r[0])) for r in (*rows, *reversed(finished))]
        loaded.last_seq = conn.execute(LAST_SEQ).fetchone()[0]
        older = conn.execute(FIRST_EVICTED, (memory_jobs,)).fetchone()
        loaded.evicted_through = older[0] if older else 0
        loaded.held = conn.execute(COUNT).fetchone()[0]
        row = conn.execute(GET_META, ("run_times",)).fetchone()
        if row:
            try:
                loaded.run_times = ujson.loads(row[0])
            except ValueError:
                loaded.run_times = None  # learned again from the next jobs
        return loaded

    def set_meta(self, key: str, value: str) -> None:
        self._run(lambda conn: conn.execute(SET_META, (key, value)))

    def close(self) -> None:
        # Closing the session releases its advisory lock.
        self._conn.close()

    # -- writing --------------------------------------------------------------------

    def write(self, rows: Sequence[Row], workflows: Sequence[tuple[str, bytes]]) -> None:
        """One transaction (one statement): the workflows first written, then every row."""
        columns: list[list[Any]] = [[], [], [], [], [], []]
        for seq, job_id, state, gpu, finished, record in rows:
            for column, value in zip(columns, (seq, job_id, state, gpu, finished,
                                               encode_record(record)), strict=True):
                column.append(value)
        ids = [job_id for job_id, _ in workflows]
        blobs = [data.encode() if isinstance(data, str) else data for _, data in workflows]
        self._run(lambda conn: conn.execute(WRITE, (ids, blobs, *columns)))

    def prune(self, before: float, batch: int) -> int:
        def prune(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                doomed = [r[0] for r in conn.execute(PRUNE_JOBS, (before, batch))]
                if doomed:
                    conn.execute(PRUNE_WORKFLOWS, (doomed,))
            return len(doomed)

        return self._run(prune)

    # -- reading ------------------------------------------------------------------------

    def job(self, job_id: str) -> Job | None:
        row = self._run(lambda conn: conn.execute(ONE_JOB, (job_id,)).fetchone())
        return None if row is None else from_record(ujson.loads(row[0]))

    def workflow(self, job_id: str) -> bytes | None:
        row = self._run(lambda conn: conn.execute(ONE_WORKFLOW, (job_id,)).fetchone())
        return None if row is None else bytes(row[0])

    def page(self, states: Iterable[str] | None, gpu_id: int | None, before: int,
             limit: int) -> list[Job]:
        args: list[Any] = [before]
        if states is not None:
            args.append(sorted(states))
        if gpu_id is not None:
            args.append(gpu_id)
        args.append(limit)
        statement = PAGES[states is not None, gpu_id is not None]
        rows = self._run(lambda conn: conn.execute(statement, args).fetchall())
        return [from_record(ujson.loads(r[0])) for r in rows]

    def held(self) -> int:
        return self._run(lambda conn: conn.execute(COUNT).fetchone()[0])
