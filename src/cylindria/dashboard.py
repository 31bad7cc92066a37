"""The operator's page at `/`: GPUs and recent jobs, rendered on the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from .keys import GPUS, REGISTRY

routes = web.RouteTableDef()

RECENT_JOBS = 50


def templates_dir() -> Path:
    """The templates: inside the installed package, or at the top of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parents[1] / "templates"):
        if (candidate / "index.html").is_file():
            return candidate
    raise FileNotFoundError(f"Cylindria's templates are missing (looked beside {here})")


@routes.get("/", name="index")
@aiohttp_jinja2.template("index.html")
async def get_index(request: web.Request) -> dict[str, Any]:
    gpus = request.app[GPUS]
    jobs = list(request.app[REGISTRY].jobs.values())[-RECENT_JOBS:][::-1]
    return {"gpus": gpus, "jobs": jobs}
