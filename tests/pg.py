"""A throwaway PostgreSQL server for the tests, from Debian's postgresql package."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg

from cylindria.addresses import free_port_run

# Debian puts each major version's programs here (package postgresql-NN).
BINARIES = "/usr/lib/postgresql/*/bin"
MISSING = ("PostgreSQL's programs are missing (no initdb in /usr/lib/postgresql/*/bin): "
           "install Debian's postgresql package (apt-get install postgresql) to run the "
           "tests of the PostgreSQL store.")
# A test server need not survive a power cut: no fsync makes CREATE DATABASE and commits
# quick.
TEST_OPTIONS = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=50 -c shared_buffers=32MB")


def find_binaries() -> Path | None:
    """The bin folder of the newest PostgreSQL installed, or None."""
    found = [Path(p) for p in glob.glob(BINARIES) if (Path(p) / "initdb").exists()]
    return max(found, key=lambda p: int(p.parent.name)) if found else None


class PostgresServer:
    """initdb and pg_ctl as the `postgres` user when run as root (PostgreSQL refuses
    root), else as ourselves; the superuser role is `postgres`, trusted on loopback."""

    def __init__(self, binaries: Path, options: str = TEST_OPTIONS) -> None:
        self.binaries = binaries
        self.options = options
        self.folder = Path(tempfile.mkdtemp(prefix="cylindria-pg-"))
        self.data = self.folder / "data"
        self.port = free_port_run(1)
        self.databases = 0

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = [str(self.binaries / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                cwd=self.folder)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed:\n{result.stdout}"
                               f"{result.stderr}{self._log()}")

    def _log(self) -> str:
        log = self.folder / "server.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def start(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-sync", "--no-instructions")
        self.resume()

    def resume(self) -> None:
        """Start the server again on its data and port (after `halt`)."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"),
                  "-w", "-t", "30", "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} "
                  f"{self.options}", "start")

    def halt(self) -> None:
        """Stop the server, as an operator does (its sessions ended), keeping its data."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        self.databases += 1
        name = f"test_{self.databases}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)


class PostgresMissing(RuntimeError):
    """Debian's postgresql package is not installed (the message says what to do)."""


@contextlib.contextmanager
def running_server(options: str = TEST_OPTIONS) -> Iterator[PostgresServer]:
    """A server started for the caller and stopped (its folder removed) after;
    PostgresMissing when PostgreSQL's programs are not installed."""
    binaries = find_binaries()
    if binaries is None:
        raise PostgresMissing(MISSING)
    server = PostgresServer(binaries, options)
    try:
        server.start()
        yield server
    finally:
        server.stop()
