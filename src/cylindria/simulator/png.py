"""Solid-colour PNG files, the size and first pixel of any PNG, and SaveImage's naming."""

from __future__ import annotations

import functools
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from .nodes import SimImage


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Samples per pixel of each PNG colour type: grey, RGB, palette, grey+alpha, RGBA.
_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


@functools.lru_cache(maxsize=16)
def _idat(width: int, height: int, rgb: tuple[int, ...]) -> bytes:
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


def png_bytes(width: int, height: int, rgb: tuple[int, ...],
              text: dict[str, str] | None = None) -> bytes:
    """A valid 8-bit PNG of one colour, RGB or (given four values) RGBA, with optional
    tEXt chunks (as SaveImage embeds)."""
    colour_type = 6 if len(rgb) == 4 else 2
    out = [PNG_SIGNATURE,
           _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))]
    for key, value in (text or {}).items():
        out.append(_chunk(b"tEXt", key.encode("latin-1") + b"\0"
                          + value.encode("latin-1", "replace")))
    out.append(_chunk(b"IDAT", _idat(width, height, rgb)))
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


@dataclass(frozen=True, slots=True)
class PngHead:
    width: int
    height: int
    # The top-left pixel; alpha is 255 when the image has no alpha channel.
    rgba: tuple[int, int, int, int]
    has_alpha: bool


def read_png_head(file: BinaryIO) -> PngHead | None:
    """The size and top-left pixel of a PNG, read no further than that pixel; None if the
    file is not a PNG. Blocking: call it from a worker thread."""
    try:
        return _read_head(file)
    except (struct.error, zlib.error, ValueError, IndexError):
        return None


def _read_head(file: BinaryIO) -> PngHead | None:
    if file.read(8) != PNG_SIGNATURE:
        return None
    length, kind = struct.unpack(">I4s", file.read(8))
    if kind != b"IHDR" or length != 13:
        return None
    width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", file.read(13))
    file.seek(4, os.SEEK_CUR)
    if colour not in _SAMPLES or depth not in (1, 2, 4, 8, 16) or not width or not height:
        return None
    palette = transparency = b""
    # The filter byte of the first row, then the first pixel. Whatever the filter, the
    # first pixel of the first row (also of an interlaced image's first pass) is stored
    # as it is, because every predictor of it is zero.
    need = 1 + max(1, _SAMPLES[colour] * depth // 8)
    inflate = zlib.decompressobj()
    raw = b""
    while len(raw) < need:
        header = file.read(8)
        if len(header) < 8:
            return None
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IDAT":
            left = length
            while left and len(raw) < need:
                piece = file.read(min(left, 1 << 16))
                if not piece:
                    return None
                left -= len(piece)
                raw += inflate.decompress(inflate.unconsumed_tail + piece, need - len(raw))
            file.seek(left + 4, os.SEEK_CUR)
        elif kind == b"IEND":
            return None
        elif kind in (b"PLTE", b"tRNS"):
            data = file.read(length)
            file.seek(4, os.SEEK_CUR)
            if kind == b"PLTE":
                palette = data
            else:
                transparency = data
        else:
            file.seek(length + 4, os.SEEK_CUR)
    return PngHead(width, height, *_first_pixel(raw[1:], colour, depth, palette, transparency))


def _first_pixel(pixel: bytes, colour: int, depth: int, palette: bytes,
                 transparency: bytes) -> tuple[tuple[int, int, int, int], bool]:
    if depth < 8:
        value = pixel[0] >> (8 - depth)
        if colour == 3:
            index = value
        else:
            grey = value * 255 // ((1 << depth) - 1)
            return (grey, grey, grey, 255), False
    else:
        # 16-bit samples: the high byte is the 8-bit value.
        step = depth // 8
        samples = [pixel[i * step] for i in range(_SAMPLES[colour])]
        if colour == 0:
            return (samples[0], samples[0], samples[0], 255), False
        if colour == 2:
            return (samples[0], samples[1], samples[2], 255), False
        if colour == 4:
            return (samples[0], samples[0], samples[0], samples[1]), True
        if colour == 6:
            return (samples[0], samples[1], samples[2], samples[3]), True
        index = samples[0]
    r, g, b = palette[3 * index:3 * index + 3]
    alpha = transparency[index] if index < len(transparency) else 255
    return (r, g, b, alpha), bool(transparency)


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
