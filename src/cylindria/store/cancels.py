"""Nodes sharing a PostgreSQL database: cancels passed from one node to the node that
holds the job. A request is a row (it outlives a lost notification, and a restart of the
node it waits for), and a notification on one channel wakes that node at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg

from .backend import SharedDatabase
from .pgconnect import ConnectionThread
from .queue import CHANNEL as QUEUE_CHANNEL

# Every node listens on this channel; a notification's payload is the name of the node
# asked to cancel something.
CHANNEL = "cylindria_cancel"
# Migration 4: one row per job a node is asked to cancel, until that node has done it.
MIGRATION = (
    """CREATE TABLE cancel_requests (
        node text NOT NULL,
        job_id text NOT NULL,
        requested_by text NOT NULL,
        requested_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (node, job_id))""",
)
# Recorded and announced in one statement: the notification goes out when it commits.
REQUEST = """
WITH asked AS (
    INSERT INTO cancel_requests (node, job_id, requested_by) VALUES (%s, %s, %s)
    ON CONFLICT (node, job_id) DO UPDATE SET requested_at = now(),
        requested_by = excluded.requested_by)
SELECT pg_notify(%s, %s)
"""
PENDING = ("SELECT job_id FROM cancel_requests WHERE node = %s "
           "ORDER BY requested_at, job_id LIMIT %s")
DROP = "DELETE FROM cancel_requests WHERE node = %s AND job_id = ANY(%s)"
# Requests read at a time (the rest at the next round).
PENDING_LIMIT = 100
# How often the listening thread looks whether it should stop, and how long it waits
# before connecting again after its connection failed.
STOP_CHECK = 0.5
RECONNECT = 5.0


def request(db: SharedDatabase, node: str, job_id: str) -> None:
    """Ask node `node` to cancel its job `job_id`, and wake it."""
    args = (node, job_id, db.node.name, CHANNEL, node)
    db.run(lambda conn: conn.execute(REQUEST, args))


def pending(db: SharedDatabase) -> list[str]:
    """The ids of this node's jobs that other nodes asked it to cancel, oldest first."""
    args = (db.node.name, PENDING_LIMIT)
    return [row[0] for row in db.run(lambda conn: conn.execute(PENDING, args).fetchall())]


def drop(db: SharedDatabase, job_ids: list[str]) -> None:
    """The requests handled: deleted."""
    args = (db.node.name, job_ids)
    db.run(lambda conn: conn.execute(DROP, args))


class CancelListener(ConnectionThread):
    """LISTENs on the channel and calls `wake` (on the event loop) when a notification
    names this node, and once each time it (re)connects, since a request may have come
    while it was not listening. Its failures are logged once; the journal's polling
    covers what it misses."""

    name = "cancel-listener"
    doing = "listening for cancels from other nodes"
    meanwhile = "they are read at each heartbeat meanwhile"
    reconnect = RECONNECT
    longest_wait = STOP_CHECK

    def __init__(self, params: dict[str, Any], node: str,
                 loop: asyncio.AbstractEventLoop, wake: Callable[[], None],
                 on_queue: Callable[[str], None] | None = None) -> None:
        super().__init__(params, loop)
        self._node = node
        self._wake = wake
        # Called with the payload of each notification of the shared queue (queue.py).
        self._on_queue = on_queue

    def _session(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(f"LISTEN {CHANNEL}")
        if self._on_queue is not None:
            conn.execute(f"LISTEN {QUEUE_CHANNEL}")
            self._call(self._on_queue, "")
        self._recovered()
        self._call(self._wake)
        while not self._stopping.is_set():
            for note in conn.notifies(timeout=STOP_CHECK):
                if note.channel == QUEUE_CHANNEL:
                    if self._on_queue is not None:
                        self._call(self._on_queue, note.payload)
                elif note.payload == self._node:
                    self._call(self._wake)
