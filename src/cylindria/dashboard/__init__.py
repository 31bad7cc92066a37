"""The operator's dashboard: GPU cards, recent jobs and job details, live in the browser."""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from .views import routes


def templates_dir() -> Path:
    """The templates: inside the installed package, or at the top of a checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "templates", package.parents[1] / "templates"):
        if (candidate / "index.html").is_file():
            return candidate
    raise FileNotFoundError(f"Cylindria's templates are missing (looked beside {package})")


def setup(app: web.Application) -> None:
    """Templates, static assets and the dashboard's routes."""
    aiohttp_jinja2.setup(
        app, loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=jinja2.select_autoescape(["html", "xml"], default=True))
    app.add_routes(routes)
    app.router.add_static("/dashboard/static", templates_dir() / "static",
                          name="dashboard_static", append_version=True)
