"""Every typed key under which state lives on the application."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from .config import Settings
    from .gpus import Gpu
    from .registry import Registry

SETTINGS = web.AppKey["Settings"]("settings")
REGISTRY = web.AppKey["Registry"]("registry")
GPUS = web.AppKey["list[Gpu]"]("gpus")
# A one-element list: the session is created at startup, and app keys must not be
# rebound after startup, so the holder is placed beforehand and filled in.
SESSION = web.AppKey["list[aiohttp.ClientSession]"]("session")
TASKS = web.AppKey["dict[str, asyncio.Task[None]]"]("tasks")
SUBMISSIONS = web.AppKey["dict[str, asyncio.Future[object]]"]("submissions")
