"""Solid-colour PNG files, and where and how SaveImage writes them."""

from __future__ import annotations

import functools
import os
import re
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .nodes import SimImage


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


@functools.lru_cache(maxsize=16)
def _idat(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    # Every scanline is identical, so the deflate stream is fed a block of rows at a time
    # and never holds the raw image in memory.
    row = b"\x00" + bytes(rgb) * width
    rows_per_block = max(1, (1 << 20) // len(row))
    level = 6 if width * height <= 4 * 1024 * 1024 else 1
    comp = zlib.compressobj(level)
    parts = []
    full, rest = divmod(height, rows_per_block)
    if full:
        block = row * rows_per_block
        parts.extend(comp.compress(block) for _ in range(full))
    if rest:
        parts.append(comp.compress(row * rest))
    parts.append(comp.flush())
    return b"".join(parts)


def png_bytes(width: int, height: int, rgb: tuple[int, int, int],
              text: dict[str, str] | None = None) -> bytes:
    """A valid 8-bit RGB PNG of one colour, with optional tEXt chunks (as SaveImage embeds)."""
    out = [b"\x89PNG\r\n\x1a\n",
           _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    for key, value in (text or {}).items():
        out.append(_chunk(b"tEXt", key.encode("latin-1") + b"\0"
                          + value.encode("latin-1", "replace")))
    out.append(_chunk(b"IDAT", _idat(width, height, rgb)))
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


def save_image_path(prefix: str, base_dir: Path) -> tuple[Path, str, int, str]:
    """Where the next files for `prefix` go: (folder, file stem, first counter, subfolder).

    Counters continue after the highest one already on disk for that stem, so numbering
    survives a restart, as ComfyUI's own directory scan does.
    """
    base = os.path.abspath(base_dir)
    normalized = os.path.normpath(prefix)
    subfolder = os.path.dirname(normalized)
    stem = os.path.basename(normalized)
    folder = os.path.abspath(os.path.join(base, subfolder))
    common = os.path.commonpath((base, folder))
    if common != base:
        # A plain Exception, so that exception_type reads "Exception" as in ComfyUI.
        raise Exception(
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {folder}"
            f"\n         output_dir: {base}"
            f"\n         commonpath: {common}")
    return Path(folder), stem, _highest(folder, stem) + 1, subfolder


# (folder, stem) -> (the folder's mtime when last scanned or written, highest counter).
_highest_seen: dict[tuple[str, str], tuple[int, int]] = {}


def _highest(folder: str, stem: str) -> int:
    """The highest counter on disk for `stem`. ComfyUI scans the folder every time; the
    answer is remembered while the folder's mtime says nothing else touched it, so a
    folder of thousands of files does not make every save slower."""
    try:
        mtime = os.stat(folder).st_mtime_ns
    except FileNotFoundError:
        return 0
    seen = _highest_seen.get((folder, stem))
    if seen is not None and seen[0] == mtime:
        return seen[1]
    pattern = re.compile(re.escape(stem) + r"_(\d+)_", re.IGNORECASE)
    highest = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            match = pattern.match(entry.name)
            if match:
                highest = max(highest, int(match.group(1)))
    _highest_seen[(folder, stem)] = (mtime, highest)
    return highest


def write_pngs(images: SimImage, prefix: str, base_dir: Path, kind: str,
               text: dict[str, str]) -> list[dict[str, str]]:
    """Write one PNG per image of the batch; returns the UI records."""
    folder, stem, counter, subfolder = save_image_path(prefix, base_dir)
    folder.mkdir(parents=True, exist_ok=True)
    data = png_bytes(images.width, images.height, images.rgb, text)
    records = []
    for _ in range(images.batch):
        name = f"{stem}_{counter:05}_.png"
        (folder / name).write_bytes(data)
        records.append({"filename": name, "subfolder": subfolder, "type": kind})
        counter += 1
    _highest_seen[(str(folder), stem)] = (os.stat(folder).st_mtime_ns, counter - 1)
    return records
