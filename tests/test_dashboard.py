"""The dashboard in a real headless Chromium, against the service and simulated GPUs."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import ujson
from aiohttp import ClientSession, DummyCookieJar, web
from playwright.async_api import Browser, Page, async_playwright, expect

from cylindria.appkeys import REGISTRY
from cylindria.core.estimates import node_costs

import workflows
from helpers import job_status, put_job, start_paused, wait_state, wait_until

CHROMIUM = Path("/usr/bin/chromium")
EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync"]
# Generous bounds for a loaded 2-core machine; a passing run waits far less.
WAIT_MS = 15_000
expect.set_options(timeout=WAIT_MS)


@pytest.fixture
def chromium() -> Path:
    # CI installs it; a missing browser must fail the run, never skip these tests.
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package "
                    "(apt-get install chromium) to run the dashboard's browser tests.")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path, start_cylindria) -> Any:
    """Debian's Chromium, driven by Playwright. Set up after the service (it depends on
    `start_cylindria`), so it closes first and no page polls a server being torn down."""
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=str(chromium), headless=True,
                                            args=LAUNCH_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def open_page(browser: Browser, client, path: str = "/", *, width: int = 1280,
                    height: int = 900, javascript: bool = True) -> Page:
    context = await browser.new_context(viewport={"width": width, "height": height},
                                        java_script_enabled=javascript)
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
    # A CSP violation means some markup or script would silently not work.
    page.on("console", lambda msg: problems.append(msg.text)
            if "Content Security Policy" in msg.text else None)
    page.problems = problems  # type: ignore[attr-defined]
    await page.goto(url(client, path))
    return page


def url(client, path: str) -> str:
    return str(client.make_url(path))


async def shot(page: Page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def assert_clean(page: Page) -> None:
    assert page.problems == [], page.problems  # type: ignore[attr-defined]


def row(page: Page, job_id: str):
    return page.locator("tr.job").filter(has=page.locator(
        "a[data-field=link]", has_text=job_id))


async def bar_value(page: Page, job_id: str) -> float:
    return float(await page.evaluate(
        """id => [...document.querySelectorAll('tr.job')]
                 .find(tr => tr.dataset.job === id).querySelector('progress').value""",
        job_id))


async def wait_bar_above(page: Page, job_id: str, floor: float) -> float:
    await page.wait_for_function(
        """([id, floor]) => {
             const tr = [...document.querySelectorAll('tr.job')].find(r => r.dataset.job === id);
             return tr && tr.querySelector('progress').value > floor;
           }""", arg=[job_id, floor], timeout=WAIT_MS)
    return await bar_value(page, job_id)


# -- overview ------------------------------------------------------------------------

async def test_first_paint_is_useful_without_javascript(browser, start_cylindria, start_sims,
                                                        tmp_path):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    await put_job(client, "before-load", workflows.quick(), gpu=1)
    await wait_state(client, "before-load", "completed", timeout=10)
    page = await open_page(browser, client, javascript=False)
    await expect(page.locator("article.gpu")).to_have_count(2)
    card = page.locator('article.gpu[data-gpu="1"]')
    await expect(card.locator("[data-field=status]")).to_have_text("OK")
    await expect(card).to_contain_text(str(cluster.base_port + 1))
    await expect(card.locator("[data-field=vram]")).to_contain_text("GiB")
    done = row(page, "before-load")
    await expect(done.locator("[data-field=state]")).to_have_text("Completed")
    await expect(done.locator("[data-field=percent]")).to_have_text("100%")
    await expect(done.locator("[data-field=detail]")).to_have_text("Completed.")
    # Buttons need the script to call the API: without it, none is offered.
    assert await page.locator("button[data-action]").count() == 6  # 2 cards, 1 row
    assert await page.locator("button[data-action]:visible").count() == 0
    await shot(page, tmp_path, "no-javascript")
    assert_clean(page)


async def test_jobs_appear_and_progress_moves_without_reload(browser, start_cylindria,
                                                             start_sims, tmp_path):
    cluster = await start_sims(2, step_seconds=0.01)
    client = await start_cylindria(cluster)
    page = await open_page(browser, client)
    await expect(page.locator("[data-field=empty]")).to_be_visible()
    await expect(page.locator("[data-field=live]")).to_have_class("live is-live")
    await page.evaluate("window.__sameDocument = true")

    sim = cluster.sims[0]
    await start_paused(client, sim, "render-1", workflows.txt2img(steps=8), gpu=0,
                       timeout=10)
    job = row(page, "render-1")
    await expect(job.locator("[data-field=state]")).to_have_text("Running")
    await expect(job.locator("[data-field=state]")).to_have_class("pill state-running")
    first = await wait_bar_above(page, "render-1", 0.0)
    await expect(page.locator("[data-field=empty]")).to_be_hidden()
    card = page.locator('article.gpu[data-gpu="0"]')
    await expect(card.locator("[data-field=running-link]")).to_have_text("render-1")
    await expect(card.locator("[data-field=running-node]")).to_contain_text("node 3")
    await expect(page.locator('article.gpu[data-gpu="1"] [data-field=idle]')).to_be_visible()
    await shot(page, tmp_path, "running")

    # One more sampler step: the bar must move forward on its own.
    sim.resume()
    sim.pause(at="tick")
    await asyncio.wait_for(sim.until_blocked(), 10)
    second = await wait_bar_above(page, "render-1", first)
    assert 0 < first < second < 1

    status, _ = await put_job(client, "quick-2", workflows.quick(), gpu=1)
    assert status == 202
    sim.resume()
    await expect(job.locator("[data-field=state]")).to_have_text("Completed")
    await expect(job.locator("[data-field=percent]")).to_have_text("100%")
    assert await bar_value(page, "render-1") == 1.0
    await expect(row(page, "quick-2").locator("[data-field=state]")).to_have_text("Completed")
    await expect(card.locator("[data-field=idle]")).to_be_visible()
    # Newest first.
    ids = await page.locator("tr.job").evaluate_all("rows => rows.map(r => r.dataset.job)")
    assert ids == ["quick-2", "render-1"]
    assert await page.evaluate("window.__sameDocument") is True
    await shot(page, tmp_path, "completed")
    assert_clean(page)


async def test_a_stopped_gpu_turns_its_card_degraded(browser, start_cylindria, start_sims,
                                                     tmp_path):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    page = await open_page(browser, client)
    gone = page.locator('article.gpu[data-gpu="1"]')
    await expect(gone.locator("[data-field=status]")).to_have_text("OK")
    await cluster.servers[1].close()
    await expect(gone.locator("[data-field=status]")).to_have_text("Degraded")
    await expect(gone).to_have_class("card gpu status-degraded")
    await expect(gone.locator("[data-field=listener]")).to_have_text("disconnected")
    await expect(gone.locator("[data-field=reachable]")).to_have_text("unreachable")
    await expect(gone.locator("[data-field=problem]")).to_be_visible()
    await expect(page.locator('article.gpu[data-gpu="0"] [data-field=status]')).to_have_text("OK")
    await shot(page, tmp_path, "degraded")
    assert_clean(page)


async def test_a_narrow_window_stacks_the_table(browser, start_cylindria, start_sims,
                                                tmp_path):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    for n in range(3):
        await put_job(client, f"phone-{n}", workflows.quick(), gpu=n % 2)
    await put_job(client, "phone-bad", workflows.fails_at_runtime())
    await wait_state(client, "phone-bad", "failed", timeout=10)
    page = await open_page(browser, client, width=390, height=844)
    await expect(row(page, "phone-bad").locator("[data-field=state]")).to_have_text("Failed")
    heads = page.locator("table.jobs thead")
    assert await heads.count() == 2  # the jobs waiting for a GPU, and the recent ones
    assert all([await heads.nth(n).is_hidden() for n in range(2)])
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0
    await shot(page, tmp_path, "narrow")
    assert_clean(page)


# -- one forecast per job ----------------------------------------------------------------

def learn_run_times(client, workflow: dict[str, Any], gpu: int,
                    sampler_seconds: float) -> None:
    """As if `gpu` had run this workflow before: its sampler took `sampler_seconds`, each
    other node a tenth of a second."""
    times = client.app[REGISTRY].run_times
    for cost in node_costs(workflow).values():
        times.observe(gpu, cost.key, cost.units, sampler_seconds if cost.steps else 0.1)


async def test_a_running_job_reads_the_same_time_left_on_its_card_and_in_the_table(
        browser, start_cylindria, start_sims, tmp_path):
    cluster = await start_sims(4, step_seconds=0.05)
    client = await start_cylindria(cluster)
    workflow = workflows.txt2img(steps=8)
    # A sampler learned to take minutes: held at its first step, the job's forecast falls
    # second by second for half a minute (until its next step is due), so a forecast
    # made at another moment would read differently.
    learn_run_times(client, workflow, gpu=2, sampler_seconds=240)
    sim = cluster.sims[2]
    await start_paused(client, sim, "slow-render", workflow, gpu=2, timeout=10)
    time_left = re.compile(r" · about \d+ min \d\d s left$")

    # The feed: the card's running job is the table's row, to the letter.
    state = await (await client.get("/dashboard/state")).json()
    on_card = state["gpus"][2]["running"]
    in_table = next(job for job in state["jobs"] if job["job_id"] == "slow-render")
    assert time_left.search(on_card["node_label"]), on_card["node_label"]
    assert on_card == in_table

    # The first paint.
    page = await open_page(browser, client, javascript=False)
    card_text = await gpu_card(page, 2).locator("[data-field=running-node]").text_content()
    row_text = await row(page, "slow-render").locator("[data-field=node]").text_content()
    assert card_text and time_left.search(card_text), card_text
    assert card_text == row_text
    await page.context.close()

    # The live updates: each poll rewrites both from one state, seconds after the last.
    page = await open_page(browser, client)
    polls: list[str] = []
    page.on("response", lambda r: polls.append(r.url)
            if r.url.endswith("/dashboard/state") else None)
    await wait_until(lambda: len(polls) >= 3, timeout=WAIT_MS / 1000,
                     what="three live updates")
    card_text, row_text = await page.evaluate(
        """() => [document.querySelector('article.gpu[data-gpu="2"] [data-field=running-node]'),
                  [...document.querySelectorAll('tr.job')]
                    .find(tr => tr.dataset.job === 'slow-render')
                    .querySelector('[data-field=node]')].map(e => e.textContent)""")
    assert time_left.search(card_text), card_text
    assert card_text == row_text
    await shot(page, tmp_path, "time-left")
    sim.resume()
    await expect(row(page, "slow-render").locator("[data-field=state]")).to_have_text(
        "Completed")
    assert_clean(page)


# -- layout ------------------------------------------------------------------------------

# Every value on the GPU cards and every job id, laid out: a line may end only at a space,
# never inside a word nor after a hyphen (each character's box, measured with a Range,
# says which line it is on), and a box whose text does not fit must cut it short with an
# ellipsis and carry the whole text in its title. Returns what breaks these rules.
BROKEN_TEXT = """selector => {
  const problems = [];
  const range = document.createRange();
  for (const element of document.querySelectorAll(selector)) {
    if (element.getClientRects().length === 0) {
      continue;  // not shown
    }
    const holder = element.closest("[data-gpu], [data-job], [data-peer-gpu], [data-node]");
    const where = (holder ? JSON.stringify(Object.assign({}, holder.dataset)) : "page")
      + " " + (element.dataset.field || element.className || element.tagName);
    const walker = document.createTreeWalker(element, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      let last = null;
      for (let i = 0; i < node.length; i++) {
        range.setStart(node, i);
        range.setEnd(node, i + 1);
        const box = range.getBoundingClientRect();
        if (box.width === 0) {
          continue;  // whitespace collapsed or hung at the end of a line
        }
        if (last && box.top > last.box.top + last.box.height / 2
            && !/\\s/.test(node.data.slice(last.at, i + 1))) {
          problems.push(where + ": " + JSON.stringify(
            node.data.slice(0, i) + "|" + node.data.slice(i)));
        }
        last = {at: i, box};
      }
    }
    const style = getComputedStyle(element);
    if (style.display !== "inline" && element.scrollWidth > element.clientWidth
        && (style.textOverflow !== "ellipsis"
            || !element.title.includes(element.textContent.trim()))) {
      problems.push(where + ": does not fit and is cut short without ellipsis and title");
    }
  }
  return problems;
}"""
CARD_TEXT = ("article.gpu h3, article.gpu .pill, article.gpu .url, article.gpu .facts dt, "
             "article.gpu .facts dd, article.gpu [data-field=device], "
             "article.gpu [data-field=problem], article.gpu [data-field=running-link], "
             "article.gpu [data-field=running-node], tr.job [data-field=link]")
# Job ids as people name them, hyphens and all, and one too long for any column.
LONG_ID = "nightly-portfolio-render-" + "-".join(["batch"] * 10) + "-final-upscale"


@pytest.mark.parametrize(("width", "count"), [(1280, 8), (1400, 4)])
async def test_gpu_cards_and_job_ids_never_break_inside_a_word(
        browser, start_cylindria, start_sims, tmp_path, width, count):
    cluster = await start_sims(count, step_seconds=0.01)
    client = await start_cylindria(cluster)
    workflow = workflows.txt2img(steps=8)
    for n in range(count - 1):
        learn_run_times(client, workflow, gpu=n, sampler_seconds=240)
    for n in range(count - 1):
        job_id = LONG_ID if n == 1 else f"render-{n:04d}-portrait-upscale"
        await start_paused(client, cluster.sims[n], job_id, workflow, gpu=n, timeout=10)
    for job_id in ("thumb-x-1", "queued-after-the-render"):
        status, body = await put_job(client, job_id, workflows.quick(), gpu=0)
        assert status == 202, body
    # The last GPU stops: its card says unreachable, disconnected, and why.
    await cluster.servers[-1].close()

    page = await open_page(browser, client, width=width)
    dead = gpu_card(page, count - 1)
    await expect(dead.locator("[data-field=listener]")).to_have_text("disconnected")
    await expect(dead.locator("[data-field=reachable]")).to_have_text("unreachable")
    await expect(dead.locator("[data-field=problem]")).to_be_visible()
    await expect(gpu_card(page, 0).locator("[data-field=queue]")).to_have_text(
        "running 1 + waiting 2")
    # Four cards across at both widths: eight GPUs make two rows of four.
    tops = [(await gpu_card(page, n).bounding_box())["y"] for n in range(count)]
    assert [tops.index(top) for top in tops] == [n - n % 4 for n in range(count)]
    await shot(page, tmp_path, f"gpus-{count}-at-{width}")

    broken = await page.evaluate(BROKEN_TEXT, CARD_TEXT)
    assert broken == [], "\n".join(broken)
    for link in (gpu_card(page, 1).locator("[data-field=running-link]"),
                 row(page, LONG_ID).locator("[data-field=link]")):
        await expect(link).to_have_attribute("title", LONG_ID)
        await expect(link).to_have_css("text-overflow", "ellipsis")
    # Nothing spills out of a card or out of the table, where it would be cut off unseen.
    spills = await page.evaluate(
        """() => [...document.querySelectorAll('article.gpu, .table-wrap')]
                 .filter(box => box.scrollWidth > box.clientWidth)
                 .map(box => box.dataset.gpu || box.className)""")
    assert spills == []
    for sim in cluster.sims[:-1]:
        sim.resume()
    assert_clean(page)


# -- job details ---------------------------------------------------------------------

async def test_job_detail_shows_the_error_with_its_traceback(browser, start_cylindria,
                                                             tmp_path):
    client = await start_cylindria()
    await put_job(client, "broken", workflows.fails_at_runtime())
    failed = await wait_state(client, "broken", "failed", timeout=10)
    page = await open_page(browser, client)
    await row(page, "broken").locator("[data-field=link]").click()
    await expect(page).to_have_url(url(client, "/dashboard/job/broken"))
    await expect(page.locator("h2.job-title")).to_have_text("broken")
    await expect(page.locator("[data-field=state]")).to_have_text("Failed")
    error = page.locator('[data-section="error"]')
    await expect(error).to_be_visible()
    await expect(error.locator("[data-field=error-kind]")).to_have_text(failed["error"]["type"])
    await expect(error.locator("[data-field=error-node]")).to_have_text("in node 2 (SaveImage)")
    await expect(error.locator("[data-field=error-message]")).to_contain_text(
        "outside the output folder")
    traceback = await error.locator("[data-field=error-traceback]").text_content()
    assert traceback and traceback.rstrip().endswith(failed["error"]["traceback"][-1].rstrip())
    await expect(page.locator("[data-field=at-finished]")).to_have_text(failed["finished_at"])
    await expect(page.locator("[data-field=outputs-empty]")).to_have_text("No outputs.")
    await shot(page, tmp_path, "job-failed")
    assert_clean(page)


async def test_job_detail_follows_a_running_job_to_its_images(browser, start_cylindria,
                                                              start_sims, tmp_path):
    cluster = await start_sims(1, step_seconds=0.01)
    client = await start_cylindria(cluster)
    sim = cluster.sims[0]
    await start_paused(client, sim, "picture", workflows.txt2img(steps=4), timeout=10)
    page = await open_page(browser, client, "/dashboard/job/picture")
    await page.evaluate("window.__sameDocument = true")
    await expect(page.locator("[data-field=state]")).to_have_text("Running")
    await expect(page.locator("[data-field=node]")).to_contain_text("node 3 · step 1/4")
    await expect(page.locator("[data-field=outputs-empty]")).to_have_text("No outputs yet.")
    sim.resume()
    await expect(page.locator("[data-field=state]")).to_have_text("Completed")
    image = page.locator("ul.outputs img")
    await expect(image).to_have_count(1)
    status = await (await client.get("/jobstatus/picture/")).json()
    entry = status["outputs"][0] if isinstance(status["outputs"], list) else None
    if entry is not None and entry.get("url"):
        await expect(image).to_have_attribute("src", entry["url"])
        await expect(image).to_have_attribute("alt", entry["filename"])
        # The thumbnail really loads: Cylindria streams it from the simulated ComfyUI.
        await page.wait_for_function(
            "() => { const i = document.querySelector('ul.outputs img');"
            " return i && i.complete && i.naturalWidth > 0; }", timeout=WAIT_MS)
    await expect(page.locator("[data-field=live]")).to_contain_text("Finished")
    assert await page.evaluate("window.__sameDocument") is True
    await shot(page, tmp_path, "job-completed")
    assert_clean(page)


async def test_unknown_job_detail_is_a_404_page(browser, start_cylindria, tmp_path):
    client = await start_cylindria()
    page = await open_page(browser, client, "/dashboard/job/never-submitted")
    await expect(page.locator("h2")).to_have_text("Job not found")
    await expect(page.locator("main")).to_contain_text("never-submitted")
    resp = await client.get("/dashboard/job/never-submitted")
    assert resp.status == 404
    await shot(page, tmp_path, "job-unknown")
    assert_clean(page)


# -- escaping --------------------------------------------------------------------------

HOSTILE_ID = '<img src=x onerror="window.__pwned=1">'
HOSTILE_DETAIL = "<script>window.__pwned=2</script> & <b>bold</b>"


async def test_markup_in_job_ids_and_details_renders_as_text(browser, start_cylindria,
                                                             tmp_path):
    client = await start_cylindria()
    # The API refuses such ids; a job record can still hold any string, so the pages
    # must never trust it.
    registry = client.app[REGISTRY]
    hostile = registry.begin(HOSTILE_ID, 0, "prompt-hostile", "fp", ["1"])
    registry.reject(hostile, HOSTILE_DETAIL,
                    error={"type": "<script>window.__pwned=3</script>",
                           "message": "<i>not italic</i>"})
    status, body = await put_job(
        client, "bad-model", workflows.txt2img(ckpt="<script>window.__pwned=4</script>"))
    assert status == 422, body

    page = await open_page(browser, client)
    hostile_row = page.locator("tr.job").filter(has_text="onerror")
    await expect(hostile_row.locator("[data-field=link]")).to_have_text(HOSTILE_ID)
    await expect(hostile_row.locator("[data-field=detail]")).to_have_text(HOSTILE_DETAIL)
    await expect(row(page, "bad-model").locator("[data-field=state]")).to_have_text("Rejected")
    # Wait for a live update to have rewritten the rows too.
    await expect(page.locator("[data-field=live]")).to_contain_text("Live")
    await expect(hostile_row.locator("[data-field=link]")).to_have_text(HOSTILE_ID)
    assert await page.locator("main img").count() == 0
    assert await page.locator("main b, main i").count() == 0
    await shot(page, tmp_path, "escaping")

    await hostile_row.locator("[data-field=link]").click()
    await expect(page.locator("h2.job-title")).to_have_text(HOSTILE_ID)
    await expect(page.locator("[data-field=error-kind]")).to_have_text(
        "<script>window.__pwned=3</script>")
    await expect(page.locator("[data-field=error-message]")).to_have_text("<i>not italic</i>")
    await page.goto(url(client, "/dashboard/job/bad-model"))
    for name in ("node-errors-summary", "node-errors-raw"):
        await expect(page.locator(f"[data-field={name}]")).to_contain_text(
            "<script>window.__pwned=4</script>")
    assert await page.evaluate("typeof window.__pwned") == "undefined"
    await shot(page, tmp_path, "escaping-detail")
    assert_clean(page)


# -- signing in ------------------------------------------------------------------------

async def test_the_key_form_signs_in_and_out(browser, start_cylindria, tmp_path):
    client = await start_cylindria(api_key="s3cret")
    page = await open_page(browser, client)
    await expect(page).to_have_url(url(client, "/dashboard/login?next=/"))
    await shot(page, tmp_path, "login")

    await page.fill("#key", "not-the-key")
    async with page.expect_response(lambda r: r.request.method == "POST") as answer:
        await page.click("button[type=submit]")
    assert (await answer.value).status == 401
    await expect(page.locator("[role=alert]")).to_have_text("That key is wrong. Try again.")
    await shot(page, tmp_path, "login-wrong")

    await page.fill("#key", "s3cret")
    await page.click("button[type=submit]")
    await expect(page).to_have_url(url(client, "/"))
    await expect(page.locator("article.gpu")).to_have_count(1)
    await expect(page.locator("[data-field=live]")).to_have_class("live is-live")
    cookies = {c["name"]: c for c in await page.context.cookies()}
    session = cookies["cylindria_session"]
    assert session["httpOnly"] is True and session["sameSite"] == "Strict"
    assert "s3cret" not in session["value"]

    # The cookie alone opens the dashboard but never the JSON API.
    jar_free = {"Cookie": f"cylindria_session={session['value']}"}
    async with ClientSession(cookie_jar=DummyCookieJar()) as http:
        for path in ("/serverstatus", "/jobstatus/x/", "/jobs/", "/gpus/"):
            async with http.get(url(client, path), headers=jar_free) as resp:
                assert resp.status == 401, path
        async with http.put(url(client, "/startjob/x/"), headers=jar_free,
                            data=ujson.dumps(workflows.quick())) as resp:
            assert resp.status == 401
        async with http.get(url(client, "/dashboard/state"), headers=jar_free) as resp:
            assert resp.status == 200
        await page.click("[data-field=signout]")
        await expect(page).to_have_url(url(client, "/dashboard/login"))
        await expect(page.locator("#key")).to_be_visible()
        # Signing out ends the session on the server, not only in this browser.
        async with http.get(url(client, "/dashboard/state"), headers=jar_free) as resp:
            assert resp.status == 401
    await page.goto(url(client, "/"))
    await expect(page).to_have_url(url(client, "/dashboard/login?next=/"))
    assert_clean(page)


async def test_gpu_cards_turn_unknown_while_the_service_cannot_be_reached(
        browser, start_cylindria, start_sims, tmp_path):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    page = await open_page(browser, client)
    cards = page.locator("article.gpu")
    await expect(page.locator("[data-field=live]")).to_have_class("live is-live")
    for n in range(2):
        await expect(cards.nth(n).locator("[data-field=status]")).to_have_text("OK")
    updated = (await page.locator("[data-field=live-label]").text_content() or "")
    assert updated.startswith("Live · updated ")

    # From the browser's side Cylindria is gone: every poll of its state fails.
    await page.route("**/dashboard/state", lambda route: route.abort())
    await expect(page.locator("[data-field=live]")).to_have_class("live is-stale")
    for n in range(2):
        card = cards.nth(n)
        await expect(card).to_have_class("card gpu status-unknown")
        await expect(card.locator("[data-field=status]")).to_have_text("Unknown")
        await expect(card.locator("[data-field=status]")).to_have_class("pill status-unknown")
        note = card.locator("[data-field=stale]")
        await expect(note).to_be_visible()
        await expect(note).to_have_text(re.compile(r"^No update since \d\d:\d\d:\d\d UTC$"))
    await shot(page, tmp_path, "unreachable")

    await page.unroute("**/dashboard/state")
    await expect(page.locator("[data-field=live]")).to_have_class("live is-live")
    for n in range(2):
        card = cards.nth(n)
        await expect(card.locator("[data-field=status]")).to_have_text("OK")
        await expect(card).to_have_class("card gpu status-ok")
        await expect(card.locator("[data-field=stale]")).to_be_hidden()
    assert_clean(page)


async def test_the_api_link_opens_the_contract_rendered(browser, start_cylindria, tmp_path):
    client = await start_cylindria()
    page = await open_page(browser, client, "/")
    await page.click("a.apilink")
    await expect(page.locator(".swagger-ui .info .title")).to_contain_text("Cylindria")
    paths = page.locator(".opblock-summary-path")
    await expect(paths.filter(has_text="/startjob/{job_id}/")).to_have_count(1)
    await expect(paths.filter(has_text="/metrics")).to_have_count(1)
    await shot(page, tmp_path, "api-docs")
    assert_clean(page)


# -- actions ---------------------------------------------------------------------------

def flash(page: Page):
    """What the last action said."""
    return page.locator("[data-field=flash-text]")


def flash_box(page: Page):
    return page.locator("[data-field=flash]")


def gpu_card(page: Page, n: int):
    return page.locator(f'article.gpu[data-gpu="{n}"]')


async def test_cancel_from_the_jobs_table_and_the_queue_as_running_plus_waiting(
        browser, start_cylindria, start_sims, tmp_path):
    cluster = await start_sims(1, step_seconds=0.01)
    client = await start_cylindria(cluster)
    sim = cluster.sims[0]
    await start_paused(client, sim, "busy", workflows.txt2img(steps=8), timeout=10)
    page = await open_page(browser, client)
    queue = gpu_card(page, 0).locator("[data-field=queue]")
    await expect(queue).to_have_text("running 1 + waiting 0")
    status, body = await put_job(client, "waiting", workflows.quick())
    assert status == 202, body
    await expect(queue).to_have_text("running 1 + waiting 1")

    waiting = row(page, "waiting")
    await expect(waiting.locator("[data-field=state]")).to_have_text("Queued")
    await expect(waiting.locator("[data-action=retry]")).to_be_hidden()
    # Finished jobs have nothing to cancel, running and queued ones no retry.
    await expect(row(page, "busy").locator("[data-action=cancel]")).to_be_visible()
    await shot(page, tmp_path, "actions-before-cancel")
    await waiting.locator("[data-action=cancel]").click()
    # A job still in ComfyUI's queue is deleted from it: cancelled in the answer.
    await expect(flash(page)).to_have_text(re.compile(r"Cancelled job waiting\."))
    await expect(flash_box(page)).to_have_class(re.compile(r"\bis-ok\b"))
    await expect(waiting.locator("[data-field=state]")).to_have_text("Cancelled")
    await expect(waiting.locator("[data-action=cancel]")).to_be_hidden()
    await expect(waiting.locator("[data-action=retry]")).to_be_visible()
    await expect(queue).to_have_text("running 1 + waiting 0")
    assert (await job_status(client, "waiting"))["state"] == "cancelled"
    await shot(page, tmp_path, "actions-cancelled-from-table")
    sim.resume()
    await expect(row(page, "busy").locator("[data-field=state]")).to_have_text("Completed")
    await expect(row(page, "busy").locator("[data-action=cancel]")).to_be_hidden()
    await expect(row(page, "busy").locator("[data-action=retry]")).to_be_hidden()
    await expect(queue).to_have_text("empty")
    await page.locator("[data-field=flash-close]").click()
    await expect(flash_box(page)).to_be_hidden()
    assert_clean(page)


async def test_cancel_and_retry_from_the_job_page(browser, start_cylindria, start_sims,
                                                 tmp_path):
    cluster = await start_sims(2, step_seconds=0.01)
    client = await start_cylindria(cluster)
    sim = cluster.sims[0]
    await start_paused(client, sim, "again", workflows.txt2img(steps=4), gpu=0, timeout=10)
    page = await open_page(browser, client, "/dashboard/job/again")
    actions = page.locator('[data-section="job-actions"]')
    await expect(page.locator("[data-field=attempt]")).to_have_text("1")
    await expect(actions.locator("[data-action=retry]")).to_be_hidden()
    await actions.locator("[data-action=cancel]").click()
    # A running job ends only when ComfyUI reports the interruption.
    await expect(flash(page)).to_have_text(
        "Cancel of job again requested: it ends once ComfyUI confirms.")
    sim.resume()
    await expect(page.locator("[data-field=state]")).to_have_text("Cancelled")
    await expect(actions.locator("[data-action=cancel]")).to_be_hidden()
    await expect(actions.locator("[data-field=retry-gpu]")).to_be_visible()
    await shot(page, tmp_path, "job-page-cancelled")

    # Run it again elsewhere: the page's choice goes to the API as GpuId.
    await actions.locator("[data-field=retry-gpu]").select_option("1")
    await actions.locator("[data-action=retry]").click()
    await expect(flash(page)).to_have_text("Queued job again again as attempt 2 on GPU 1.")
    await expect(page.locator("[data-field=gpu]")).to_have_text("GPU 1")
    # The page follows the new attempt although it had stopped at a finished one.
    await expect(page.locator("[data-field=state]")).to_have_text("Completed")
    await expect(page.locator("[data-field=attempt]")).to_have_text("2")
    attempts = page.locator('[data-section="attempts"]')
    await expect(attempts).to_be_visible()
    await expect(attempts.locator("tr.attempt")).to_have_count(2)
    await expect(attempts.locator("tr.attempt").nth(1)).to_contain_text("Cancelled")
    await expect(actions.locator("[data-action=retry]")).to_be_hidden()
    status = await job_status(client, "again")
    assert (status["attempt"], status["state"], status["gpu_id"]) == (2, "completed", 1)
    await shot(page, tmp_path, "job-page-retried")
    assert_clean(page)


async def test_retry_from_the_table_and_a_refused_action_shows_why(
        browser, start_cylindria, start_sims, tmp_path):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    sim = cluster.sims[0]
    await put_job(client, "broken", workflows.fails_at_runtime())
    await wait_state(client, "broken", "failed", timeout=10)
    page = await open_page(browser, client)
    broken = row(page, "broken")
    await expect(broken.locator("[data-field=attempt]")).to_have_text("")
    await broken.locator("[data-action=retry]").click()
    await expect(flash(page)).to_have_text("Queued job broken again as attempt 2 on GPU 0.")
    await expect(broken.locator("[data-field=attempt]")).to_have_text("attempt 2")
    await expect(broken.locator("[data-field=state]")).to_have_text("Failed")
    assert (await job_status(client, "broken"))["attempt"] == 2

    # A finished job's page stops polling: meanwhile a script runs the job again, so
    # the page's Retry is out of date and the API refuses it.
    await page.goto(url(client, "/dashboard/job/broken"))
    retry = page.locator('[data-section="job-actions"] [data-action=retry]')
    await expect(retry).to_be_visible()
    sim.pause(at="dequeue")
    resp = await client.post("/retryjob/broken/")
    assert resp.status == 202, await resp.text()
    await retry.click()
    await expect(flash(page)).to_have_text(
        "Could not retry job broken (409): Job 'broken' is queued; only a failed, "
        "cancelled or rejected job can run again.")
    await expect(flash_box(page)).to_have_class(re.compile(r"\bis-error\b"))
    # The refusal makes the page look again: it now shows the queued attempt.
    await expect(page.locator("[data-field=state]")).to_have_text("Queued")
    await expect(page.locator("[data-field=attempt]")).to_have_text("3")
    await shot(page, tmp_path, "job-page-refused")
    await page.locator('[data-section="job-actions"] [data-action=cancel]').click()
    await expect(flash(page)).to_have_text("Cancelled job broken.")
    await expect(page.locator("[data-field=state]")).to_have_text("Cancelled")
    sim.resume()
    assert_clean(page)


async def test_drain_and_undrain_from_a_gpu_card(browser, start_cylindria, start_sims,
                                                 tmp_path):
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    page = await open_page(browser, client)
    card = gpu_card(page, 1)
    await expect(card.locator("[data-action=undrain]")).to_be_hidden()
    await card.locator("[data-action=drain]").click()
    await expect(flash(page)).to_have_text(
        "Drained GPU 1: it takes no new jobs; those it holds finish.")
    await expect(card.locator("[data-field=drained]")).to_be_visible()
    await expect(card.locator("[data-action=drain]")).to_be_hidden()
    await expect(card.locator("[data-action=undrain]")).to_be_visible()
    await expect(gpu_card(page, 0).locator("[data-field=drained]")).to_be_hidden()
    gpus = (await (await client.get("/gpus/")).json())["gpus"]
    assert [g["drained"] for g in gpus] == [False, True]
    status, body = await put_job(client, "to-drained", workflows.quick(), gpu=1)
    assert status == 409 and body["error"]["code"] == "gpu_drained"
    await shot(page, tmp_path, "gpu-drained")

    await card.locator("[data-action=undrain]").click()
    await expect(flash(page)).to_have_text("Undrained GPU 1: it takes new jobs again.")
    await expect(card.locator("[data-field=drained]")).to_be_hidden()
    await expect(card.locator("[data-action=drain]")).to_be_visible()
    status, body = await put_job(client, "to-open", workflows.quick(), gpu=1)
    assert status == 202, body
    assert_clean(page)


# -- failures --------------------------------------------------------------------------

async def chip_counts(page: Page) -> dict[str, str]:
    return await page.locator("[data-chip]").evaluate_all(
        "chips => Object.fromEntries(chips.map(c => "
        "[c.dataset.chip, c.querySelector('[data-field=count]').textContent]))")


async def shown_jobs(page: Page) -> list[str]:
    return await page.locator("tr.job").evaluate_all("rows => rows.map(r => r.dataset.job)")


async def test_the_failures_view_filters_counts_and_pages(browser, start_cylindria,
                                                          start_sims, tmp_path,
                                                          monkeypatch):
    monkeypatch.setattr("cylindria.dashboard.failures.PAGE_SIZE", 2)
    cluster = await start_sims(2)
    client = await start_cylindria(cluster)
    await put_job(client, "fail-0", workflows.fails_at_runtime(), gpu=0)
    await wait_state(client, "fail-0", "failed", timeout=10)
    status, _ = await put_job(client, "refused-0", workflows.txt2img(ckpt="missing.ckpt"),
                              gpu=0)
    assert status == 422
    cluster.sims[1].pause(at="dequeue")
    await put_job(client, "stopped-1", workflows.quick(), gpu=1)
    resp = await client.post("/canceljob/stopped-1/")
    assert (await resp.json())["state"] == "cancelled"
    cluster.sims[1].resume()
    await put_job(client, "fine-1", workflows.quick(), gpu=1)
    await put_job(client, "fail-1", workflows.fails_at_runtime(), gpu=1)
    await wait_state(client, "fail-1", "failed", timeout=10)
    await wait_state(client, "fine-1", "completed", timeout=10)

    page = await open_page(browser, client)
    await page.click("a.navlink")
    await expect(page).to_have_url(url(client, "/dashboard/failures"))
    await expect(page.locator("[data-field=live]")).to_have_class("live is-live")
    assert await chip_counts(page) == {
        "state:all": "4", "state:failed": "2", "state:rejected": "1", "state:cancelled": "1",
        "gpu:all": "4", "gpu:0": "2", "gpu:1": "2"}
    await expect(page.locator("[data-field=summary]")).to_contain_text("4 in the last hour")
    # Newest first, two a page here; the completed job is never listed.
    assert await shown_jobs(page) == ["fail-1", "stopped-1"]
    await expect(page.locator("[data-field=newest]")).to_be_hidden()
    await shot(page, tmp_path, "failures")
    await page.click("[data-field=older]")
    await expect(page).to_have_url(re.compile(r"/dashboard/failures\?before=\d+$"))
    await expect(row(page, "refused-0")).to_have_count(1)
    assert await shown_jobs(page) == ["refused-0", "fail-0"]
    await expect(page.locator("[data-field=older]")).to_be_hidden()
    await expect(page.locator("[data-field=newest]")).to_be_visible()

    await page.click('[data-chip="state:failed"]')
    await expect(page).to_have_url(url(client, "/dashboard/failures?state=failed"))
    assert await shown_jobs(page) == ["fail-1", "fail-0"]
    counts = await chip_counts(page)
    assert (counts["gpu:all"], counts["gpu:0"], counts["gpu:1"]) == ("2", "1", "1")
    await expect(page.locator('[data-chip="state:failed"]')).to_have_class("chip active")
    await page.click('[data-chip="gpu:1"]')
    await expect(page).to_have_url(url(client, "/dashboard/failures?state=failed&gpu=1"))
    assert await shown_jobs(page) == ["fail-1"]
    assert (await chip_counts(page))["state:cancelled"] == "1"
    await shot(page, tmp_path, "failures-filtered")

    # A new failure appears on its own, at the top, and is counted.
    await put_job(client, "fail-1b", workflows.fails_at_runtime(), gpu=1)
    await expect(row(page, "fail-1b")).to_have_count(1)
    await expect(page.locator('[data-chip="gpu:1"] [data-field=count]')).to_have_text("2")
    assert (await shown_jobs(page))[0] == "fail-1b"
    # Each one can be run again from here.
    await row(page, "fail-1b").locator("[data-action=retry]").click()
    await expect(flash(page)).to_have_text("Queued job fail-1b again as attempt 2 on GPU 1.")
    await expect(row(page, "fail-1b").locator("[data-field=attempt]")).to_have_text(
        "attempt 2")
    assert_clean(page)


async def test_a_cached_job_says_from_cache(browser, start_cylindria, tmp_path):
    client = await start_cylindria()
    await put_job(client, "first", workflows.quick(color=4242))
    await wait_state(client, "first", "completed", timeout=10)
    await put_job(client, "repeat", workflows.quick(color=4242))
    repeat = await wait_state(client, "repeat", "completed", timeout=10)
    assert repeat["outputs_reused"] is True
    page = await open_page(browser, client)
    await expect(row(page, "repeat").locator("[data-field=duration]")).to_have_text(
        "from cache")
    await expect(row(page, "first").locator("[data-field=duration]")).to_have_text(
        re.compile(r"^\d+\.\d s$"))
    await shot(page, tmp_path, "from-cache")
    await row(page, "repeat").locator("[data-field=link]").click()
    await expect(page.locator("[data-field=cached]")).to_be_visible()
    await expect(page.locator("[data-field=duration]")).to_have_text("from cache")
    await expect(page.locator("[data-field=state]")).to_have_text("Completed")
    await page.goto(url(client, "/dashboard/job/first"))
    await expect(page.locator("[data-field=cached]")).to_be_hidden()
    assert_clean(page)


# -- actions with a sign-in --------------------------------------------------------------

ATTACKER_PAGE = """<!doctype html><title>elsewhere</title>
<form method="post" action="{target}"><button type="submit">Win a prize</button></form>"""


async def test_a_signed_in_browser_acts_but_another_site_cannot(
        browser, start_cylindria, start_sims, aiohttp_server, tmp_path):
    cluster = await start_sims(1, step_seconds=0.01)
    client = await start_cylindria(cluster, api_key="s3cret")
    sim = cluster.sims[0]
    sim.pause(at="tick")
    status, body = await put_job(client, "guarded", workflows.txt2img(steps=4),
                                 headers={"X-API-Key": "s3cret"})
    assert status == 202, body
    await asyncio.wait_for(sim.until_blocked(), 10)

    # Another site on this host: the same site for the SameSite rule, another origin.
    async def attacker(request: web.Request) -> web.Response:
        target = url(client, "/canceljob/guarded/")
        return web.Response(text=ATTACKER_PAGE.format(target=target),
                            content_type="text/html")
    app = web.Application()
    app.router.add_get("/", attacker)
    elsewhere = await aiohttp_server(app)

    page = await open_page(browser, client)
    await page.fill("#key", "s3cret")
    await page.click("button[type=submit]")
    await expect(page).to_have_url(url(client, "/"))
    token = await page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert token and len(token) >= 40

    await page.goto(str(elsewhere.make_url("/")))
    async with page.expect_response(lambda r: r.request.method == "POST") as answer:
        await page.click("button[type=submit]")
    refused = await answer.value
    # 403 and not 401: the browser did send the sign-in, and the origin gave it away.
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "origin_refused"
    await shot(page, tmp_path, "cross-site-refused")
    status = await (await client.get("/jobstatus/guarded/",
                                     headers={"X-API-Key": "s3cret"})).json()
    assert status["state"] == "running" and status["cancel_requested"] is False

    await page.goto(url(client, "/"))
    await row(page, "guarded").locator("[data-action=cancel]").click()
    await expect(flash(page)).to_have_text(
        "Cancel of job guarded requested: it ends once ComfyUI confirms.")
    sim.resume()
    await expect(row(page, "guarded").locator("[data-field=state]")).to_have_text("Cancelled")
    await shot(page, tmp_path, "signed-in-cancelled")
    assert_clean(page)


async def test_the_jobs_waiting_for_a_gpu_are_listed_in_line_and_can_be_cancelled(
        browser, start_cylindria, start_sims, tmp_path):
    cluster = await start_sims(1, step_seconds=0.01)
    client = await start_cylindria(cluster)
    sim = cluster.sims[0]
    await start_paused(client, sim, "busy", workflows.txt2img(steps=8), gpu="auto",
                       timeout=10)
    page = await open_page(browser, client)
    held = page.locator("tbody[data-field=held] tr.job")
    await expect(page.locator("[data-field=held-empty]")).to_be_visible()
    for job_id, priority in [("later", 0), ("urgent", 5), ("last", 0)]:
        resp = await client.put(f"/startjob/{job_id}/",
                                params={"GpuId": "auto", "priority": str(priority)},
                                json=workflows.quick())
        assert resp.status == 202
    # In the order they will leave: priority first, then arrival.
    await expect(held.locator("a[data-field=link]")).to_have_text(["urgent", "later", "last"])
    await expect(held.nth(0).locator("[data-field=node]")).to_contain_text("priority 5")
    await expect(held.nth(1).locator("[data-field=gpu]")).to_have_text("—")
    await expect(page.locator("[data-field=held-summary]")).to_contain_text("3 waiting")
    await shot(page, tmp_path, "held-queue")
    await held.nth(1).locator("[data-action=cancel]").click()
    await expect(flash(page)).to_have_text(re.compile(r"Cancelled job later\."))
    await expect(held.locator("a[data-field=link]")).to_have_text(["urgent", "last"])
    assert (await job_status(client, "later"))["state"] == "cancelled"
    sim.resume()
    await expect(page.locator("[data-field=held-empty]")).to_be_visible(timeout=10_000)
    assert (await wait_state(client, "urgent", "completed"))["placement"]
    assert_clean(page)


async def test_the_job_page_shows_its_input_pictures_beside_the_outputs(
        browser, start_cylindria, start_sims, tmp_path):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster)
    examples = EXAMPLES
    form = aiohttp.FormData()
    form.add_field("workflow", ujson.dumps(workflows.img2img("photo.png")),
                   content_type="application/json")
    form.add_field("photo", (examples / "photo.png").read_bytes(), filename="photo.png",
                   content_type="image/png")
    resp = await client.put("/startjob/with-input/", data=form)
    assert resp.status == 202, await resp.text()
    await wait_state(client, "with-input", "completed", timeout=10)
    page = await open_page(browser, client, "/dashboard/job/with-input")
    inputs = page.locator("[data-section=inputs]")
    await expect(inputs).to_be_visible()
    thumb = inputs.locator("img")
    await expect(thumb).to_have_count(1)
    status = await job_status(client, "with-input")
    await expect(thumb).to_have_attribute("src", status["inputs"][0]["url"])
    await expect(inputs.locator(".caption")).to_contain_text("photo.png · 7.7 KiB · image/png")
    await page.wait_for_function(
        "() => [...document.querySelectorAll('[data-section] img')]"
        ".every(i => i.complete && i.naturalWidth > 0)", timeout=WAIT_MS)
    await expect(page.locator("[data-section=outputs] img")).to_have_count(1)
    # Side by side on a wide window.
    boxes = [await page.locator(f"[data-section={name}]").bounding_box()
             for name in ("inputs", "outputs")]
    assert boxes[0]["y"] == boxes[1]["y"] and boxes[0]["x"] < boxes[1]["x"]
    await shot(page, tmp_path, "job-with-input")
    assert_clean(page)
    # A job without inputs has no such section.
    await put_job(client, "no-input", workflows.quick())
    await wait_state(client, "no-input", "completed", timeout=10)
    page = await open_page(browser, client, "/dashboard/job/no-input")
    await expect(page.locator("[data-section=inputs]")).to_be_hidden()
