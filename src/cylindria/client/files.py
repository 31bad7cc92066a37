"""Files on the client's side: reading a workflow, and naming outputs safely on disk."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CylindriaError

# What may stay in a file name taken from the service: anything else becomes `_`.
UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")
MAX_NAME = 120


def read_workflow(workflow: str | os.PathLike[str] | Mapping[str, Any]) -> bytes:
    """The workflow as the JSON body to send: a dict encoded, a file's bytes as they are."""
    if isinstance(workflow, Mapping):
        return json.dumps(workflow).encode()
    path = Path(workflow)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CylindriaError(0, "bad_workflow", f"The workflow file {str(path)!r} cannot "
                             f"be read: {exc.strerror or exc}.") from None


def open_inputs(inputs: Mapping[str, str | os.PathLike[str] | bytes],
                ) -> list[tuple[str, bytes | BinaryIO]]:
    """Each input file by its name: bytes as given, a path opened for reading."""
    opened: list[tuple[str, bytes | BinaryIO]] = []
    try:
        for name, file in inputs.items():
            if isinstance(file, bytes):
                opened.append((name, file))
                continue
            try:
                opened.append((name, Path(file).open("rb")))
            except OSError as exc:
                raise CylindriaError(0, "bad_input", f"The input file {str(file)!r} "
                                     f"cannot be read: {exc.strerror or exc}.") from None
    except BaseException:
        for _, content in opened:
            if not isinstance(content, bytes):
                content.close()
        raise
    return opened


def make_folder(path: str | os.PathLike[str]) -> Path:
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CylindriaError(0, "bad_output", f"The folder {str(folder)!r} cannot be "
                             f"made: {exc.strerror or exc}.") from None
    return folder


def safe_name(name: str, fallback: str) -> str:
    """`name` as a plain file name: its last path segment, only safe characters, no
    leading dot, never empty."""
    base = re.split(r"[\\/]", name)[-1]
    base = UNSAFE.sub("_", base).strip(" ").lstrip(".")
    if len(base) > MAX_NAME:
        stem, dot, ext = base.rpartition(".")
        base = (stem[:MAX_NAME - len(ext) - 1] + dot + ext) if dot and len(ext) < 16 \
            else base[:MAX_NAME]
    return base or fallback


def output_name(entry: Mapping[str, Any], job_id: str, index: int) -> str:
    """The file name an output of a job is saved under."""
    fallback = f"{safe_name(job_id, 'job')}-{index}"
    if entry.get("kind") == "text":
        return f"{fallback}.txt"
    return safe_name(str(entry.get("filename") or ""), fallback)


def unique_path(folder: Path, name: str, taken: list[Path]) -> Path:
    """`folder / name`, with `-2`, `-3` ... before the extension if this download has
    written that name already."""
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    target, n = folder / name, 1
    while target in taken:
        n += 1
        target = folder / f"{stem}-{n}{dot}{ext}"
    # safe_name leaves no separator, so this holds; checked all the same.
    if target.resolve().parent != folder.resolve():
        raise CylindriaError(0, "bad_answer", f"Refusing to write {name!r} outside "
                             f"{str(folder)!r}.")
    return target
