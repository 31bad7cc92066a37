"""Dashboard sign-in, sessions and rendering, over HTTP without a browser."""

from __future__ import annotations

import re

import pytest
import ujson

from cylindria.appkeys import GPUS, REGISTRY, SIGNINS
from cylindria.dashboard.present import format_duration, output_view, queue_label
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


# The API routes the dashboard's buttons call, with their placeholders filled in.
ACTION_PATHS = ("/canceljob/x/", "/retryjob/x/", "/gpus/x/drain", "/gpus/x/undrain")


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
    # An empty key is a wrong one: it is counted like any other.
    resp = await client.post("/dashboard/login", data={"key": ""}, allow_redirects=False)
    assert resp.status == 401
    assert "Enter the key" in await resp.text()
    assert client.app[SIGNINS].throttle.failures("127.0.0.1") == 2


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
    dashboard's own routes (and job files it shows as images) answer; the routes its
    buttons call refuse a cookie that comes without the page's origin and token."""
    client = await start_cylindria(api_key=KEY)
    _, token, _ = await sign_in(client)
    assert token
    dashboard = {"/", "/dashboard/state", "/dashboard/job/x", "/dashboard/job/x/state",
                 "/dashboard/failures", "/dashboard/failures/state",
                 "/dashboard/login", "/dashboard/logout", "/docs", "/docs/openapi-3.0.json"}
    actions = {("POST", path) for path in ACTION_PATHS}
    api_checked = 0
    for route in client.app.router.routes():
        info = route.resource.get_info()
        if "prefix" in info:
            continue  # static assets: open to everyone, see test_api
        path = concrete(info.get("path") or info.get("formatter"))
        if (path in dashboard or path.startswith("/joboutput/")
                or (path.startswith("/inputs/x") and route.method in ("GET", "HEAD"))
                or path in ("/healthz", "/readyz")):
            continue
        resp = await client.request(route.method, path, headers=with_cookie(token),
                                    allow_redirects=False)
        if (route.method, path) in actions:
            assert resp.status == 403, (route.method, path)
            assert (await resp.json())["error"]["code"] == "origin_refused"
            actions.discard((route.method, path))
        else:
            assert resp.status == 401, (route.method, path)
        api_checked += 1
    assert api_checked >= 8
    assert actions == set(), "action routes not found"
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
    # A job's input files too (its page shows them): read, never changed.
    resp = await client.post("/inputs/", params={"name": "in.png"}, data=b"\x89PNG",
                             headers={"X-API-Key": KEY, "Content-Type": "image/png"})
    url = (await resp.json())["inputs"][0]["url"]
    assert (await client.get(url)).status == 401
    resp = await client.get(url, headers=with_cookie(token))
    assert resp.status == 200 and await resp.read() == b"\x89PNG"
    assert (await client.delete(url, headers=with_cookie(token))).status == 401
    resp = await client.post("/inputs/", params={"name": "b.png"}, data=b"b",
                             headers={**with_cookie(token), "Content-Type": "image/png"})
    assert resp.status == 401


async def sign_out(client, token: str, origin: str | None = None,
                   csrf: str | None = None):
    """Posts the page's sign-out form (from `origin`, with `csrf` as its hidden field)."""
    headers = {**with_cookie(token), **({"Origin": origin} if origin else {})}
    data = {"csrf_token": csrf} if csrf is not None else None
    return await client.post("/dashboard/logout", headers=headers, data=data,
                             allow_redirects=False)


async def test_sign_out_ends_the_session_on_the_server(start_cylindria):
    client = await start_cylindria(api_key=KEY)
    _, token, _ = await sign_in(client)
    page = await (await client.get("/", headers=with_cookie(token))).text()
    found = re.search(r'<input type="hidden" name="csrf_token" value="([^"]+)">', page)
    assert found, "the sign-out form carries no CSRF token"
    resp = await sign_out(client, token, origin_of(client), found.group(1))
    assert resp.status == 303 and resp.headers["Location"] == "/dashboard/login"
    assert resp.cookies[SESSION_COOKIE]["max-age"] == "0"
    client.session.cookie_jar.clear()
    resp = await client.get("/dashboard/state", headers=with_cookie(token))
    assert resp.status == 401


