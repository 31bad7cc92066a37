"""The operator's page at `/`: GPUs and recent jobs, rendered on the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
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


def setup(app: web.Application) -> None:
    """Templates and the dashboard's routes."""
    aiohttp_jinja2.setup(
        app, loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=jinja2.select_autoescape(["html", "xml"], default=True))
    app.add_routes(routes)
