"""The contract: valid OpenAPI, every route of the router in it (and nothing more), and
what it says following the settings: the key's security, the GPUs, the numbers."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from cylindria.app import create_app
from cylindria.appkeys import SETTINGS, WEBHOOKS
from cylindria.config import Settings
from cylindria.core.inputs import MAX_NAME, check_name
from cylindria.core.numbers import canonical_int
from cylindria.errors import BadRequest, InputInvalid
from cylindria.web import params
from cylindria.web.api import MAX_PAGE
from cylindria.web.auth import ACCESS_ATTRIBUTE, Access
from cylindria.web.openapi import document, document_30

METHODS = {"get", "put", "post", "delete", "patch"}
OPEN = Settings(state_file=None)
KEYED = Settings(state_file=None, api_key="k3y", num_gpus=3)
KEYED_PUBLIC_METRICS = Settings(state_file=None, api_key="k3y", metrics_public=True)
EVERY = pytest.mark.parametrize("settings", [OPEN, KEYED, KEYED_PUBLIC_METRICS],
                                ids=["open", "keyed", "keyed-public-metrics"])


def routed(app: web.Application) -> dict[tuple[str, str], Access]:
    """(path, method) of every route, and what opens it besides the key; HEAD comes with
    GET, static folders take a file."""
    found = {}
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical
        access = getattr(route.handler, ACCESS_ATTRIBUTE, Access.KEY)
        if isinstance(route.resource, web.StaticResource):
            path += "/{filename}"
            access = Access.OPEN
        found[path, route.method.lower()] = access
    return found


def operations(doc):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def documented(doc) -> set[tuple[str, str]]:
    return {(path, method) for path, method, _ in operations(doc)}


def parameter(doc, path: str, method: str, name: str):
    op = doc["paths"][path][method]
    return next(p for p in op["parameters"] if p["name"] == name)


def accepts(doc, path: str, method: str, name: str, value: str) -> bool:
    return re.search(parameter(doc, path, method, name)["schema"]["pattern"], value) is not None


@EVERY
def test_the_document_is_valid_openapi(settings):
    validate(document(settings))
    validate(document_30(settings))


@EVERY
def test_every_route_is_in_the_document_and_nothing_else(settings):
    app = create_app(settings)
    doc = document(settings)
    assert set(routed(app)) - documented(doc) == set(), "routes missing from the document"
    assert documented(doc) - set(routed(app)) == set(), "documented routes that do not exist"


@EVERY
def test_every_error_answer_has_the_error_shape(settings):
    for path, method, op in operations(document(settings)):
        if path == "/readyz":
            continue  # its 503 is a readiness report, not an error
        for status, answer in op["responses"].items():
            schema = answer.get("content", {}).get("application/json", {}).get("schema")
            if status.startswith(("4", "5")) and schema is not None:
                assert schema["$ref"].endswith(("/Error", "/StartRefusal", "/FinishedJob")), \
                    (path, method, status)


def test_without_a_key_the_document_asks_for_none():
    doc = document(OPEN)
    assert "security" not in doc
    assert "securitySchemes" not in doc["components"]
    for path, method, op in operations(doc):
        assert "security" not in op, (path, method)
        assert "401" not in op["responses"], (path, method)
        assert "429" not in op["responses"] or path in (
            "/events/", "/jobstatus/{job_id}/", "/startjob/{job_id}/", "/retryjob/{job_id}/"
        ), (path, method)
        assert "Not signed in" not in op["responses"].get("303", {}).get("description", "")


@pytest.mark.parametrize("settings", [KEYED, KEYED_PUBLIC_METRICS],
                         ids=["keyed", "keyed-public-metrics"])
def test_with_a_key_the_document_secures_what_the_key_guards(settings):
    """Each route's security as its handler declares it: open routes say they need
    nothing, every other one takes the key (and may answer 401)."""
    doc = document(settings)
    assert doc["security"] == [{"apiKey": []}, {"bearer": []}]
    assert doc["components"]["securitySchemes"]["apiKey"]["name"] == "X-API-Key"
    for (path, method), access in routed(create_app(settings)).items():
        op = doc["paths"][path][method]
        needs_nothing = access is Access.OPEN or (access is Access.METRICS
                                                  and settings.metrics_public)
        if needs_nothing:
            assert op.get("security") == [], (path, method)
        else:
            assert "security" not in op and "401" in op["responses"], (path, method)


def test_gpu_numbers_are_the_gpus_the_server_has():
    doc = document(KEYED)  # three GPUs
    for path, method, name, auto in (("/serverstatus", "get", "GpuId", False),
                                     ("/startjob/{job_id}/", "put", "GpuId", True),
                                     ("/retryjob/{job_id}/", "post", "GpuId", True),
                                     ("/gpus/{gpu_id}/drain", "post", "gpu_id", False),
                                     ("/jobs/", "get", "gpu", False)):
        for value in ("0", "1", "2"):
            assert accepts(doc, path, method, name, value), (path, value)
        for value in ("3", "01", "-1", "2720096525", " 1", "١"):
            assert not accepts(doc, path, method, name, value), (path, value)
        assert accepts(doc, path, method, name, "auto") is auto, path
    assert accepts(doc, "/jobs/", "get", "gpu", "")  # no filter
    assert not accepts(document(OPEN), "/serverstatus", "get", "GpuId", "1")


def test_numbers_are_written_as_the_server_reads_them():
    """Each pattern takes exactly the values its reader takes (an empty query value
    being no value at all)."""
    doc = document(OPEN)
    samples = ["", "0", "1", "07", "+1", "-0", "-1", "-7", "1.0", " 1", "1e3", "١",
               *map(str, range(-1100, 1100, 7)), "499", "500", "501", "1000", "1001",
               "-1000", "-1001", "9" * 18, "9" * 19, "59", "60", "61", "0.5"]

    def reads(reader, value: str) -> bool:
        try:
            reader(value)
        except BadRequest:
            return False
        return True

    readers = {
        ("/jobs/", "get", "limit"): lambda v: params.whole_number({"limit": v}, "limit", 1,
                                                                   MAX_PAGE),
        ("/jobs/", "get", "before"): lambda v: params.whole_number({"before": v}, "before",
                                                                   1, None),
        ("/startjob/{job_id}/", "put", "priority"): lambda v: params.priority({"priority": v}),
        ("/events/", "get", "last_event_id"): lambda v: v == "" or _number(v),
        ("/joboutput/{job_id}/{index}", "get", "index"): _number,
        **{(path, method, "wait"): lambda v: params.wait({"wait": v}, OPEN.max_wait)
           for path, method in (("/jobstatus/{job_id}/", "get"), ("/startjob/{job_id}/", "put"),
                                ("/retryjob/{job_id}/", "post"))},
    }
    for (path, method, name), reader in readers.items():
        for value in samples:
            assert accepts(doc, path, method, name, value) is reads(reader, value), \
                (name, value)
    header = parameter(doc, "/events/", "get", "Last-Event-ID")["schema"]["pattern"]
    assert header == parameter(doc, "/events/", "get", "last_event_id")["schema"]["pattern"]


def _number(value: str) -> bool:
    if canonical_int(value) is None:
        raise BadRequest("not a number")
    return True


class AnyCallback:
    async def check(self, url: str) -> None:
        """Where the address policy would go: every address passes here."""


async def test_callback_urls_are_written_as_the_server_reads_them():
    """A URL the pattern takes is never a 400 (the address policy may still refuse it,
    422); one it does not take is a 400, or carries a user name the policy refuses."""
    pattern = re.compile(parameter(document(OPEN), "/startjob/{job_id}/", "put",
                                   "X-Callback-Url")["schema"]["pattern"])
    samples = ["", "http://a", "https://example.com:8443/hook?x=1#y", "HTTP://A.B/",
               "http://1.2.3.4/", "http://[::1]:9/", "http://[2001:db8::8a2e:370:7334]/",
               "http://[::ffff:1.2.3.4]/h", "http://a:65535", "http://a/@b",
               "ftp://a/", "http://", "//a/", "a", "http://[:]/", "http://[::1/",
               "http://[1::2::3]/", "http://user:pw@a/", "http://@a/"]
    for url in samples:
        request = SimpleNamespace(headers={"X-Callback-Url": url},
                                  app={WEBHOOKS: AnyCallback()})
        try:
            await params.callback_url(request)
            refused = "@" in url.split("/")[2] if url.count("/") >= 2 else False
        except BadRequest:
            refused = True
        assert (pattern.search(url) is not None) is not refused, url


def test_input_names_are_written_as_the_store_takes_them():
    schema = Draft202012Validator(
        parameter(document(OPEN), "/inputs/", "post", "name")["schema"])
    for name in ["a.png", "a b.png", "ü.png", "...", ".x", "cylindria", "a" * MAX_NAME,
                 "", ".", "..", "a/b", "a\\b", "x\x01", "x\x7f", "\x85x", "cylindria:x",
                 "a" * (MAX_NAME + 1)]:
        try:
            taken = name == "" or check_name(name) == name  # empty: no name given
        except InputInvalid:
            taken = False
        assert schema.is_valid(name) is taken, name


def test_the_sign_in_form_needs_a_key_only_where_there_is_one():
    def form(settings):
        body = document(settings)["paths"]["/dashboard/login"]["post"]["requestBody"]
        return body["content"]["application/x-www-form-urlencoded"]["schema"]

    assert form(KEYED)["required"] == ["key"]
    assert form(KEYED)["properties"]["key"]["minLength"] == 1
    assert "required" not in form(OPEN)


async def test_the_document_is_served_behind_the_key(start_cylindria):
    client = await start_cylindria(api_key="k3y")
    assert (await client.get("/openapi.json")).status == 401
    resp = await client.get("/openapi.json", headers={"X-API-Key": "k3y"})
    assert resp.status == 200 and await resp.json() == document(client.app[SETTINGS])
    resp = await client.get("/docs/openapi-3.0.json", headers={"X-API-Key": "k3y"})
    assert resp.status == 200 and await resp.json() == document_30(client.app[SETTINGS])
    assert (await client.get("/docs", allow_redirects=False)).status == 303
    resp = await client.get("/docs", headers={"X-API-Key": "k3y"})
    assert resp.status == 200 and "swagger-ui" in await resp.text()


async def test_a_server_without_a_key_serves_a_document_without_one(start_cylindria):
    client = await start_cylindria()
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc == document(client.app[SETTINGS]) and "security" not in doc
