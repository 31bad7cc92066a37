"""The dashboard where nodes share one PostgreSQL database: every node with its GPUs, which
node ran each job, kept live; and none of it on one host. The other nodes are rows in
the `nodes` table, written as their heartbeats write them."""

from __future__ import annotations

import psycopg
import ujson
from playwright.async_api import expect
from test_dashboard import BROKEN_TEXT, assert_clean, gpu_card, open_page, row, shot
from test_dashboard import browser as browser  # the fixture
from test_dashboard import chromium as chromium  # the fixture

import workflows
from helpers import put_job, wait_state, with_timing

PEER_GPUS = 8
RUNNING_ON_B = "render-on-node-b-" + "-".join(["batch"] * 8)


def peer_gpus(node: str, count: int) -> list[dict]:
    """A node's GPUs as its heartbeat carries them (upstream/heartbeat.py's gpu_summary)."""
    return [{"name": f"{node}/{n}", "node": node, "gpu_id": n,
             "status": "degraded" if n == count - 1 else "ok",
             "reachable": n != count - 1, "drained": n == 1, "queue_depth": 0,
             "queue_remaining": 2 if n == 0 else 0,
             "running_job": RUNNING_ON_B if n == 0 else None, "load": 0.0,
             "models": ["sdxl_base_1.0.safetensors", "sdxl_refiner_1.0.safetensors"]
             if n == 0 else [],
             "devices": [{"name": "cuda:0 NVIDIA RTX 4090", "vram_total": 24 * 2**30,
                          "vram_free": 20 * 2**30}]}
            for n in range(count)]


