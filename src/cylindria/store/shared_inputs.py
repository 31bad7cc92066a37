"""Input files in PostgreSQL, for nodes sharing a database: every accepted file is kept
there, in parts of 1 MiB, so any node can read it and none is lost with a node's disk."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg

from ..errors import InputInUse, StateUnavailable
from .backend import IN_FLIGHT_STATES
from .pgconnect import connect, connection_params, display_name, one_line

log = logging.getLogger(__name__)

T = TypeVar("T")

# A file is written and read in parts of this size: never one value as large as the file
# (a bytea is read whole into the server's and the client's memory), and few enough
# rows and round trips that a file of hundreds of MiB costs little more than its bytes.
PART = 1 << 20
# Connections (and threads) for input files, apart from the journal's: an upload of a
# large file, or a node reading one back, does not hold up job commits or heartbeats.
CONNECTIONS = 3
# Files deleted by age at a time, per statement.
PRUNE_BATCH = 100

# Migration 7: a file's description, and its bytes in numbered parts. The parts are
# stored out of line without compression: input files (PNG, JPEG, WebP, video) are
# compressed already, and trying again would only cost the server time.
MIGRATION = (
    """CREATE TABLE input_files (
        id text PRIMARY KEY,
        media_type text NOT NULL,
        name text NOT NULL,
        size bigint NOT NULL,
        created_at double precision NOT NULL,
        used_at double precision NOT NULL)""",
    "CREATE INDEX input_files_by_use ON input_files (used_at)",
    """CREATE TABLE input_parts (
        id text NOT NULL REFERENCES input_files ON DELETE CASCADE,
        part integer NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (id, part))""",
    "ALTER TABLE input_parts ALTER COLUMN data SET STORAGE EXTERNAL",
)
# Written once per content address: the description first, in the same transaction as
# the parts, so that no node ever reads a file in part; a second node writing the same
# file waits on the first one's row, then does nothing.
CLAIM = """
INSERT INTO input_files (id, media_type, name, size, created_at, used_at)
VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id
"""
ADD_PART = "INSERT INTO input_parts (id, part, data) VALUES (%s, %s, %s)"
DESCRIBE = ("SELECT id, media_type, name, size, created_at FROM input_files "
            "WHERE id = ANY(%s)")
PARTS = "SELECT data FROM input_parts WHERE id = %s ORDER BY part"
SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"
USED = """
UPDATE input_files f SET used_at = GREATEST(f.used_at, u.at)
FROM unnest(%s::text[], %s::double precision[]) AS u(id, at) WHERE f.id = u.id
"""
# Of these files, those a job in flight on any node uses (its record names the file),
# each with one such job.
NEEDED = """
SELECT c.id, j.node, j.job_id FROM unnest(%s::text[]) AS c(id)
JOIN LATERAL (SELECT node, job_id FROM jobs
              WHERE state = ANY(%s) AND strpos(record, c.id) > 0 LIMIT 1) j ON true
"""
REMOVE = ("DELETE FROM input_files WHERE id = ANY(%s) "
          "RETURNING id, media_type, name, size, created_at")
UNUSED_SINCE = "SELECT id FROM input_files WHERE used_at < %s ORDER BY used_at LIMIT %s"


@dataclass(slots=True, frozen=True)
class SharedFile:
    """A file's description as the database holds it."""

    id: str
    media_type: str
    name: str
    size: int
    created_at: float


class Described(Protocol):
    """What a file is, as the input store and the database both describe it."""

    id: str
    media_type: str
    name: str
    size: int
    created_at: float


class Sink(Protocol):
    """Where a file read back goes: written a part at a time, rewound to try again."""

    def write(self, chunks: list[bytes]) -> None: ...

    def rewind(self) -> None: ...


# -- the statements, each given a connection -------------------------------------------

def write_file(conn: psycopg.Connection[Any], entry: Described, path: Path,
               used_at: float) -> bool:
    """Keep the file at `path` as `entry` unless the database holds it already; whether
    it was written now. The file is read a part at a time."""
    with conn.transaction():
        claimed = conn.execute(CLAIM, (entry.id, entry.media_type, entry.name, entry.size,
                                       entry.created_at, used_at)).fetchone()
        if claimed is None:
            return False
        with open(path, "rb") as file:
            part = 0
            while data := file.read(PART):
                conn.execute(ADD_PART, (entry.id, part, data))
                part += 1
    return True


def describe(conn: psycopg.Connection[Any], idents: list[str]) -> dict[str, SharedFile]:
    rows = conn.execute(DESCRIBE, (idents,)).fetchall()
    return {row[0]: SharedFile(row[0], row[1], row[2], int(row[3]), float(row[4]))
            for row in rows}


