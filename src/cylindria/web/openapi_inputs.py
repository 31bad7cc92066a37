"""The contract's part for input files: the input store's routes, the multipart form of
PUT /startjob, and the JSON form's `inputs`."""

from __future__ import annotations

from typing import Any

from ..core.inputs import MAX_INPUTS, MAX_NAME, REF_PREFIX
from .openapi_parts import JSON, RETRY_AFTER, Shape, answer, ref

BINARY = {"type": "string", "format": "binary"}
INPUT_ID = {"name": "input_id", "in": "path", "required": True,
            "description": "sha256- and the 64 lowercase hex digits of the file's SHA-256.",
            "schema": {"type": "string", "pattern": "^sha256-[0-9a-f]{64}$"}}
# The name a client gives a file (core/inputs.check_name): one path segment of printable
# text that does not look like a stored input's reference.
NAME = {"type": "string", "maxLength": MAX_NAME,
        "pattern": "^[^/\\\\\\x00-\\x1f\\x7f-\\x9f]*$",
        "not": {"anyOf": [{"enum": [".", ".."]}, {"pattern": f"^{REF_PREFIX}"}]}}
# A file as the whole body: its Content-Type says what it is. Any type is taken but a
# form's (multipart/* is read as a form; a urlencoded form is no file): these are the usual.
RAW_MEDIA_TYPES = ("application/octet-stream", "image/*", "video/*", "audio/*")
RAW_FILE = {**BINARY, "description": "One file as the body, with its own Content-Type "
                                     "(any but a form's)."}
FILE_PART = {**BINARY, "description": "A file. Its part's filename is the file's name "
                                      "(a plain file name, unique within the form); the "
                                      "part's own name does not matter, so a form may hold "
                                      "several files."}


def schemas() -> dict[str, Any]:
    return {
        "StoredInput": {
            "type": "object", "required": ["id", "size", "media_type", "name", "url", "ref"],
            "properties": {
                "id": {"type": "string", "pattern": "^sha256-[0-9a-f]{64}$"},
                "size": {"type": "integer", "minimum": 0},
                "media_type": {"type": "string"},
                "name": {"type": "string", "description": "The name the client gave."},
                "url": {"type": "string", "description": "Reads the file back."},
                "ref": {"type": "string", "description": "Put this string as a loader "
                        "node's input (LoadImage's `image`, LoadVideo's `file`...)."}}},
        "StoredInputs": {
            "type": "object", "required": ["inputs"],
            "properties": {"inputs": {"type": "array", "items": ref("StoredInput")}}},
        "JobInput": {
            "type": "object", "required": ["id", "name", "size", "media_type", "url"],
            "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                           "size": {"type": "integer"}, "media_type": {"type": "string"},
                           "url": {"type": "string"}}},
        "InlineInput": {
            "oneOf": [
                {"type": "object", "required": ["base64"], "additionalProperties": False,
                 "properties": {"base64": {"type": "string", "description":
                                           "The file's bytes in standard base64 (a "
                                           "`data:` URL's prefix is taken too)."}}},
                {"type": "object", "required": ["url"], "additionalProperties": False,
                 "properties": {"url": {"type": "string", "description":
                                        "An http(s) URL Cylindria fetches, under the "
                                        "webhooks' address policy."}}}]},
        "WorkflowWithInputs": {
            "type": "object", "required": ["prompt"],
            "description": "ComfyUI's envelope, with files: a string input of any node "
                           "equal to a key of `inputs` stands for that file.",
            "properties": {"prompt": ref("Workflow"),
                           "extra_data": {"type": ["object", "null"]},
                           "inputs": {"type": "object", "maxProperties": MAX_INPUTS,
                                      "description": "Each key a plain file name (as the "
                                                     "`name` of POST /inputs/).",
                                      "additionalProperties": ref("InlineInput")}}},
    }


def multipart_job() -> dict[str, Any]:
    """PUT /startjob's multipart/form-data body."""
    return {"schema": {
        "type": "object", "required": ["workflow"], "additionalProperties": False,
        "description": "A `workflow` part, and one part per file: a string input of any "
                       "node equal to a file part's filename stands for that file.",
        "properties": {"workflow": {"anyOf": [ref("Workflow"), ref("WorkflowWithInputs")],
                                    "description": "The JSON the JSON form of this route "
                                                   "takes."},
                       "file": FILE_PART}},
        "encoding": {"workflow": {"contentType": JSON}}}


def paths(shape: Shape) -> dict[str, Any]:
    operation, tags = shape.operation, ("inputs",)
    stored = answer("The files, each with the `ref` to use in a workflow.", "StoredInputs")
    # With nodes sharing PostgreSQL, the files are kept in the database too.
    database = {"503": answer("The database that keeps input files for every node cannot "
                              "be reached (`state_unavailable`).", headers=RETRY_AFTER)
                } if shape.clustered else {}
    return {
        "/inputs/": {"post": operation(
            "Store input files (images, masks, video, audio) for workflows.",
            {"201": stored,
             "200": answer("Every file was stored already (identical bytes are kept "
                           "once).", "StoredInputs"),
             "400": answer("A form without files, a part without a filename, two files "
                           "of one name, or a body cut short."),
             "408": answer("The body came too slowly or stopped (`body_timeout`)."),
             "413": answer("A file over CYLINDRIA_INPUT_MAX (`payload_too_large`)."),
             "415": answer("No Content-Type, or one that is no file "
                           "(`unsupported_media_type`)."),
             "422": answer("A name that is no plain file name (`invalid_input`)."),
             "507": answer("The store is full of inputs that jobs in flight use "
                           "(`input_store_full`).", headers=RETRY_AFTER), **database},
            parameters=[{"name": "name", "in": "query", "required": False,
                         "description": f"The file's name, for a raw body (else its "
                                        f"Content-Disposition filename, else `upload`): "
                                        f"up to {MAX_NAME} characters, no '/', '\\', "
                                        f"control characters, '.' or '..', not starting "
                                        f"with `{REF_PREFIX}`. A form's files are named "
                                        "by their filenames.",
                         "schema": NAME}],
            body={"required": True, "content": {
                "multipart/form-data": {"schema": {
                    "type": "object", "required": ["file"], "additionalProperties": False,
                    "properties": {"file": FILE_PART}}},
                **{media: {"schema": RAW_FILE} for media in RAW_MEDIA_TYPES}}},
            tags=tags)},
        "/inputs/{input_id}": {
            "get": operation(
                "Read a stored input back.",
                {"200": {"description": "The file, as uploaded.",
                         "content": {"*/*": {"schema": BINARY}}},
                 "404": answer("No such input (`input_not_found`)."), **database},
                parameters=[INPUT_ID], tags=tags),
            "delete": operation(
                "Delete a stored input.",
                {"204": {"description": "Deleted."},
                 "404": answer("No such input (`input_not_found`)."),
                 "409": answer("A job in flight uses it (`input_in_use`), on any node "
                               "sharing the database."), **database},
                parameters=[INPUT_ID], tags=tags)},
    }


ERROR_CODES = ["unsupported_media_type", "body_timeout", "invalid_input", "unknown_input",
               "input_unavailable", "input_not_found", "input_in_use", "input_gone",
               "input_store_full"]
