"""The contract: valid OpenAPI, and every route of the router in it (and nothing more)."""

from __future__ import annotations

from aiohttp import web
from openapi_spec_validator import validate

from cylindria.app import create_app
from cylindria.config import Settings
from cylindria.web.openapi import document, document_30

METHODS = {"get", "put", "post", "delete", "patch"}


def routed(app: web.Application) -> set[tuple[str, str]]:
    """(path, method) of every route; HEAD comes with GET, static folders take a file."""
    found = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical
        if isinstance(route.resource, web.StaticResource):
            path += "/{filename}"
        found.add((path, route.method.lower()))
    return found


def documented(doc) -> set[tuple[str, str]]:
    return {(path, method) for path, item in doc["paths"].items()
            for method in item if method in METHODS}


def test_the_document_is_valid_openapi():
    validate(document())
    validate(document_30())


def test_every_route_is_in_the_document_and_nothing_else():
    app = create_app(Settings(state_file=None))
    assert routed(app) - documented(document()) == set(), "routes missing from the document"
    assert documented(document()) - routed(app) == set(), "documented routes that do not exist"


def test_every_error_answer_has_the_error_shape():
    for path, item in document()["paths"].items():
        if path == "/readyz":
            continue  # its 503 is a readiness report, not an error
        for method, op in item.items():
            for status, answer in op["responses"].items():
                schema = answer.get("content", {}).get("application/json", {}).get("schema")
                if status.startswith(("4", "5")) and schema is not None:
                    assert schema["$ref"].endswith(("/Error", "/StartRefusal", "/FinishedJob")), \
                        (path, method, status)


async def test_the_document_is_served_behind_the_key(start_cylindria):
    client = await start_cylindria(api_key="k3y")
    assert (await client.get("/openapi.json")).status == 401
    resp = await client.get("/openapi.json", headers={"X-API-Key": "k3y"})
    assert resp.status == 200 and await resp.json() == document()
    assert (await client.get("/docs", allow_redirects=False)).status == 303
    resp = await client.get("/docs", headers={"X-API-Key": "k3y"})
    assert resp.status == 200 and "swagger-ui" in await resp.text()
