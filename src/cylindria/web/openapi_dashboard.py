"""The contract's part for the dashboard: its pages, their live-update feeds, the sign-in
form and the assets."""

from __future__ import annotations

from typing import Any

from .openapi_parts import HTML, JOB_ID, RETRY_AFTER, SESSION_REFUSED, Shape, answer
from .signins import FORM_LIMIT, FORM_TYPE, NEXT_LIMIT

# What the sign-in form's fields hold at most, so that any form the contract allows fits
# within FORM_LIMIT bytes however it is percent-encoded.
PRINTABLE_ASCII = "^[ -~]*$"
KEY_FIELD_LIMIT = 128

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
    too_large = answer(f"A form of more than {FORM_LIMIT} bytes (`payload_too_large`), "
                       "refused before it is read.")
    if keyed:
        # Bounds only where a form outside them is refused (as a wrong key); without a
        # key every form leads on, so none is stated.
        form["required"] = ["key"]
        form["additionalProperties"] = False
        form["properties"]["key"].update(minLength=1, maxLength=KEY_FIELD_LIMIT,
                                         pattern=PRINTABLE_ASCII)
        form["properties"]["next"].update(maxLength=NEXT_LIMIT, pattern=PRINTABLE_ASCII)
        signin_answers = {
            "303": {"description": "Signed in: to `next`, or the dashboard."},
            "400": answer(f"A body that is no form ({FORM_TYPE}), or one cut short."),
            "401": {"description": "A wrong key, or none: the form again. Each counts "
                                   "as a wrong key for this address.", "content": HTML},
            "413": too_large,
            "429": {"description": "Too many wrong keys from this address: the form "
                                   "again, saying how long to wait.", "content": HTML,
                    "headers": RETRY_AFTER}}
    else:
        signin_answers = {
            "303": {"description": "No key to sign in with on this server: to `next`, or "
                                   "the dashboard."},
            "400": answer("A body that is no form."),
            "413": too_large}
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
            "Sign out.", {"303": {"description": "To the sign-in form."},
                          **({"403": SESSION_REFUSED, "413": too_large} if keyed else {})},
            body={"required": False, "content": {FORM_TYPE: {"schema": {
                "type": "object", "properties": {"csrf_token": {
                    "type": "string", "description": "With a dashboard sign-in: the "
                    "page's token (or send it as X-CSRF-Token)."}}}}}},
            tags=tags)},
        "/dashboard/static/{filename}": {"get": operation(
            "The dashboard's assets.", {"200": {"description": "A file."},
                                        "404": {"description": "No such file."}},
            parameters=[{"name": "filename", "in": "path", "required": True,
                         "schema": {"type": "string"}}], secured=False, tags=tags)},
    }
