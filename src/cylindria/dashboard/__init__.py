"""The operator's dashboard: GPU cards, recent jobs, failures and job details, live in the
browser, with buttons that act through the JSON API."""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from . import failures, views


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
    app.add_routes(views.routes)
    app.add_routes(failures.routes)
    app.router.add_static("/dashboard/static", templates_dir() / "static",
                          name="dashboard_static", append_version=True)
