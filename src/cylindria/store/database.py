"""The SQLite state file: opening and locking it, its schema, and every SQL statement."""

from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..core.records import Job
from ..errors import StateFileError
from .backend import IN_FLIGHT_STATES, Loaded, Row, decode_job, decode_run_times, encode_record

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    gpu_id INTEGER,
    finished_at REAL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_by_gpu ON jobs (gpu_id, seq);
CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS workflows (job_id TEXT PRIMARY KEY, workflow TEXT NOT NULL)
    WITHOUT ROWID;
"""

UPSERT = """
INSERT INTO jobs (seq, job_id, state, gpu_id, finished_at, record) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (job_id) DO UPDATE SET seq = excluded.seq, state = excluded.state,
    gpu_id = excluded.gpu_id, finished_at = excluded.finished_at, record = excluded.record
"""

def open_database(path: Path | None, memory_jobs: int,
                  sync_full: bool = False) -> tuple[StateFile, Loaded]:
    """Lock, open, check and load the state file (None: a database in memory). Every
    failure is a StateFileError that names the file and says what to do."""
    name = str(path) if path is not None else "(memory)"
    lock_fd = _lock(path) if path is not None else None
    try:
        conn = sqlite3.connect(name if path is not None else ":memory:",
                               isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        _unlock(lock_fd)
        raise _unusable(name, "cannot be opened", exc) from None
    try:
        version = _schema_version(conn)
        if version is not None and version != SCHEMA_VERSION:
            newer = version > SCHEMA_VERSION
            raise StateFileError(
                f"state file {name} has schema {version} and this Cylindria reads schema "
                f"{SCHEMA_VERSION}: "
                + ("it was written by a newer Cylindria; upgrade Cylindria, or pass another "
                   "--state-file" if newer else
                   "it is not a schema Cylindria knows; pass another --state-file"))
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {'FULL' if sync_full else 'NORMAL'}")
        with conn:
            conn.execute("BEGIN")
            if version is None:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('install_id', ?)",
                         (secrets.token_hex(4),))
        database = StateFile(conn, name, lock_fd)
        return database, database.load(memory_jobs)
    except sqlite3.Error as exc:
        conn.close()
        _unlock(lock_fd)
        raise _unusable(name, "cannot be used", exc) from None
    except StateFileError:
        conn.close()
        _unlock(lock_fd)
        raise


def _lock(path: Path) -> int:
    """Hold an exclusive lock on PATH.lock for the life of the process: two Cylindrias
    on one state file would each take the other's jobs for lost ones."""
    name = f"{path}.lock"
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise _unusable(str(path), "cannot be locked", exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateFileError(
            f"state file {path} is in use by another running Cylindria; stop that one "
            "first, or give this one its own --state-file") from None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _unusable(name: str, what: str, exc: BaseException) -> StateFileError:
    reason = str(exc) or exc.__class__.__name__
    hint = "check the path and its permissions"
    if "not a database" in reason or "malformed" in reason:
        hint = ("it is not a Cylindria state file, or it is damaged: restore it from a "
                "backup or move it aside")
    elif "readonly" in reason or "read-only" in reason:
        hint = "make the file and its folder writable for this user"
    return StateFileError(f"state file {name} {what} ({reason}): {hint}, or pass another "
                          "--state-file (--no-state keeps nothing)")


def _schema_version(conn: sqlite3.Connection) -> int | None:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    if not exists:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else None


class StateFile:
    """One open state file; used from one thread only (the journal's writer)."""

    kind = "state file"
    errors = (sqlite3.Error,)
    # A WAL commit without fsync takes tens of microseconds.
    commits_inline = True
    look_at = "the disk"
    # One host: no nodes.
    clustered = False

    def __init__(self, conn: sqlite3.Connection, name: str, lock_fd: int | None) -> None:
        self.conn = conn
        self.name = name
        self._lock_fd = lock_fd

    def load(self, memory_jobs: int) -> Loaded:
        """Every job in flight, the newest finished ones, and where numbering stands."""
        conn = self.conn
        (install_id,) = conn.execute(
            "SELECT value FROM meta WHERE key = 'install_id'").fetchone()
        loaded = Loaded(install_id=install_id)
        marks = ",".join("?" * len(IN_FLIGHT_STATES))
        rows = conn.execute(f"SELECT record FROM jobs WHERE state IN ({marks})",
                            IN_FLIGHT_STATES).fetchall()
        finished = conn.execute(
            "SELECT record FROM jobs WHERE finished_at IS NOT NULL ORDER BY seq DESC "
            "LIMIT ?", (memory_jobs,)).fetchall()
        loaded.jobs = [decode_job(r[0]) for r in (*rows, *reversed(finished))]
        loaded.last_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0]
        older = conn.execute(
            "SELECT seq FROM jobs WHERE finished_at IS NOT NULL ORDER BY seq DESC "
            "LIMIT 1 OFFSET ?", (memory_jobs,)).fetchone()
        loaded.evicted_through = older[0] if older else 0
        loaded.held = self.held()
        row = conn.execute("SELECT value FROM meta WHERE key = 'run_times'").fetchone()
        loaded.run_times = decode_run_times(row[0] if row else None)
        return loaded

    def set_meta(self, key: str, value: str) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def close(self) -> None:
        self.conn.close()
        _unlock(self._lock_fd)
        self._lock_fd = None

    # -- writing --------------------------------------------------------------------

    def write(self, rows: Sequence[Row], workflows: Sequence[tuple[str, bytes]]) -> None:
        """One transaction: the workflows first written, then every row (all of them:
        no other node writes here)."""
        conn = self.conn
        encoded = [(seq, job_id, state, gpu, finished, encode_record(record))
                   for seq, job_id, state, gpu, finished, record in rows]
        with conn:
            conn.execute("BEGIN")
            if workflows:
                conn.executemany("INSERT OR REPLACE INTO workflows VALUES (?, ?)", workflows)
            conn.executemany(UPSERT, encoded)

    def prune(self, before: float, batch: int) -> int:
        """Delete up to `batch` jobs finished before `before` (epoch seconds)."""
        conn = self.conn
        doomed = conn.execute(
            "SELECT seq, job_id FROM jobs WHERE finished_at < ? LIMIT ?",
            (before, batch)).fetchall()
        if doomed:
            with conn:
                conn.execute("BEGIN")
                conn.executemany("DELETE FROM jobs WHERE seq = ?", [(s,) for s, _ in doomed])
                conn.executemany("DELETE FROM workflows WHERE job_id = ?",
                                 [(j,) for _, j in doomed])
        return len(doomed)

    # -- reading ------------------------------------------------------------------------

    def job(self, job_id: str) -> Job | None:
        row = self.conn.execute("SELECT record FROM jobs WHERE job_id = ?",
                                (job_id,)).fetchone()
        return None if row is None else decode_job(row[0])

    def workflow(self, job_id: str) -> bytes | str | None:
        row = self.conn.execute("SELECT workflow FROM workflows WHERE job_id = ?",
                                (job_id,)).fetchone()
        return None if row is None else row[0]

    def page(self, states: Iterable[str] | None, gpu_id: int | None, before: int,
             limit: int) -> list[Job]:
        """Newest first, below `before`, through the index that fits the filter."""
        where, args = ["seq < ?"], [before]
        if states is not None:
            wanted = sorted(states)
            where.append(f"state IN ({','.join('?' * len(wanted))})")
            args.extend(wanted)
        if gpu_id is not None:
            where.append("gpu_id = ?")
            args.append(gpu_id)
        rows = self.conn.execute(
            f"SELECT record FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
            (*args, limit)).fetchall()
        return [decode_job(r[0]) for r in rows]

    def held(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