async def test_sign_out_from_another_site_or_without_the_token_is_refused(
        start_cylindria):
    client = await start_cylindria(api_key=KEY)
    _, token, _ = await sign_in(client)
    assert token
    csrf = await csrf_of(client, token)
    own = origin_of(client)
    refusals = [("http://evil.example", csrf, "origin_refused"),
                ("http://127.0.0.1:1", csrf, "origin_refused"),
                (None, csrf, "origin_refused"),
                (own, None, "csrf_token_invalid"),
                (own, ("y" if csrf[0] == "x" else "x") + csrf[1:], "csrf_token_invalid")]
    for origin, given, code in refusals:
        resp = await sign_out(client, token, origin, given)
        assert resp.status == 403, (origin, given)
        assert (await resp.json())["error"]["code"] == code
        assert SESSION_COOKIE not in resp.cookies
    # Still signed in; the header does as the form field does.
    assert (await client.get("/dashboard/state", headers=with_cookie(token))).status == 200
    resp = await client.post("/dashboard/logout", allow_redirects=False, headers={
        **with_cookie(token), "Origin": own, "X-CSRF-Token": csrf})
    assert resp.status == 303
    client.session.cookie_jar.clear()
    assert (await client.get("/dashboard/state", headers=with_cookie(token))).status == 401


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


@pytest.mark.parametrize("remaining, label", [
    (None, "unknown"), (0, "empty"), (1, "running 1 + waiting 0"),
    (5, "running 1 + waiting 4"),
])
def test_a_gpu_queue_reads_as_running_plus_waiting(remaining, label):
    assert queue_label(remaining) == label


# -- actions with a sign-in: the API's routes behind the dashboard's buttons --------------

def origin_of(client) -> str:
    return str(client.make_url("/").origin())


async def act(client, path: str, token: str | None, **headers: str):
    """POST to an action route with a sign-in cookie (if any) and these headers."""
    sent = {**(with_cookie(token) if token else {}), **headers}
    resp = await client.post(path, headers=sent, allow_redirects=False)
    return resp.status, await resp.json()


async def csrf_of(client, token: str) -> str:
    page = await (await client.get("/", headers=with_cookie(token))).text()
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert found, "the page carries no CSRF token"
    return found.group(1)


async def test_a_signed_in_page_carries_its_own_csrf_token(start_cylindria):
    client = await start_cylindria(api_key=KEY)
    _, first, _ = await sign_in(client)
    _, second, _ = await sign_in(client)
    assert first and second
    token = await csrf_of(client, first)
    assert token == await csrf_of(client, first)
    assert token != await csrf_of(client, second)
    assert first not in token and len(token) >= 40
    # Every page of the dashboard has it; a page opened with the key needs none.
    for path in ("/dashboard/failures", "/dashboard/job/none"):
        page = await (await client.get(path, headers=with_cookie(first))).text()
        assert f'<meta name="csrf-token" content="{token}">' in page, path
    page = await (await client.get("/", headers={"X-API-Key": KEY})).text()
    assert 'name="csrf-token"' not in page


