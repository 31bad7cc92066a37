"""Input files with nodes sharing PostgreSQL: each is in the database before the answer
that accepts it, in parts of 1 MiB, and any node that lacks it on its disk reads it from
there; so a job runs on another node than the one its file was sent to, and no accepted
file is lost with a node."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
from test_cluster_nodes import GPUS, Cluster
from test_cluster_nodes import cluster as cluster  # the fixture

from cylindria.addresses import free_port_run
from cylindria.errors import BackendUnavailable, InputInUse, StateUnavailable
from cylindria.store.inputs import InputStore
from cylindria.store.postgres import migrate
from cylindria.store.shared_inputs import PART, SharedInputs
from cylindria.upstream.inputs import InputDelivery

import workflows

MIB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png(seed: int, padding: int = 0) -> bytes:
    """A small real PNG whose pixels depend on `seed`, with `padding` random bytes in a
    private chunk (loaders skip it), so its size is what a test needs."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    row = bytes([0] + [(seed * 37 + x) % 256 for x in range(24)])
    extra = chunk(b"paDd", os.urandom(padding)) if padding else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
            + extra + chunk(b"IDAT", zlib.compress(row * 8)) + chunk(b"IEND", b""))


def rows(url: str, statement: str, *args: object) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(statement, args).fetchall()


async def chunks(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at:at + size]


# -- nodes as processes ------------------------------------------------------------------

async def upload(cluster: Cluster, node, data: bytes, name: str) -> dict:
    async with cluster.session.post(f"{node.url}/inputs/", params={"name": name},
                                    data=io.BytesIO(data),
                                    headers={"Content-Type": "image/png"}) as resp:
        assert resp.status == 201, await resp.text()
        return (await resp.json())["inputs"][0]


@pytest.mark.slow
async def test_a_file_sent_to_a_killed_node_runs_on_another(cluster, database_url):
    a, b = cluster.a, cluster.b
    await asyncio.gather(cluster.start(a), cluster.start(b))
    picture = png(3, padding=2 * MIB + 1000)  # three parts
    other = png(4)
    sent = await upload(cluster, a, picture, "big.png")
    kept = await upload(cluster, a, other, "small.png")

    # In the database by the time the 201 came, whole, in parts of at most 1 MiB.
    assert rows(database_url, "SELECT size, name, media_type FROM input_files WHERE id = %s",
                sent["id"]) == [(len(picture), "big.png", "image/png")]
    assert rows(database_url, "SELECT part, length(data) FROM input_parts WHERE id = %s "
                "ORDER BY part", sent["id"]) == [(0, PART), (1, PART),
                                                  (2, len(picture) - 2 * PART)]

    # Node A dies with the files on its disk only; node B never had them.
    assert a.proc.stop(signal.SIGKILL) == -signal.SIGKILL
    b_disk = cluster.tmp / "gpu-b-inputs"
    assert not (b_disk / sent["id"]).exists()

    # A job on node B's GPU 0 that names the file runs: B read it from the database and
    # put it on its ComfyUI, the same bytes.
    await cluster.put(b, "elsewhere", workflows.img2img(sent["ref"]), gpu=0)
    done = await cluster.until_state(b, "elsewhere", "completed", "failed", "rejected")
    assert done["state"] == "completed", done
    assert [(i["id"], i["size"]) for i in done["inputs"]] == [(sent["id"], len(picture))]
    async with cluster.session.get(f"http://127.0.0.1:{cluster.sim_port + GPUS}"
                                   "/_sim/inputs") as resp:
        held = await resp.json()
    assert held["uploads"] == 1
    assert [f["sha256"] for f in held["files"]] == [sha(picture)]
    assert (b_disk / sent["id"]).read_bytes() == picture

    # Node B answers the other file too, read from the database when asked.
    async with cluster.session.get(f"{b.url}/inputs/{kept['id']}") as resp:
        assert resp.status == 200 and await resp.read() == other
        assert resp.headers["Content-Type"] == "image/png"
    async with cluster.session.get(f"{b.url}/inputs/sha256-{'0' * 64}") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "input_not_found"

    # Deleted through node B: gone from the database and from B's disk.
    async with cluster.session.delete(f"{b.url}/inputs/{kept['id']}") as resp:
        assert resp.status == 204
    assert rows(database_url, "SELECT id FROM input_files WHERE id = %s", kept["id"]) == []
    assert rows(database_url, "SELECT id FROM input_parts WHERE id = %s", kept["id"]) == []
    async with cluster.session.get(f"{b.url}/inputs/{kept['id']}") as resp:
        assert resp.status == 404


# -- the store and the database -----------------------------------------------------------

