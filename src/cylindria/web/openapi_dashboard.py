"""The contract's part for the dashboard: its pages, their live-update feeds, the sign-in
form and the assets."""

from __future__ import annotations

from typing import Any

from .openapi_parts import HTML, JOB_ID, JSON, RETRY_AFTER, Shape, answer, ref

# The failures page is read by people, who type or follow its links: a filter it does
# not understand is left out (the answer's `filter` says what was applied), not refused.
FAILURE_FILTERS = [
    {"name": "state", "in": "query", "required": False,
     "description": "failed, rejected, cancelled, or several separated by commas; other "
                    "words are left out, and none means all three.",
     "schema": {"type": "string"}},
    {"name": "gpu", "in": "query", "required": False,
     "description": "A GPU number; anything else (or a GPU this server lacks) shows every "
                    "GPU.", "schema": {"type": "string"}},
    {"name": "before", "in": "query", "required": False,
     "description": "The page's cursor (`older_url` carries it); anything but a positive "
                    "whole number shows the newest page.", "schema": {"type": "string"}}]


def paths(shape: Shape) -> dict[str, Any]:
    operation, tags, keyed = shape.operation, ("dashboard",), shape.keyed
    page = shape.page()
    form = {"type": "object", "properties": {
        "key": {"type": "string", "description": "The server's API key."},
        "next": {"type": "string", "description": "Where to go once signed in: a path "
                                                  "on this server (else the dashboard)."}}}
    if keyed:
        form["required"] = ["key"]
        form["properties"]["key"]["minLength"] = 1
        signin_answers = {
            "303": {"description": "Signed in: to `next`, or the dashboard."},
            "400": {"description": "No key entered (the form again, saying so), or a body "
                                   "that is no form (JSON).",
                    "content": {**HTML, JSON: {"schema": ref("Error")}}},
            "401": {"description": "A wrong key: the form again.", "content": HTML},
            "429": {"description": "Too many wrong keys from this address: the form "
                                   "again, saying how long to wait.", "content": HTML,
                    "headers": RETRY_AFTER}}
    else:
        signin_answers = {
            "303": {"description": "No key to sign in with on this server: to `next`, or "
                                   "the dashboard."},
            "400": answer("A body that is no form.")}
    return {
        "/": {"get": operation("The dashboard.", page, tags=tags)},
        "/dashboard/state": {"get": operation(
            "The dashboard's data.", {"200": answer("GPUs and recent jobs.",
                                                    {"type": "object"})},
            tags=tags)},
        "/dashboard/failures": {"get": operation(
            "Failed, rejected and cancelled jobs, with counts for the last hour.", page,
            parameters=FAILURE_FILTERS, tags=tags)},
        "/dashboard/failures/state": {"get": operation(
            "The failures page's data.",
            {"200": answer("A page of failures, and the filter applied.",
                           {"type": "object"})},
            parameters=FAILURE_FILTERS, tags=tags)},
        "/dashboard/job/{job_id}": {"get": operation(
            "A job's page.", {**page, "404": {"description": "No such job: a page saying "
                                                         "so.", "content": HTML}},
            parameters=[JOB_ID], tags=tags)},
        "/dashboard/job/{job_id}/state": {"get": operation(
            "A job page's data.", {"200": answer("The job.", {"type": "object"}),
                                   "404": answer("No such job (`job_not_found`).")},
            parameters=[JOB_ID], tags=tags)},
        "/dashboard/login": {
            "get": operation(
                "The sign-in form.",
                {"200": page["200"],
                 "303": {"description": "Signed in already, or no key on this server: to "
                                        "`next`, or the dashboard."}},
                parameters=[{"name": "next", "in": "query", "required": False,
                             "schema": {"type": "string"}}],
                secured=False, tags=tags),
            "post": operation("Sign in with the API key.", signin_answers,
                              body={"required": keyed, "content": {
                                  "application/x-www-form-urlencoded": {"schema": form}}},
                              secured=False, tags=tags)},
        "/dashboard/logout": {"post": operation(
            "Sign out.", {"303": {"description": "To the sign-in form."}}, tags=tags)},
        "/dashboard/static/{filename}": {"get": operation(
            "The dashboard's assets.", {"200": {"description": "A file."},
                                        "404": {"description": "No such file."}},
            parameters=[{"name": "filename", "in": "path", "required": True,
                         "schema": {"type": "string"}}], secured=False, tags=tags)},
    }