def read_file(conn: psycopg.Connection[Any], ident: str, sink: Sink) -> SharedFile | None:
    """The file's bytes into `sink`, one part per round trip from one snapshot (a server
    cursor in a transaction); its description, or None when the database lacks it."""
    sink.rewind()
    with conn.transaction():
        # One snapshot for the description and the parts: a delete meanwhile is not seen.
        conn.execute(SNAPSHOT)
        found = describe(conn, [ident]).get(ident)
        if found is None:
            return None
        with conn.cursor(name="input_parts") as cursor:
            cursor.itersize = 1
            cursor.execute(PARTS, (ident,))
            for (data,) in cursor:
                sink.write([data])
    return found


def mark_used(conn: psycopg.Connection[Any], used: dict[str, float]) -> None:
    conn.execute(USED, (list(used), list(used.values())))


def needed(conn: psycopg.Connection[Any], idents: list[str]) -> dict[str, tuple[str, str]]:
    """Of these files, those a job in flight on any node uses: {id: (node, job id)}."""
    rows = conn.execute(NEEDED, (idents, list(IN_FLIGHT_STATES))).fetchall()
    return {ident: (node, job_id) for ident, node, job_id in rows}


def delete_file(conn: psycopg.Connection[Any], ident: str) -> SharedFile | None:
    """Delete the file unless a job in flight on any node uses it (InputInUse naming
    that job); its description, or None when the database did not hold it."""
    with conn.transaction():
        using = needed(conn, [ident]).get(ident)
        if using is not None:
            node, job_id = using
            raise InputInUse(f"Input {ident} is used by job {job_id!r} in flight on node "
                             f"{node}; delete it once that job has finished.",
                             extra={"input_id": ident, "job_id": job_id, "node": node})
        row = conn.execute(REMOVE, ([ident],)).fetchone()
    return None if row is None else SharedFile(row[0], row[1], row[2], int(row[3]),
                                               float(row[4]))


def prune_files(conn: psycopg.Connection[Any], before: float) -> int:
    """Delete the files no node used since `before` that no job in flight uses."""
    dropped = 0
    while True:
        with conn.transaction():
            old = [row[0] for row in conn.execute(UNUSED_SINCE, (before, PRUNE_BATCH))]
            if not old:
                return dropped
            kept = needed(conn, old)
            doomed = [ident for ident in old if ident not in kept]
            if doomed:
                dropped += len(conn.execute(REMOVE, (doomed,)).fetchall())
            if len(old) < PRUNE_BATCH or not doomed:
                return dropped


# -- the node's side -------------------------------------------------------------------

class SharedInputs:
    """The database's input files as one node uses them: a few threads, each with a
    connection of its own (opened when first needed, opened again when lost), so that
    nothing of it runs on the event loop. Every failure to reach the database is a
    StateUnavailable (503 with Retry-After), as for new jobs."""

    def __init__(self, url: str) -> None:
        self._params = connection_params(url)
        self.name = display_name(self._params)
        self._executor = ThreadPoolExecutor(CONNECTIONS, thread_name_prefix="shared-inputs")
        self._local = threading.local()
        self._connections: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self._executor.shutdown(wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    # -- what the input store calls --------------------------------------------------------

    async def keep(self, entry: Described, path: Path, used_at: float) -> None:
        """The file is in the database when this returns (written now, or before)."""
        if await self._call(lambda conn: write_file(conn, entry, path, used_at), "keep"):
            log.info("input %s is in database %s (%d bytes)", entry.id, self.name, entry.size)

    async def describe(self, idents: list[str]) -> dict[str, SharedFile]:
        return await self._call(lambda conn: describe(conn, idents), "read")

    async def read(self, ident: str, sink: Sink) -> SharedFile | None:
        return await self._call(lambda conn: read_file(conn, ident, sink), "read")

    async def mark_used(self, used: dict[str, float]) -> None:
        await self._call(lambda conn: mark_used(conn, used), "keep")

    async def delete(self, ident: str) -> SharedFile | None:
        return await self._call(lambda conn: delete_file(conn, ident), "delete")

    async def prune(self, before: float) -> int:
        return await self._call(lambda conn: prune_files(conn, before), "delete")

    # -- threads and connections ----------------------------------------------------

    async def _call(self, work: Callable[[psycopg.Connection[Any]], T], verb: str) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._run, work)
        except psycopg.Error as exc:
            raise StateUnavailable(
                f"Cylindria cannot {verb} input files in its database now "
                f"({one_line(exc)}): "
                "every node must be able to read an accepted file, so none is accepted "
                "until it can. Retry later; the operator should check the database "
                "server.", headers={"Retry-After": "10"}) from None

    def _run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        conn = self._connection()
        try:
            return work(conn)
        except psycopg.OperationalError:
            if not conn.broken:
                raise
        # The connection was lost (PostgreSQL restarted, the network dropped it): once
        # more on a new one; every piece of work here may run twice.
        return work(self._connection())

    def _connection(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None and not (conn.closed or conn.broken):
            return conn
        if conn is not None:
            conn.close()
            self._forget(conn)
        conn = connect(self._params)
        self._local.conn = conn
        with self._lock:
            self._connections.append(conn)
        return conn

    def _forget(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)

