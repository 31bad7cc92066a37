"""Reading files out of requests: a raw body or a multipart form, streamed into the input
store chunk by chunk, with clear 4xx answers for what cannot be taken."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import parse_content_disposition
from aiohttp.web_protocol import RequestPayloadError

from ..core.inputs import MAX_INPUTS, check_name
from ..errors import BadRequest, BodyTimeout, BodyTooLarge, UnsupportedMediaType
from ..store.inputs import InputStore, StoredInput, media_type_for, too_large
from .params import MAX_BODY_BYTES

CHUNK = 256 * 1024
NOT_FILES = ("multipart/", "application/x-www-form-urlencoded")


@dataclass(slots=True)
class Received:
    """What one request brought: files (by the name the client gave), each new or
    not, and for a job, its workflow part."""

    files: dict[str, StoredInput] = field(default_factory=dict)
    created: list[bool] = field(default_factory=list)
    workflow: list[bytes] | None = None


def is_multipart(request: web.Request) -> bool:
    return request.content_type.startswith("multipart/")


async def files(request: web.Request, store: InputStore, limit: int,
                idle: float) -> Received:
    """POST /inputs/: one file as the raw body (its Content-Type says what it is), or a
    multipart/form-data form of one or more files."""
    given = request.query.get("name")
    if given:
        # Checked whatever the body: a form's files take their filenames instead, but a
        # bad name is never passed over in silence.
        check_name(given, "The file's name (?name=)")
    if is_multipart(request):
        return await _form(request, store, limit, idle, workflow=False)
    declared = request.content_type
    if hdrs.CONTENT_TYPE not in request.headers or declared.startswith(NOT_FILES):
        raise UnsupportedMediaType(
            "Send the file as the body with its own Content-Type (for example image/png), "
            "or several as multipart/form-data; got "
            f"{request.headers.get(hdrs.CONTENT_TYPE, 'no Content-Type')[:60]!r}.")
    if (request.content_length or 0) > limit:
        raise too_large(limit)
    name = check_name(given or _disposition_name(request) or "upload",
                      "The file's name (?name=)")
    entry, created = await store.add(_body_chunks(request, idle), declared, name, limit)
    return Received(files={name: entry}, created=[created])


async def job_form(request: web.Request, store: InputStore, limit: int,
                   idle: float) -> Received:
    """PUT /startjob as multipart/form-data: a `workflow` part and the files it uses,
    named by their file names."""
    received = await _form(request, store, limit, idle, workflow=True)
    if received.workflow is None:
        raise BadRequest("A multipart job needs a part named 'workflow' holding the "
                         "workflow JSON (as the JSON form of PUT /startjob/ takes it), "
                         "beside its file parts.")
    return received


async def _form(request: web.Request, store: InputStore, limit: int, idle: float,
                workflow: bool) -> Received:
    if not request.content_type == "multipart/form-data":
        raise UnsupportedMediaType(f"{request.content_type} is not taken: send files as "
                                   "multipart/form-data.")
    most = MAX_INPUTS * limit + MAX_BODY_BYTES
    if (request.content_length or 0) > most:
        raise BodyTooLarge(f"The form is more than {most} bytes; send fewer or smaller "
                           "files.")
    received = Received()
    try:
        reader = await request.multipart()
        while True:
            part = await _idle(reader.next(), idle)
            if part is None:
                break
            if isinstance(part, MultipartReader):
                raise BadRequest("Nested multipart forms are not taken; send each file as "
                                 "a part of its own.")
            await _part(part, received, store, limit, idle, workflow)
    except (RequestPayloadError, HttpProcessingError, ConnectionError, ValueError):
        raise BadRequest("The multipart form could not be read as sent (cut short, a part "
                         "with malformed headers, or no boundary); send it again.") from None
    if not received.files and not workflow:
        raise BadRequest("The form holds no file: give each file a part with a filename.")
    return received


async def _part(part: BodyPartReader, received: Received, store: InputStore, limit: int,
                idle: float, workflow: bool) -> None:
    if workflow and part.name == "workflow":
        if received.workflow is not None:
            raise BadRequest("The form has two parts named 'workflow'; send one.")
        received.workflow = [chunk async for chunk in _part_chunks(
            part, idle, MAX_BODY_BYTES, too_much=BodyTooLarge(
                f"The workflow part is more than {MAX_BODY_BYTES // 2**20} MiB; send a "
                "smaller workflow."))]
        return
    if not part.filename:
        expected = "'workflow' and files" if workflow else "files"
        raise BadRequest(f"The part {str(part.name)[:60]!r} has no filename: the form takes "
                         f"{expected}, each file with its name.")
    name = check_name(part.filename, "A file part's filename")
    if name in received.files:
        raise BadRequest(f"Two parts are named {name!r}; give each file its own name.",
                         extra={"input": name})
    if len(received.files) >= MAX_INPUTS:
        raise BadRequest(f"The form holds more than {MAX_INPUTS} files.")
    media_type = media_type_for(part.headers.get(hdrs.CONTENT_TYPE), name)
    entry, created = await store.add(_part_chunks(part, idle, limit, name), media_type, name,
                                     limit)
    received.files[name] = entry
    received.created.append(created)


async def _part_chunks(part: BodyPartReader, idle: float, limit: int, name: str = "",
                       too_much: BodyTooLarge | None = None) -> AsyncIterator[bytes]:
    size = 0
    while chunk := await _idle(part.read_chunk(CHUNK), idle):
        size += len(chunk)
        if size > limit:
            raise too_much or too_large(limit, name)
        yield chunk


async def _body_chunks(request: web.Request, idle: float) -> AsyncIterator[bytes]:
    try:
        while chunk := (await _idle(request.content.readchunk(), idle))[0]:
            yield chunk
    except RequestPayloadError:
        raise BadRequest("The body could not be read as sent (cut short?); send it "
                         "again.") from None


async def _idle(pending: object, idle: float) -> object:
    """`pending` awaited, unless the client sends nothing for `idle` seconds."""
    try:
        return await asyncio.wait_for(pending, idle)  # type: ignore[arg-type]
    except TimeoutError:
        raise BodyTimeout(f"The body stopped arriving for {idle:g} s; nothing of it was "
                          "kept. Send it again.") from None


def _disposition_name(request: web.Request) -> str | None:
    header = request.headers.get(hdrs.CONTENT_DISPOSITION)
    if not header:
        return None
    _, params = parse_content_disposition(header)
    return params.get("filename*") or params.get("filename")
