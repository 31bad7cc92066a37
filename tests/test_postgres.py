"""PostgreSQL as the journal's store: its schema's migrations, one Cylindria per node,
a lost connection, and the one line `cylindria serve` says when it cannot be used."""

from __future__ import annotations

import subprocess
import sys
import threading

import psycopg
import pytest

from cylindria.addresses import free_port_run
from cylindria.core.registry import Registry
from cylindria.nodes import default_node_name
from cylindria.store import postgres
from cylindria.store.journal import open_journal
from cylindria.store.postgres import MIGRATIONS, SCHEMA_VERSION, migrate

from helpers import clean_env

CYLINDRIA = [sys.executable, "-m", "cylindria"]


def serve_once(*args: str, prelude: str = "") -> tuple[int, str]:
    """Run `cylindria serve` with `args`; it must stop by itself. (exit code, last line
    of its standard error). `prelude` runs first in the same interpreter."""
    command = [sys.executable, "-c", f"{prelude}\nimport sys\nfrom cylindria.cli import main\n"
               "sys.exit(main(sys.argv[1:]))", "serve", "--port", str(free_port_run(1)),
               "--comfy-url", f"http://127.0.0.1:{free_port_run(1)}", *args]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True,
                            timeout=30)
    lines = result.stderr.strip().splitlines()
    return result.returncode, lines[-1] if lines else ""


def tables(url: str) -> dict[str, list]:
    with psycopg.connect(url) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    return {"tables": names, "versions": versions}


async def postgres_journal(url: str, registry: Registry):
    return await open_journal(None, 100, registry.saved, database_url=url)


async def test_an_empty_database_gets_every_migration_once(database_url):
    registry = Registry()
    first, loaded = await postgres_journal(database_url, registry)
    install_id = loaded.install_id
    await first.close()
    assert tables(database_url) == {
        "tables": ["cancel_requests", "input_files", "input_parts", "job_events", "jobs",
                   "meta", "nodes", "schema_migrations", "workflows"],
        "versions": [version for version, _ in MIGRATIONS]}
    again, loaded = await postgres_journal(database_url, registry)
    await again.close()
    assert loaded.install_id == install_id
    assert tables(database_url)["versions"] == [version for version, _ in MIGRATIONS]


def test_cylindrias_starting_at_once_migrate_in_turn(database_url):
    """Two migrations of one empty database side by side: the advisory lock lets one
    create the schema, the other finds it done."""
    params = postgres.connection_params(database_url)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def one() -> None:
        with psycopg.connect(**params, autocommit=True) as conn:
            start.wait(timeout=10)
            try:
                migrate(conn, "test", "node-test")
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert tables(database_url)["versions"] == [version for version, _ in MIGRATIONS]


def test_a_database_of_a_newer_cylindria_is_refused(database_url):
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        conn.execute("INSERT INTO schema_migrations (version) VALUES (1), (99)")
    code, line = serve_once("--database-url", database_url)
    assert code == 1
    assert line == (f"cylindria: error: database {database_url} has schema 99 and this "
                    f"Cylindria knows schemas up to {SCHEMA_VERSION}: it was written by a "
                    "newer Cylindria; upgrade Cylindria, or pass another --database-url")
    # Nothing was applied on top of it.
    assert tables(database_url) == {"tables": ["schema_migrations"], "versions": [1, 99]}


async def test_a_second_cylindria_of_the_same_node_is_refused(database_url):
    # Both are named after this host.
    journal, _ = await postgres_journal(database_url, Registry())
    try:
        code, line = serve_once("--database-url", database_url)
    finally:
        await journal.close()
    assert code == 1
    assert line == (f"cylindria: error: node {default_node_name()} is running on database "
                    f"{database_url} already; stop that Cylindria first, or give this one "
                    "another --node-name / CYLINDRIA_NODE_NAME")
    # Once the first is gone, its lock is too.
    journal, _ = await postgres_journal(database_url, Registry())
    await journal.close()


def test_an_unreachable_database_stops_start_up_with_one_line():
    url = f"postgresql://cylindria:s3cret-pw@127.0.0.1:{free_port_run(1)}/jobs"
    code, line = serve_once("--database-url", url)
    assert code == 1
    shown = url.replace(":s3cret-pw", "")
    assert line.startswith(f"cylindria: error: database {shown} cannot be reached (")
    assert "check that PostgreSQL runs there" in line and "s3cret" not in line


@pytest.mark.parametrize("url, problem", [
    ("mysql://cylindria:pw@127.0.0.1/jobs", "must start with postgresql://"),
    ("postgresql://cylindria:pw@127.0.0.1:port/jobs", "is not a URL, or its port is not a "
                                                      "number")])
def test_a_bad_database_url_stops_start_up_with_one_line(url, problem):
    code, line = serve_once("--database-url", url)
    assert code == 2
    assert line == (f"cylindria: error: --database-url / CYLINDRIA_DATABASE_URL {problem}; "
                    "give it as postgresql://USER:PASSWORD@HOST:PORT/DATABASE")


def test_without_the_driver_start_up_says_what_to_install():
    code, line = serve_once("--database-url", "postgresql://cylindria@127.0.0.1/jobs",
                            prelude="import sys; sys.modules['psycopg'] = None")
    assert code == 1
    assert line.startswith("cylindria: error: --database-url needs the PostgreSQL driver")
    assert line.endswith("pip install 'cylindria[postgres]'")


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
async def test_a_lost_connection_is_made_again_with_its_lock(store, postgres_server):
    registry = Registry()
    journal, _ = await store.open(100, registry.saved)
    registry.subscribe(journal.note)
    try:
        await journal.durable(registry.begin("before", 0, "p1", "f", ["1"]))
        with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'cylindria' AND datname = %s",
                (store.url.rsplit("/", 1)[1],)).fetchall()
        assert ended == [(True,)]
        await journal.durable(registry.begin("after", 0, "p2", "f", ["1"]))
        assert journal.writable
        assert store.record("after")["job_id"] == "after"
        code, line = serve_once("--database-url", store.url)
        assert code == 1 and "is running on database" in line
    finally:
        await journal.close()
