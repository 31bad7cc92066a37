"""The output, input and temp folders of one simulated ComfyUI, and /view serving them."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web


class Folders:
    """Made when the application starts, in a private directory removed when it stops;
    the output folder may be given instead."""

    def __init__(self, gpu_index: int, output_dir: Path | None) -> None:
        self._gpu_index = gpu_index
        self._output_dir = output_dir
        self._private_root: Path | None = None
        self.output: Path | None = None
        self.input: Path | None = None
        self.temp: Path | None = None
        # Uploads arrive here first, then move to their folder once their name is known.
        self.staging: Path | None = None

    def create(self) -> None:
        root = Path(tempfile.mkdtemp(prefix=f"cylindria-sim-gpu{self._gpu_index}-"))
        self._private_root = root
        if self._output_dir is not None:
            self.output = Path(os.path.abspath(self._output_dir))
        else:
            self.output = root / "output"
        self.input = root / "input"
        self.temp = root / "temp"
        self.staging = root / "uploading"
        for directory in (self.output, self.input, self.temp, self.staging):
            directory.mkdir(parents=True, exist_ok=True)

    def remove(self) -> None:
        if self._private_root is not None:
            shutil.rmtree(self._private_root, ignore_errors=True)
            self._private_root = None

    def clear_temp(self) -> None:
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            self.temp.mkdir(parents=True, exist_ok=True)

    def clear_input(self) -> None:
        if self.input is not None:
            shutil.rmtree(self.input, ignore_errors=True)
            self.input.mkdir(parents=True, exist_ok=True)

    def of(self, kind: str) -> Path | None:
        return {"output": self.output, "input": self.input, "temp": self.temp}.get(kind)

    def locate(self, query: Any) -> int | tuple[str, str]:
        """The file /view should serve, or the HTTP status ComfyUI answers instead."""
        if "filename" not in query:
            return 404
        filename = query["filename"]
        directory: Path | None = None
        for kind in ("output", "input", "temp"):
            if filename.endswith(f" [{kind}]"):
                filename = filename[:-len(kind) - 3]
                directory = self.of(kind)
                break
        if not filename or filename[0] == "/" or ".." in filename:
            return 400
        if directory is None:
            directory = self.of(query.get("type", "output"))
            if directory is None:
                return 400
        base = os.path.abspath(directory)
        if "subfolder" in query:
            full = os.path.abspath(os.path.join(base, query["subfolder"]))
            if os.path.commonpath((full, base)) != base:
                return 403
            base = full
        filename = os.path.basename(filename)
        path = os.path.join(base, filename)
        if not os.path.isfile(path):
            return 404
        return path, filename

    async def get_view(self, request: web.Request) -> web.StreamResponse:
        found = self.locate(request.query)
        if isinstance(found, int):
            return web.Response(status=found)
        path, filename = found
        headers = {hdrs.CONTENT_DISPOSITION: f'filename="{filename}"'}
        if filename.lower().endswith((".html", ".htm", ".js", ".css")):
            headers[hdrs.CONTENT_TYPE] = "application/octet-stream"
        return web.FileResponse(path, headers=headers)