async def test_a_session_acts_only_from_its_own_pages_with_its_token(start_cylindria):
    client = await start_cylindria(api_key=KEY)
    _, session, _ = await sign_in(client)
    _, other, _ = await sign_in(client)
    assert session and other
    csrf = await csrf_of(client, session)
    own = origin_of(client)
    refusals = [
        ({"Origin": own}, "csrf_token_invalid"),
        ({"Origin": own, "X-CSRF-Token": ("y" if csrf[0] == "x" else "x") + csrf[1:]},
         "csrf_token_invalid"),
        ({"Origin": own, "X-CSRF-Token": await csrf_of(client, other)},
         "csrf_token_invalid"),
        ({"Origin": "http://127.0.0.1:1", "X-CSRF-Token": csrf}, "origin_refused"),
        ({"Origin": "http://evil.example", "X-CSRF-Token": csrf}, "origin_refused"),
        ({"Origin": "null", "X-CSRF-Token": csrf}, "origin_refused"),
        ({"X-CSRF-Token": csrf}, "origin_refused"),
        ({"Referer": "http://evil.example/page", "X-CSRF-Token": csrf}, "origin_refused"),
    ]
    for headers, code in refusals:
        status, body = await act(client, "/gpus/0/drain", session, **headers)
        assert (status, body.get("error", {}).get("code")) == (403, code), headers
        message = body["error"]["message"]
        assert "X-API-Key" in message, message
        if code == "csrf_token_invalid":
            assert "X-CSRF-Token" in message and "Reload" in message
    assert client.app[GPUS][0].drained is False

    status, body = await act(client, "/gpus/0/drain", session, Origin=own,
                             **{"X-CSRF-Token": csrf})
    assert status == 200 and body["drained"] is True
    # Without an Origin header, a Referer from this service's pages does.
    status, body = await act(client, "/gpus/0/undrain", session,
                             Referer=f"{own}/dashboard/job/x", **{"X-CSRF-Token": csrf})
    assert status == 200 and body["drained"] is False
    # Past the check, the API answers as it does to the key.
    for path, code in (("/canceljob/ghost/", "job_not_found"),
                       ("/retryjob/ghost/", "job_not_found")):
        status, body = await act(client, path, session, Origin=own,
                                 **{"X-CSRF-Token": csrf})
        assert (status, body["error"]["code"]) == (404, code), path


async def test_cancel_and_retry_take_a_session_with_its_token(start_cylindria, start_sims):
    cluster = await start_sims(1)
    client = await start_cylindria(cluster, api_key=KEY)
    resp = await client.put("/startjob/bad/", data=ujson.dumps(workflows.fails_at_runtime()),
                            headers={"X-API-Key": KEY})
    assert resp.status == 202
    await wait_until(lambda: client.app[REGISTRY].get("bad").terminal, what="job to fail")
    _, session, _ = await sign_in(client)
    proof = {"Origin": origin_of(client), "X-CSRF-Token": await csrf_of(client, session)}
    status, body = await act(client, "/retryjob/bad/", session)
    assert status == 403
    # The new attempt waits in ComfyUI's queue, so there is something to cancel.
    cluster.sims[0].pause(at="dequeue")
    status, body = await act(client, "/retryjob/bad/", session, **proof)
    assert status == 202 and body["attempt"] == 2 and body["state"] == "queued"
    status, body = await act(client, "/canceljob/bad/", session)
    assert status == 403
    status, body = await act(client, "/canceljob/bad/", session, **proof)
    assert status == 202 and body["state"] == "cancelled"
    cluster.sims[0].resume()


async def test_the_api_key_needs_neither_origin_nor_token(start_cylindria):
    client = await start_cylindria(api_key=KEY)
    for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        status, body = await act(client, "/gpus/0/drain", None,
                                 Origin="http://evil.example", **headers)
        assert status == 200 and body["drained"] is True
    status, body = await act(client, "/gpus/0/undrain", None, **{"X-API-Key": "wrong"})
    assert status == 401


async def test_a_session_that_ended_cannot_act(start_cylindria):
    client = await start_cylindria(api_key=KEY)
    _, session, _ = await sign_in(client)
    proof = {"Origin": origin_of(client), "X-CSRF-Token": await csrf_of(client, session)}
    resp = await client.post("/dashboard/logout", headers={**with_cookie(session), **proof},
                             allow_redirects=False)
    assert resp.status == 303
    client.session.cookie_jar.clear()
    status, body = await act(client, "/gpus/0/drain", session, **proof)
    assert status == 401 and "sign in to the dashboard again" in body["error"]["message"]
    # A token alone, without the sign-in it belongs to, opens nothing either.
    status, _ = await act(client, "/gpus/0/drain", None, **proof)
    assert status == 401
    assert client.app[GPUS][0].drained is False


async def test_without_a_key_the_buttons_need_no_token(start_cylindria):
    """An open service (no CYLINDRIA_API_KEY, loopback only by default) takes the API's
    POSTs from anyone who reaches it: the dashboard's buttons add nothing to check."""
    client = await start_cylindria()
    page = await (await client.get("/")).text()
    assert 'name="csrf-token"' not in page
    assert 'data-action="drain" data-url="/gpus/0/drain"' in page
    status, body = await act(client, "/gpus/0/drain", None)
    assert status == 200 and body["drained"] is True
