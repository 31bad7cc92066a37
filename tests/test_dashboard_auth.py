"""Dashboard sign-in, sessions and rendering, over HTTP without a browser."""

from __future__ import annotations

import re

import pytest
import ujson

from cylindria.appkeys import REGISTRY
from cylindria.dashboard.present import format_duration, output_view
from cylindria.web.signins import COOKIE as SESSION_COOKIE
from cylindria.web.signins import Signins, safe_next

import workflows
from helpers import concrete, wait_until

KEY = "s3cret"


async def sign_in(client, key: str = KEY, next_: str = "") -> tuple[int, str | None, str]:
    """Posts the form; returns (status, session token or None, Location)."""
    resp = await client.post("/dashboard/login", data={"key": key, "next": next_},
                             allow_redirects=False)
    morsel = resp.cookies.get(SESSION_COOKIE)
    # Requests below choose their credentials explicitly.
    client.session.cookie_jar.clear()
    return resp.status, (morsel.value if morsel else None), resp.headers.get("Location", "")


def with_cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"{SESSION_COOKIE}={token}"}


# -- sessions ---------------------------------------------------------------------------

def test_sessions_are_random_expire_and_end(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("cylindria.web.signins.time.monotonic", lambda: clock[0])
    sessions = Signins(lifetime=60, limit=3)
    first, second = sessions.start(), sessions.start()
    assert first != second and len(first) >= 40
    assert sessions.valid(first) and sessions.valid(second)
    assert not sessions.valid(first[:-1] + ("A" if first[-1] != "A" else "B"))
    assert not sessions.valid("") and not sessions.valid(None)
    sessions.end(first)
    assert not sessions.valid(first) and sessions.valid(second)
    clock[0] += 61
    assert not sessions.valid(second)
    assert len(sessions) == 0


def test_sessions_are_bounded_oldest_first():
    sessions = Signins(limit=2)
    tokens = [sessions.start() for _ in range(3)]
    assert [sessions.valid(t) for t in tokens] == [False, True, True]


@pytest.mark.parametrize("target, expected", [
    ("/dashboard/job/a", "/dashboard/job/a"), ("/?x=1", "/?x=1"), ("//evil.example/", None),
    ("https://evil.example/", None), ("/\\evil.example", None), ("", None), (None, None),
    ("/a\r\nSet-Cookie: x=1", None),
])
def test_only_local_paths_are_followed_after_sign_in(target, expected):
    assert safe_next(target) == expected


# -- the sign-in form ---------------------------------------------------------------------

async def test_a_signed_out_browser_is_sent_to_the_form(start_cylindria):
    client = await start_cylindria(api_key=KEY)
    resp = await client.get("/dashboard/job/a?b=c", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/dashboard/login?next=/dashboard/job/a?b%3Dc"
    resp = await client.get("/dashboard/login", params={"next": "/dashboard/job/a?b=c"})
    assert resp.status == 200
    page = await resp.text()
    assert 'name="key"' in page and 'value="/dashboard/job/a?b=c"' in page
    assert "Sign out" not in page


async def test_the_feed_without_a_session_is_401_json(start_cylindria):
    client = await start_cylindria(api_key=KEY)
    for path in ("/dashboard/state", "/dashboard/job/x/state"):
        resp = await client.get(path, headers=with_cookie("forged-token"))
        assert resp.status == 401
        body = await resp.json()
        assert body["error"]["code"] == "unauthorized"
        assert "sign in" in body["error"]["message"]


async def test_a_wrong_key_says_so_and_sets_no_cookie(start_cylindria):
    client = await start_cylindria(api_key=KEY)
    resp = await client.post("/dashboard/login", data={"key": "nope"}, allow_redirects=False)
    assert resp.status == 401
    assert "That key is wrong" in await resp.text()
    assert SESSION_COOKIE not in resp.cookies
    resp = await client.post("/dashboard/login", data={"key": ""}, allow_redirects=False)
    assert resp.status == 400
    assert "Enter the key" in await resp.text()


async def test_the_right_key_gives_a_strict_httponly_session(start_cylindria):
    client = await start_cylindria(api_key=KEY)
    resp = await client.post("/dashboard/login",
                             data={"key": KEY, "next": "/dashboard/job/a"},
                             allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/dashboard/job/a"
    header = resp.headers["Set-Cookie"]
    assert header.startswith(f"{SESSION_COOKIE}=")
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"):
        assert attribute in header, header
    assert KEY not in header
    client.session.cookie_jar.clear()
    token = resp.cookies[SESSION_COOKIE].value
    resp = await client.get("/", headers=with_cookie(token))
    assert resp.status == 200
    assert "Sign out" in await resp.text()
    resp = await client.get("/dashboard/state", headers=with_cookie(token))
    assert resp.status == 200


async def test_sign_in_never_redirects_off_site(start_cylindria):
    client = await start_cylindria(api_key=KEY)
    status, _, location = await sign_in(client, next_="//evil.example/")
    assert status == 303 and location == "/"


async def test_the_session_cookie_never_opens_the_api(start_cylindria):
    """Every route of the app, with a valid session cookie and no key: only the
    dashboard's own routes (and job files it shows as images) answer."""
    client = await start_cylindria(api_key=KEY)
    _, token, _ = await sign_in(client)
    assert token
    dashboard = {"/", "/dashboard/state", "/dashboard/job/x", "/dashboard/job/x/state",
                 "/dashboard/login", "/dashboard/logout", "/docs", "/docs/openapi-3.0.json"}
    api_checked = 0
    for route in client.app.router.routes():
        info = route.resource.get_info()
        if "prefix" in info:
            continue  # static assets: open to everyone, see test_api
        path = concrete(info.get("path") or info.get("formatter"))
        if (path in dashboard or path.startswith("/joboutput/")
                or path in ("/healthz", "/readyz")):
            continue
        resp = await client.request(route.method, path, headers=with_cookie(token),
                                    allow_redirects=False)
        assert resp.status == 401, (route.method, path)
        api_checked += 1
    assert api_checked >= 8
    resp = await client.get("/jobstatus/x/", headers=with_cookie(token))
    assert "X-API-Key" in (await resp.json())["error"]["message"]


async def test_job_files_open_to_a_session_for_reading_only(start_cylindria):
    client = await start_cylindria(api_key=KEY)
    resp = await client.put("/startjob/pic/", data=ujson.dumps(workflows.quick()),
                            headers={"X-API-Key": KEY})
    assert resp.status == 202
    await wait_until(lambda: client.app[REGISTRY].get("pic").terminal, what="job to finish")
    _, token, _ = await sign_in(client)
    assert (await client.get("/joboutput/pic/0")).status == 401
    resp = await client.get("/joboutput/pic/0", headers=with_cookie(token))
    assert resp.status == 200 and resp.content_type == "image/png"
    resp = await client.post("/joboutput/pic/0", headers=with_cookie(token))
    assert resp.status in (401, 405)


async def test_sign_out_ends_the_session_on_the_server(start_cylindria):
    client = await start_cylindria(api_key=KEY)
    _, token, _ = await sign_in(client)
    resp = await client.post("/dashboard/logout", headers=with_cookie(token),
                             allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/dashboard/login"
    assert resp.cookies[SESSION_COOKIE]["max-age"] == "0"
    client.session.cookie_jar.clear()
    resp = await client.get("/dashboard/state", headers=with_cookie(token))
    assert resp.status == 401


async def test_the_api_key_header_also_opens_the_dashboard(start_cylindria):
    client = await start_cylindria(api_key=KEY)
    resp = await client.get("/dashboard/state", headers={"X-API-Key": KEY})
    assert resp.status == 200
    resp = await client.get("/dashboard/state", headers={"X-API-Key": "wrong"})
    assert resp.status == 401


async def test_without_a_key_there_is_nothing_to_sign_in_to(start_cylindria):
    client = await start_cylindria()
    resp = await client.get("/dashboard/login", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/"
    page = await (await client.get("/")).text()
    assert "Sign out" not in page


# -- pages and the feed -------------------------------------------------------------------

async def test_pages_forbid_inline_scripts_and_framing(start_cylindria):
    client = await start_cylindria()
    for path in ("/", "/dashboard/job/none"):
        resp = await client.get(path)
        policy = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        page = await resp.text()
        assert "<script>" not in page and " style=" not in page


async def test_assets_are_served_by_cylindria_itself(start_cylindria):
    client = await start_cylindria()
    page = await (await client.get("/")).text()
    assets = re.findall(r'(?:href|src)="(/[^"]+)"', page)
    assert any(a.startswith("/dashboard/static/dashboard.css") for a in assets)
    assert any(a.startswith("/dashboard/static/dashboard.js") for a in assets)
    for asset in assets:
        if asset.startswith("/dashboard/static/"):
            assert (await client.get(asset)).status == 200, asset
    assert "http://" not in re.sub(r"http://127\.0\.0\.1:\d+", "", page)
    assert "https://" not in page


async def test_the_state_feed_is_bounded_and_newest_first(start_cylindria, monkeypatch):
    monkeypatch.setattr("cylindria.dashboard.views.RECENT_JOBS", 5)
    client = await start_cylindria()
    registry = client.app[REGISTRY]
    for n in range(8):
        job = registry.begin(f"job-{n}", 0, f"prompt-{n}", "fp", ["1"])
        registry.reject(job, "test")
    resp = await client.get("/dashboard/state")
    assert resp.headers["Cache-Control"] == "no-store"
    state = await resp.json()
    assert [j["job_id"] for j in state["jobs"]] == [f"job-{n}" for n in (7, 6, 5, 4, 3)]
    assert state["jobs"][0]["url"] == "/dashboard/job/job-7"
    (gpu,) = state["gpus"]
    assert gpu["status"] == "ok" and gpu["listener_connected"] is True
    assert gpu["vram_total"] > gpu["vram_used"] > 0
    assert state["summary"] == "1 GPU · 0 in flight · 8 jobs known"


def test_output_views_caption_files_and_show_images_as_thumbnails():
    entries = [
        {"node_id": "9", "kind": "image", "filename": "a.png", "subfolder": "cyl",
         "type": "output", "url": "/joboutput/j/0"},
        {"node_id": "10", "kind": "video", "filename": "b.mp4", "subfolder": "",
         "type": "output", "url": "/joboutput/j/1"},
        {"node_id": "11", "kind": "file", "filename": "c.WEBP", "subfolder": "",
         "type": "temp", "url": "/joboutput/j/2"},
        {"node_id": "12", "kind": "text", "text": "hi"},
    ]
    views = [output_view(entry) for entry in entries]
    assert [(v["url"], v["thumbnail"]) for v in views] == [
        ("/joboutput/j/0", True), ("/joboutput/j/1", False), ("/joboutput/j/2", True),
        (None, False)]
    assert views[0]["caption"] == "node 9 · output · cyl/a.png"
    assert views[2]["caption"] == "node 11 · temp · c.WEBP"
    assert views[3]["text"] == "hi" and views[3]["caption"] == "node 12 · text"


async def test_job_page_shows_image_outputs_as_thumbnails(start_cylindria):
    client = await start_cylindria()
    registry = client.app[REGISTRY]
    job = registry.begin("shown", 0, "prompt-shown", "fp", ["9"])
    registry.confirm(job)
    registry.on_executed("prompt-shown", "9", {"images": [
        {"filename": "named.png", "subfolder": "", "type": "output"}]})
    registry.on_success("prompt-shown")
    page = await (await client.get("/dashboard/job/shown")).text()
    body = (await (await client.get("/jobstatus/shown/")).json())["outputs"]
    assert body[0]["url"] == "/joboutput/shown/0"
    assert '<img src="/joboutput/shown/0" alt="named.png"' in page


@pytest.mark.parametrize("seconds, label", [
    (None, "—"), (0.04, "0.0 s"), (4.26, "4.3 s"), (42.4, "42 s"), (65, "1 min 05 s"),
    (3725, "1 h 02 min"),
])
def test_durations_read_naturally(seconds, label):
    assert format_duration(seconds) == label
