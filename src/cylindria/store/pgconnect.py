"""Connecting to PostgreSQL: the URL read, Cylindria's connection defaults, and the
errors that name the database (never its password) and say what to do."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..errors import StateFileError

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


def connection_params(url: str) -> dict[str, Any]:
    """The URL's connection parameters, with Cylindria's defaults where it sets none."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise StateFileError(
            f"--database-url / CYLINDRIA_DATABASE_URL cannot be read ({one_line(exc)}): "
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


def connect(params: dict[str, Any]) -> psycopg.Connection[Any]:
    # Autocommit: a read is its own statement and leaves no transaction open; writes
    # take `conn.transaction()`.
    conn = psycopg.connect(**params, autocommit=True)
    try:
        conn.execute(SERVER_KEEPALIVES)
    except BaseException:
        conn.close()
        raise
    return conn


def one_line(exc: BaseException) -> str:
    # The server's own sentence when there is one, without the statement it quotes.
    primary = getattr(getattr(exc, "diag", None), "message_primary", None)
    return " ".join((primary or str(exc)).split()) or exc.__class__.__name__


def unreachable(name: str, exc: psycopg.Error) -> StateFileError:
    reason = one_line(exc)
    if "password" in reason or "authentication" in reason or "role" in reason:
        hint = "check the user and password (in the URL, PGPASSWORD or ~/.pgpass)"
    elif "does not exist" in reason:
        hint = "create the database first (createdb), or fix its name in the URL"
    else:
        hint = "check that PostgreSQL runs there and takes connections from this host"
    return StateFileError(f"database {name} cannot be reached ({reason}): {hint}, or pass "
                          "another --database-url")


def unusable(name: str, exc: psycopg.Error) -> StateFileError:
    reason = one_line(exc)
    hint = "check the database and this user's rights in it"
    if "permission denied" in reason:
        hint = ("let this user create tables in the database (make it the database's "
                "owner)")
    return StateFileError(f"database {name} cannot be used ({reason}): {hint}, or pass "
                          "another --database-url")


class ConnectionThread:
    """A thread of its own, on a connection of its own, which hands what it finds to the
    event loop: connected again `reconnect` seconds after a failure, each failure logged
    once (`doing` failed, then what covers it `meanwhile`) and the recovery too. A
    subclass's `_session` works on the connection until `_stopping` is set."""

    name = "connection"
    doing = "working on the database"
    meanwhile = "retrying"
    reconnect = 5.0
    # How long stopping waits for the thread: its longest wait on the connection, then.
    longest_wait = 1.0

    def __init__(self, params: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        self._params = params
        self._loop = loop
        self._stopping = threading.Event()
        self._failing = False
        self._log = logging.getLogger(type(self).__module__)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.to_thread(self._thread.join, self.longest_wait + self.reconnect)

    def _call(self, call: Callable[..., None], *args: Any) -> None:
        """`call(*args)` on the event loop."""
        try:
            self._loop.call_soon_threadsafe(call, *args)
        except RuntimeError:  # the loop is closed: the process is stopping
            self._stopping.set()

    def _recovered(self) -> None:
        """Say, once, that the connection works again after a failure."""
        if self._failing:
            self._log.warning("%s works again", self.doing)
            self._failing = False

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                with psycopg.connect(**self._params, autocommit=True) as conn:
                    self._session(conn)
            except psycopg.Error as exc:
                if not self._failing:
                    self._log.warning("%s failed (%s); %s", self.doing,
                                      " ".join(str(exc).split()), self.meanwhile)
                self._failing = True
                self._stopping.wait(self.reconnect)

    def _session(self, conn: psycopg.Connection[Any]) -> None:
        raise NotImplementedError
