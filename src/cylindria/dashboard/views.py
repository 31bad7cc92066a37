"""The dashboard's pages and live-update feeds, and its sign-in form."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from ..appkeys import CLUSTER, GPUS, JOBS, REGISTRY, SETTINGS, SIGNINS
from ..core.records import Job, isoformat
from ..errors import JobNotFound, TooManyAttempts
from ..jsonio import json_response
from ..web import auth, render, signins
from ..web.auth import Access, access
from . import present

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

RECENT_JOBS = 50
# How often the pages ask for fresh state; the probe behind it is cached for about as
# long (Timing.status_cache_seconds), so faster polling would show nothing new.
POLL_MILLISECONDS = 1000

# Every asset is served by Cylindria itself; no inline script or style is needed, so
# nothing injected into a page could run even if escaping were ever missed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


# How many of the jobs held for a GPU the overview lists, first in line first.
HELD_SHOWN = 20


async def dashboard_state(request: web.Request) -> dict[str, Any]:
    now = datetime.now(UTC)
    router = request.app.router
    registry = request.app[REGISTRY]
    gpus = request.app[GPUS]
    # Probes are cached and shared with /serverstatus, so a poll costs at most one
    # upstream call per GPU per cache period, and they run side by side.
    probes = await asyncio.gather(*(gpu.probe() for gpu in gpus))
    known = len(registry)
    jobs = request.app[JOBS]
    running = [registry.running_on(gpu.index) for gpu in gpus]
    recent = registry.page(limit=RECENT_JOBS)
    held = registry.held.ordered(HELD_SHOWN)
    # Every job is foreseen before any card or row is made of it, so a job on its GPU's
    # card and in a table reads one forecast, not this one and the last poll's.
    for job in (*running, *held, *recent):
        if job is not None:
            jobs.foresee(job)
    cards = [present.gpu_card(router, gpu, render.gpu_status(gpu, probe), job, now)
             for gpu, probe, job in zip(gpus, probes, running, strict=True)]
    node = node_name(request.app)
    state = {
        "generated_at": isoformat(now),
        "generated_label": now.strftime("%H:%M:%S UTC"),
        "summary": (f"{len(cards)} GPU{'s' if len(cards) != 1 else ''} · "
                    f"{registry.in_flight_count()} in flight · "
                    f"{known} job{'s' if known != 1 else ''} known"),
        "recent_limit": RECENT_JOBS,
        "gpus": cards,
        "jobs": [present.job_row(router, job, now, node) for job in recent],
        "held": [present.job_row(router, job, now, node) for job in held],
        "held_summary": (f"{len(registry.held)} waiting for a GPU, by priority then "
                         f"arrival" + (f"; the first {HELD_SHOWN} shown"
                                       if len(registry.held) > HELD_SHOWN else "")),
    }
    if node is not None:
        # Nodes sharing a database: this one's name, and the others with their GPUs.
        seen = time.monotonic()
        state["node"] = node
        state["nodes"] = [present.node_group(router, other, seen)
                          for other in request.app[CLUSTER].others]
    return state


def node_name(app: web.Application) -> str | None:
    """This node's name where nodes share a database (the node that ran its jobs), or
    None on one host, whose pages name no node."""
    cluster = app[CLUSTER]
    return cluster.node.name if cluster.enabled else None


async def find_job(request: web.Request) -> Job:
    # A plain lookup: ids that the API would refuse simply are not found.
    return await request.app[JOBS].find(request.match_info["job_id"])


def job_details(request: web.Request, job: Job) -> dict[str, Any]:
    return present.job_details(request.app.router, job, datetime.now(UTC),
                               node_name(request.app))


def page_context(request: web.Request, **values: Any) -> dict[str, Any]:
    """What every page's template reads. `csrf_token` is the sign-in's, which the
    page's buttons send back with their actions (empty without a sign-in: with the
    key in a header, or on a service without a key, none is needed)."""
    return {"keyed": bool(request.app[SETTINGS].api_key), "signout": True,
            "poll_ms": POLL_MILLISECONDS,
            "csrf_token": signins.csrf_token(request, request.app[SIGNINS]), **values}


def signin_url(request: web.Request) -> str:
    """The sign-in form, coming back to this page."""
    return str(request.app.router["dashboard_login"].url_for().with_query(
        next=request.path_qs))


def page(template: str, request: web.Request, context: dict[str, Any],
         status: int = 200) -> web.Response:
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def see_other(location: str) -> web.Response:
    # A plain response rather than a raised HTTPSeeOther, so it can carry cookies.
    return web.Response(status=303, headers={"Location": location, **SECURITY_HEADERS})


def feed(data: Any) -> web.Response:
    return json_response(data, headers={"Cache-Control": "no-store"})


def login_form(request: web.Request, target: str, message: str,
               status: int) -> web.Response:
    return page("login.html", request, page_context(request, next=target, message=message,
                                                    signout=False), status=status)


# -- handlers --------------------------------------------------------------------------

@routes.get("/", name="index")
@access(Access.PAGE)
async def get_index(request: web.Request) -> web.Response:
    state = await dashboard_state(request)
    return page("index.html", request, page_context(request, state=state))


@routes.get("/dashboard/state", name="dashboard_state")
@access(Access.FEED)
async def get_dashboard_state(request: web.Request) -> web.Response:
    return feed(await dashboard_state(request))


@routes.get("/dashboard/job/{job_id}", name="dashboard_job")
@access(Access.PAGE)
async def get_dashboard_job(request: web.Request) -> web.Response:
    try:
        job = await find_job(request)
    except JobNotFound:
        context = page_context(request, job=None, job_id=request.match_info["job_id"])
        return page("job.html", request, context, status=404)
    return page("job.html", request, page_context(request, job=job_details(request, job),
                                                  gpu_ids=range(len(request.app[GPUS]))))


@routes.get("/dashboard/job/{job_id}/state", name="dashboard_job_state")
@access(Access.FEED)
async def get_dashboard_job_state(request: web.Request) -> web.Response:
    return feed(job_details(request, await find_job(request)))


@routes.get("/dashboard/login", name="dashboard_login")
@access(Access.OPEN)
async def get_login(request: web.Request) -> web.Response:
    target = signins.safe_next(request.query.get("next"))
    if (not request.app[SETTINGS].api_key
            or signins.signed_in(request, request.app[SIGNINS])):
        return see_other(target or str(request.app.router["index"].url_for()))
    return login_form(request, target or "", "", 200)


@routes.post("/dashboard/login", name="dashboard_login")
@access(Access.OPEN)
async def post_login(request: web.Request) -> web.Response:
    api_key = request.app[SETTINGS].api_key
    throttle = request.app[SIGNINS].throttle
    address = auth.client_address(request)
    if api_key:
        # Before the body is read: an address held back costs no reading.
        try:
            auth.check_throttle(throttle, address, api=False)
        except TooManyAttempts as exc:
            response = login_form(request, "", exc.message, exc.status)
            response.headers.update(exc.headers or {})
            return response
    try:
        form = await signins.read_form(request)
    except (ConnectionError, asyncio.CancelledError):
        # The client went away mid-form: a guess whose answer it chose not to wait for.
        if api_key:
            throttle.fail(address, "dashboard sign-in cut short")
        raise
    target = signins.safe_next(form.get("next")) or str(
        request.app.router["index"].url_for())
    if not api_key:
        return see_other(target)
    given = form.get("key", "")
    if not auth.key_matches(given, api_key):
        # An empty key counts too: every answer to this form is one guess.
        throttle.fail(address, "dashboard sign-in")
        message = ("That key is wrong. Try again." if given
                   else "Enter the key this server was started with.")
        return login_form(request, target, message, 401)
    response = see_other(target)
    signins.sign_in(request, response, request.app[SIGNINS])
    log.info("dashboard sign-in from %s", address)
    return response


@routes.post("/dashboard/logout", name="dashboard_logout")
@access(Access.PAGE)
async def post_logout(request: web.Request) -> web.Response:
    """Sign out: with a sign-in, only from this service's own pages and with their CSRF
    token (the form sends it as a field), so no other site can sign the operator out."""
    sessions = request.app[SIGNINS]
    if request.app[SETTINGS].api_key and signins.signed_in(request, sessions):
        token = None
        # The origin first: a form from elsewhere is refused before it is read.
        if auth.same_origin(request) and auth.CSRF_HEADER not in request.headers:
            token = (await signins.read_form(request)).get("csrf_token")
        auth.check_action(request, sessions, token)
    response = see_other(str(request.app.router["dashboard_login"].url_for()))
    if request.app[SETTINGS].api_key:
        signins.sign_out(request, response, sessions)
    return response
