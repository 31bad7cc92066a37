"""The input folder as loader nodes see it: file names, listings, digests and what a file holds."""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import os
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import Folders
from .png import read_png_head

# A file that is not a PNG the simulator can read stands for an image of this size.
FALLBACK_SIZE = 512
_READ_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class Source:
    """A loaded input file: its digest, and the image it stands for."""

    sha256: str
    width: int
    height: int
    # The top-left pixel of a PNG; for any other file a colour taken from its digest.
    rgba: tuple[int, int, int, int]
    has_alpha: bool
    # Whether width, height and rgba were read from a PNG.
    decoded: bool


def content_type(name: str) -> str | None:
    """"image", "video", "audio"... as ComfyUI's filter_files_content_types sees a name."""
    mime, _ = mimetypes.guess_type(name, strict=False)
    return mime.split("/")[0] if mime else None


def split_annotation(name: str) -> tuple[str, str | None]:
    """A file name and the folder its ending " [output]", " [input]" or " [temp]" picks,
    stripped by length (space included) as ComfyUI's folder_paths does."""
    for kind in ("output", "input", "temp"):
        if name.endswith(f"[{kind}]"):
            return name[:-len(kind) - 3], kind
    return name, None


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_READ_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


class InputFiles:
    """Names relative to the input folder, resolved as ComfyUI's folder_paths does, and
    the SHA-256 of files, remembered while their size and modification time hold."""

    def __init__(self, folders: Folders) -> None:
        self._folders = folders
        # path -> (size, mtime_ns, sha256); read and written from worker threads too,
        # one dict operation at a time.
        self._digests: dict[str, tuple[int, int, str]] = {}

    def path_of(self, name: str) -> str | None:
        """The file a loader's `name` means, or None when it leaves its folder.

        A name may end with " [output]", " [input]" or " [temp]" to pick the folder."""
        name, kind = split_annotation(name)
        directory = self._folders.of(kind or "input")
        if directory is None:
            return None
        base = os.path.abspath(directory)
        path = os.path.abspath(os.path.join(base, name))
        if os.path.commonpath((base, path)) != base:
            return None
        return path

    def exists(self, name: str) -> bool:
        """The check of LoadImage's and the other loaders' own validation."""
        path = self.path_of(name)
        return path is not None and os.path.exists(path)

    def top_files(self) -> list[str]:
        """The files at the top of the input folder, which loader options list. Blocking."""
        directory = self._folders.input
        if directory is None:
            return []
        with os.scandir(directory) as entries:
            return [entry.name for entry in entries if entry.is_file()]

    # --- digests -----------------------------------------------------------------------

    def sha256_blocking(self, path: str) -> str:
        stat = os.stat(path)
        known = self._digests.get(path)
        if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
            return known[2]
        sha = _file_sha256(path)
        self._digests[path] = (stat.st_size, stat.st_mtime_ns, sha)
        return sha

    async def sha256(self, path: str) -> str:
        return await asyncio.to_thread(self.sha256_blocking, path)

    def remember(self, path: str, sha: str) -> None:
        """A file just written whose digest is known already (an upload hashes as it
        streams), so that it is not read again."""
        stat = os.stat(path)
        self._digests[path] = (stat.st_size, stat.st_mtime_ns, sha)

    async def fingerprint(self, name: Any, by_mtime: bool) -> Hashable:
        """What tells a loader's cached output from a fresh one: ComfyUI's IS_CHANGED,
        the file's SHA-256 (its modification time for LoadVideo). A file that cannot be
        read never matches, so the node runs and reports the error."""
        path = self.path_of(name) if isinstance(name, str) else None
        try:
            if path is None:
                raise FileNotFoundError(name)
            if by_mtime:
                return os.stat(path).st_mtime_ns
            return await self.sha256(path)
        except OSError:
            return object()

    # --- what a loader reads -----------------------------------------------------------

    def describe_blocking(self, path: str) -> Source:
        """Digest and image of a file; raises FileNotFoundError as ComfyUI's loaders do
        when the file has gone."""
        sha = self.sha256_blocking(path)
        with open(path, "rb") as file:
            head = read_png_head(file)
        if head is None:
            digest = bytes.fromhex(sha)
            return Source(sha, FALLBACK_SIZE, FALLBACK_SIZE,
                          (digest[0], digest[1], digest[2], 255), False, False)
        return Source(sha, head.width, head.height, head.rgba, head.has_alpha, True)

    async def read(self, name: str) -> Source:
        """What a loader node gets from the file `name`, read off the event loop."""
        path = self.path_of(name)
        if path is None:
            raise FileNotFoundError(2, "No such file or directory", name)
        return await asyncio.to_thread(self.describe_blocking, path)

    # --- for tests -----------------------------------------------------------------------

    def _inventory_blocking(self) -> list[dict[str, Any]]:
        root = self._folders.input
        if root is None:
            return []
        files = []
        for folder, dirs, names in os.walk(root):
            dirs.sort()
            subfolder = Path(folder).relative_to(root).as_posix()
            for name in sorted(names):
                path = os.path.join(folder, name)
                try:
                    files.append({"name": name,
                                  "subfolder": "" if subfolder == "." else subfolder,
                                  "type": "input", "size": os.path.getsize(path),
                                  "sha256": self.sha256_blocking(path)})
                except FileNotFoundError:
                    continue
        return files

    async def inventory(self) -> list[dict[str, Any]]:
        """Every file in the input folder, subfolders included, with its size and digest."""
        return await asyncio.to_thread(self._inventory_blocking)

    async def wipe(self) -> None:
        await asyncio.to_thread(self._folders.clear_input)