@pytest.fixture
def schema(database_url: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrate(conn, "test", "node-a")
    return database_url


async def opened(path: Path, url: str, in_use=lambda _: False) -> InputStore:
    store = InputStore(path, 64 * MIB, in_use, shared=SharedInputs(url))
    await store.open()
    return store


async def test_a_large_file_goes_to_the_database_in_parts_and_comes_back(tmp_path, schema):
    data = os.urandom(5 * PART + 12345)
    one, two = await opened(tmp_path / "a", schema), await opened(tmp_path / "b", schema)
    try:
        entry, created = await one.add(chunks(data), "application/octet-stream", "big.bin",
                                       64 * MIB)
        assert created
        parts = rows(schema, "SELECT part, length(data) FROM input_parts WHERE id = %s "
                     "ORDER BY part", entry.id)
        assert parts == [(n, PART) for n in range(5)] + [(5, 12345)]

        # The same bytes again, on either node: written once.
        assert (await one.add(chunks(data), "text/plain", "again.bin", 64 * MIB))[1] is False
        assert (await two.add(chunks(data), "text/plain", "again.bin", 64 * MIB))[1] is True
        assert rows(schema, "SELECT name, media_type FROM input_files") == [
            ("big.bin", "application/octet-stream")]
        await two.delete(entry.id)  # from the database too
        assert rows(schema, "SELECT COUNT(*) FROM input_parts") == [(0,)]

        three = await opened(tmp_path / "c", schema)
        try:
            await one.add(chunks(data), "application/octet-stream", "big.bin", 64 * MIB)
            assert three.get(entry.id) is None
            described = await three.lookup([entry.id, f"sha256-{'1' * 64}"])
            assert list(described) == [entry.id] and described[entry.id].size == len(data)
            assert three.get(entry.id) is None  # described only, nothing read yet
            back = await three.obtain(entry.id)
            assert back is not None and (back.name, back.size) == ("big.bin", len(data))
            assert three.path(entry.id).read_bytes() == data
            assert await three.obtain(f"sha256-{'1' * 64}") is None
        finally:
            await three.close()
    finally:
        await one.close()
        await two.close()


async def test_a_file_another_nodes_job_uses_is_not_deleted_or_pruned(tmp_path, schema):
    store = await opened(tmp_path / "a", schema)
    try:
        entry, _ = await store.add(chunks(b"needed"), "text/plain", "n.txt", MIB)
        with psycopg.connect(schema) as conn:
            conn.execute("INSERT INTO jobs (node, seq, job_id, state, record) VALUES "
                         "('node-b', 1, 'far-job', 'running', %s)",
                         (f'{{"inputs": [{{"id": "{entry.id}"}}]}}',))
        with pytest.raises(InputInUse) as refused:
            await store.delete(entry.id)
        assert refused.value.extra == {"input_id": entry.id, "job_id": "far-job",
                                       "node": "node-b"}
        assert await store.prune(before=2e9) == 1  # this node's copy goes by age
        assert rows(schema, "SELECT id FROM input_files") == [(entry.id,)]
        with psycopg.connect(schema) as conn:
            conn.execute("UPDATE jobs SET state = 'completed'")
        await store.prune(before=2e9)
        assert rows(schema, "SELECT id FROM input_files") == []
    finally:
        await store.close()


async def test_no_file_is_accepted_while_the_database_is_unreachable(tmp_path):
    port = free_port_run(1)
    store = await opened(tmp_path / "a", f"postgresql://cylindria@127.0.0.1:{port}/none")
    try:
        with pytest.raises(StateUnavailable) as refused:
            await store.add(chunks(b"lost?"), "text/plain", "x.txt", MIB)
        assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "10"}
        assert "input files in its database" in refused.value.message
    finally:
        await store.close()


async def test_a_file_the_database_cannot_give_now_does_not_reach_a_gpu(tmp_path):
    # A job whose file cannot be read back now is not taken, as when ComfyUI cannot be
    # reached: from the queue, back in line; pinned, a 502.
    port = free_port_run(1)
    store = await opened(tmp_path / "a", f"postgresql://cylindria@127.0.0.1:{port}/none")
    delivery = InputDelivery(store, None, MIB, 1.0, 1.0)  # type: ignore[arg-type]
    wanted = f"sha256-{'2' * 64}"
    try:
        with pytest.raises(BackendUnavailable) as refused:
            await delivery.place(SimpleNamespace(index=0), [wanted])  # type: ignore[arg-type]
        assert refused.value.extra == {"input_id": wanted}
        assert "cannot be read from the database now" in refused.value.message
    finally:
        await store.close()