def write_node(database_url: str, name: str, gpus: list[dict], *, age: str = "0 seconds",
               stopped: bool = False, url: str | None = None) -> None:
    """Another node's row, as its heartbeat (and its clean stop) writes it."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO nodes (name, advertise_url, started_at, heartbeat_at, "
            "heartbeat_seconds, stopped_at, gpus) VALUES (%s, %s, now() - interval '1 hour', "
            "now() - %s::interval, 3600, CASE WHEN %s THEN now() END, %s::jsonb) "
            "ON CONFLICT (name) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, "
            "stopped_at = excluded.stopped_at, gpus = excluded.gpus",
            (name, url or f"http://{name}.example:8188", age, stopped, ujson.dumps(gpus)))


def peer(page, name: str):
    return page.locator(".peer").filter(has=page.locator(".node-title a", has_text=name))


async def test_every_node_and_its_gpus_and_the_node_that_ran_each_job(
        browser, start_cylindria, start_sims, database_url, tmp_path):
    sims = await start_sims(8)
    client = await start_cylindria(sims, database_url=database_url, node_name="gpu-a",
                                   state_file=tmp_path / "state.sqlite3",
                                   timing=with_timing(heartbeat_interval=0.2))
    write_node(database_url, "gpu-b", peer_gpus("gpu-b", PEER_GPUS))
    await put_job(client, "done-on-a", workflows.quick(), gpu=0)
    await wait_state(client, "done-on-a", "completed", timeout=10)

    page = await open_page(browser, client, width=1280)
    await expect(page.locator(".node-title").first).to_contain_text("gpu-a")
    b = peer(page, "gpu-b")
    await expect(b.locator("[data-field=node-state]")).to_have_text("Alive")
    await expect(b.locator(".node-title a")).to_have_attribute(
        "href", "http://gpu-b.example:8188/")
    await expect(b.locator("[data-field=node-seen]")).to_contain_text("ago")
    await expect(b.locator("article.peer-gpu")).to_have_count(PEER_GPUS)
    first = b.locator('article.peer-gpu[data-peer-gpu="0"]')
    await expect(first.locator("[data-field=status]")).to_have_text("OK")
    await expect(first.locator("[data-field=queue]")).to_have_text("running 1 + waiting 1")
    await expect(first.locator("[data-field=running] a")).to_have_attribute(
        "href", f"http://gpu-b.example:8188/dashboard/job/{RUNNING_ON_B}")
    await expect(first.locator("[data-field=models]")).to_contain_text("sdxl_refiner")
    await expect(b.locator('article.peer-gpu[data-peer-gpu="1"] .pill.drained')).to_be_visible()
    await expect(b.locator(f'article.peer-gpu[data-peer-gpu="{PEER_GPUS - 1}"] '
                           '[data-field=status]')).to_have_text("Degraded")
    # Another node's GPUs act on that node only: no button on its cards.
    assert await b.locator("button").count() == 0
    await expect(page.locator("article.gpu")).to_have_count(8)
    await expect(row(page, "done-on-a").locator("[data-field=job-node]")).to_have_text(
        "on gpu-a")

    # At 1280 px: this node's eight cards four across, the other's cut short, never spilt.
    tops = [(await gpu_card(page, n).bounding_box())["y"] for n in range(8)]
    assert [tops.index(top) for top in tops] == [n - n % 4 for n in range(8)]
    spills = await page.evaluate(
        """() => [...document.querySelectorAll('article.gpu, article.peer-gpu, .peer')]
                 .filter(box => box.scrollWidth > box.clientWidth)
                 .map(box => box.className + " " + (box.dataset.peerGpu || box.dataset.gpu))""")
    await shot(page, tmp_path, "nodes-at-1280")
    assert spills == []
    assert await page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    broken = await page.evaluate(BROKEN_TEXT, "article.peer-gpu h4, article.peer-gpu .pill, "
                                 "article.peer-gpu .facts dt, .peer .node-title")
    assert broken == [], "\n".join(broken)

    # Live: B stops cleanly, C is seen long silent; the page follows without a reload.
    await page.evaluate("window.__sameDocument = true")
    write_node(database_url, "gpu-b", peer_gpus("gpu-b", PEER_GPUS), stopped=True)
    # C's row names no web address: its name and running job are then no links.
    write_node(database_url, "gpu-c", peer_gpus("gpu-c", 2), age="1 day",
               url="javascript:alert(1)")
    await expect(b.locator("[data-field=node-state]")).to_have_text("Stopped")
    c = peer(page, "gpu-c")
    await expect(c.locator("[data-field=node-state]")).to_have_text("Not alive")
    await expect(c.locator("[data-field=node-seen]")).to_contain_text("24 h")
    assert await c.locator("a[href]").count() == 0
    await expect(c.locator("[data-field=running] a")).to_have_text(RUNNING_ON_B)
    # What a node not alive last said of its GPUs is no longer known.
    await expect(c.locator("article.peer-gpu [data-field=status]")).to_have_text(
        ["Unknown", "Unknown"])
    await expect(b.locator('article.peer-gpu[data-peer-gpu="0"] [data-field=status]')
                 ).to_have_text("Unknown")
    assert await page.evaluate("window.__sameDocument") is True

    state = await (await client.get("/dashboard/state")).json()
    assert state["node"] == "gpu-a"
    assert [n["name"] for n in state["nodes"]] == ["gpu-b", "gpu-c"]
    assert state["jobs"][0]["node"] == "gpu-a"

    job = await open_page(browser, client, "/dashboard/job/done-on-a")
    await expect(job.locator("dd[data-field=job-node]")).to_have_text("gpu-a")
    assert_clean(page)
    assert_clean(job)


async def test_one_host_shows_no_nodes(browser, start_cylindria, start_sims):
    client = await start_cylindria(await start_sims(1))
    await put_job(client, "solo", workflows.quick(), gpu=0)
    await wait_state(client, "solo", "completed", timeout=10)
    state = await (await client.get("/dashboard/state")).json()
    assert "node" not in state and "nodes" not in state
    assert "node" not in state["jobs"][0]

    page = await open_page(browser, client)
    await expect(row(page, "solo").locator("[data-field=state]")).to_have_text("Completed")
    # After an update from the feed too: the table drew its rows again by then.
    await expect(page.locator("[data-field=live]")).to_have_class("live is-live")
    for selector in (".node-title", ".peers", ".peer", "[data-field=job-node]"):
        assert await page.locator(selector).count() == 0, selector
    job = await open_page(browser, client, "/dashboard/job/solo")
    await expect(job.locator("[data-field=state]")).to_have_text("Completed")
    assert await job.locator("[data-field=job-node]").count() == 0
    assert_clean(page)
    assert_clean(job)
