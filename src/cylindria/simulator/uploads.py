"""POST /upload/image and /upload/mask, with the upload streamed to disk as it arrives."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from aiohttp import BodyPartReader, hdrs, web

from ..jsonio import json_response
from .faults import INTERNAL_ERROR_TEXT
from .files import Folders
from .inputs import InputFiles, split_annotation
from .png import png_bytes, read_png_head

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 16
# Received bytes go to a worker thread, which writes and hashes them, a block at a time.
FLUSH_SIZE = 1 << 20
UPLOAD_TYPES = ("input", "temp", "output")


@dataclass(slots=True)
class Staged:
    """An uploaded file in the staging folder, waiting for its final name."""

    path: str
    filename: str
    sha256: str = ""


@dataclass(slots=True)
class Form:
    """The first value of each field, as ComfyUI's `post.get()` sees it: text, bytes (a
    part that says it is not text), or a staged file."""

    values: dict[str, str | bytes | Staged] = field(default_factory=dict)

    def discard(self) -> None:
        """Remove what is left in the staging folder. Blocking."""
        for value in self.values.values():
            if isinstance(value, Staged):
                _remove(value.path)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _internal_error(why: str) -> web.Response:
    # Where ComfyUI's handler raises, aiohttp answers its plain-text 500.
    log.info("upload refused with 500: %s", why)
    return web.Response(status=500, text=INTERNAL_ERROR_TEXT, content_type="text/plain")


def _write_block(file: BinaryIO, digest: Any, data: bytearray) -> None:
    file.write(data)
    digest.update(data)


def _destination(directory: str, subfolder: str, filename: str) -> tuple[str, str] | None:
    """(folder, file path) of an upload, or None when the path leaves the folder."""
    upload_dir = os.path.abspath(directory)
    folder = os.path.join(upload_dir, os.path.normpath(subfolder))
    filepath = os.path.abspath(os.path.join(folder, filename))
    if os.path.commonpath((upload_dir, filepath)) != upload_dir:
        return None
    return folder, filepath


def _place(source: str, target: str) -> None:
    """Move a staged file to its name, replacing what is there. Blocking."""
    try:
        os.replace(source, target)
    except OSError as exc:
        # The output folder may be on another file system than the staging folder.
        if exc.errno != errno.EXDEV:
            raise
        shutil.copyfile(source, target)


class Uploads:
    """The two upload endpoints of one simulated ComfyUI, and how many uploads it took."""

    def __init__(self, folders: Folders, inputs: InputFiles, max_size: int) -> None:
        self._folders = folders
        self._inputs = inputs
        self._max_size = max_size
        # Choosing a free name and writing there happen as one step, as in ComfyUI's
        # synchronous handler.
        self._naming = asyncio.Lock()
        self.count = 0

    async def post_upload_image(self, request: web.Request) -> web.Response:
        return await self._upload(request, mask=False)

    async def post_upload_mask(self, request: web.Request) -> web.Response:
        return await self._upload(request, mask=True)

    async def _upload(self, request: web.Request, mask: bool) -> web.Response:
        form = await self._receive(request)
        try:
            response = await self._store(form, mask)
        finally:
            await asyncio.to_thread(form.discard)
        if response.status == 200:
            self.count += 1
        return response

    # --- reading the request -------------------------------------------------------------

    def _check_size(self, request: web.Request) -> None:
        # The same bound as aiohttp's own post() (client_max_size), checked as bytes arrive.
        if 0 < self._max_size < request.content.total_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self._max_size,
                                                actual_size=request.content.total_bytes)

    async def _receive(self, request: web.Request) -> Form:
        form = Form()
        if request.content_type != "multipart/form-data":
            # Not a multipart form: aiohttp's post() reads it (no file can be in it).
            for key, value in (await request.post()).items():
                if isinstance(value, (str, bytes)):
                    form.values.setdefault(key, value)
            return form
        reader = await request.multipart()
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise ValueError("To decode nested multipart you need to use custom reader")
                if part.name is None:
                    raise ValueError("Multipart field missing name.")
                if part.filename and part.name not in form.values:
                    form.values[part.name] = await self._stage(request, part)
                elif part.filename:
                    await self._drain(request, part)
                else:
                    value = await self._text(request, part)
                    form.values.setdefault(part.name, value)
        except BaseException:
            await asyncio.to_thread(form.discard)
            raise
        return form

    async def _text(self, request: web.Request, part: BodyPartReader) -> str | bytes:
        raw = bytearray()
        while chunk := await part.read_chunk(CHUNK_SIZE):
            self._check_size(request)
            raw.extend(chunk)
        value = bytes(part.decode(raw))
        kind = part.headers.get(hdrs.CONTENT_TYPE)
        if kind is None or kind.startswith("text/"):
            return value.decode(part.get_charset(default="utf-8"))
        return value

    async def _drain(self, request: web.Request, part: BodyPartReader) -> None:
        while await part.read_chunk(CHUNK_SIZE):
            self._check_size(request)

    async def _stage(self, request: web.Request, part: BodyPartReader) -> Staged:
        """Stream a file part into the staging folder, hashing it on the way."""
        assert self._folders.staging is not None and part.filename
        staged = Staged(str(self._folders.staging / uuid.uuid4().hex), part.filename)
        digest = hashlib.sha256()
        file = await asyncio.to_thread(open, staged.path, "xb")
        try:
            block = bytearray()
            while chunk := await part.read_chunk(CHUNK_SIZE):
                self._check_size(request)
                block.extend(part.decode(chunk))
                if len(block) >= FLUSH_SIZE:
                    full, block = block, bytearray()
                    await asyncio.to_thread(_write_block, file, digest, full)
            await asyncio.to_thread(_write_block, file, digest, block)
        except BaseException:
            await asyncio.to_thread(file.close)
            await asyncio.to_thread(_remove, staged.path)
            raise
        await asyncio.to_thread(file.close)
        staged.sha256 = digest.hexdigest()
        return staged

    # --- storing the file ----------------------------------------------------------------

    async def _store(self, form: Form, mask: bool) -> web.Response:
        """ComfyUI's image_upload: pick the folder and the name, then keep the file."""
        image = form.values.get("image")
        if not image:
            return web.Response(status=400)
        if not isinstance(image, Staged):
            return _internal_error("the image field is not a file")
        upload_type = form.values.get("type", "input")
        subfolder = form.values.get("subfolder", "")
        if upload_type not in UPLOAD_TYPES or not isinstance(subfolder, str):
            return _internal_error(f"type {upload_type!r}, subfolder {subfolder!r}")
        assert isinstance(upload_type, str)
        directory = self._folders.of(upload_type)
        assert directory is not None
        filename = image.filename
        destination = _destination(str(directory), subfolder, filename)
        if destination is None:
            return web.Response(status=400)
        folder, filepath = destination
        async with self._naming:
            await asyncio.to_thread(os.makedirs, folder, exist_ok=True)
            duplicate = False
            if form.values.get("overwrite") not in ("true", "1"):
                stem, extension = os.path.splitext(filename)
                number = 1
                while await asyncio.to_thread(os.path.exists, filepath):
                    # The same bytes under the same name are kept once.
                    if await self._inputs.sha256(filepath) == image.sha256:
                        duplicate = True
                        break
                    filename = f"{stem} ({number}){extension}"
                    filepath = os.path.join(folder, filename)
                    number += 1
            if not duplicate:
                if mask:
                    refused = await self._save_mask(form, image, filepath)
                    if refused is not None:
                        return refused
                else:
                    await asyncio.to_thread(_place, image.path, filepath)
                    self._inputs.remember(filepath, image.sha256)
        log.debug("upload %s stored as %s in %s/%s", image.filename, filename, upload_type,
                  subfolder)
        return json_response({"name": filename, "subfolder": subfolder, "type": upload_type})

    # --- /upload/mask --------------------------------------------------------------------

    def _original(self, ref: Any) -> str | None:
        """The image `original_ref` names, or None where ComfyUI writes nothing (its own
        400/403 answers there are dropped: the upload still answers 200). Raises where
        ComfyUI raises."""
        name, kind = split_annotation(ref["filename"])
        if not name or name[0] == "/" or ".." in name:
            return None
        if kind is None:
            kind = ref.get("type", "output")
        directory = self._folders.of(kind) if isinstance(kind, str) else None
        if directory is None:
            return None
        base = os.path.abspath(directory)
        subfolder = ref.get("subfolder", "")
        if subfolder != "":
            full = os.path.join(base, subfolder)
            if os.path.commonpath((os.path.abspath(full), base)) != base:
                return None
            base = full
        path = os.path.join(base, name)
        return path if os.path.isfile(path) else None

    async def _save_mask(self, form: Form, mask: Staged, target: str) -> web.Response | None:
        """ComfyUI keeps the original image with the mask's alpha as its alpha channel.
        The simulator's images are one colour, so it keeps the original's size and
        top-left colour with the mask's top-left alpha (PNG files only; others stand for
        an image as LoadImage reads them)."""
        raw = form.values.get("original_ref")
        try:
            if not isinstance(raw, (str, bytes)):
                raise TypeError(f"the JSON object must be str, not {type(raw).__name__}")
            original = self._original(json.loads(raw))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return _internal_error(f"original_ref {raw!r}: {exc}")
        if original is None:
            log.info("mask %s: original_ref %s names no file, nothing written",
                     mask.filename, raw)
            return None
        if not await asyncio.to_thread(self._composite, original, mask, target):
            # PIL's putalpha raises "images do not match" on a mask of another size.
            return _internal_error("mask and original differ in size")
        return None

    def _composite(self, original: str, mask: Staged, target: str) -> bool:
        """Write the original with the mask's alpha to `target`. Blocking."""
        picture = self._inputs.describe_blocking(original)
        with open(mask.path, "rb") as file:
            head = read_png_head(file)
        if head is not None and picture.decoded and (head.width, head.height) != (
                picture.width, picture.height):
            return False
        alpha = head.rgba[3] if head is not None else 255
        r, g, b, _ = picture.rgba
        data = png_bytes(picture.width, picture.height, (r, g, b, alpha))
        with open(target, "wb") as file:
            file.write(data)
        self._inputs.remember(target, hashlib.sha256(data).hexdigest())
        return True
