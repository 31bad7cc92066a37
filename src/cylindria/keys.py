"""Every typed key under which state lives on the application."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from .config import Settings
from .gpus import Gpu
from .hub import EventHub
from .registry import Registry
from .sessions import Sessions
from .webhooks import WebhookSender

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", Registry)
GPUS = web.AppKey("gpus", list[Gpu])
# A one-element list: the session is created at startup, and app keys must not be
# rebound after startup, so the holder is placed beforehand and filled in.
SESSION = web.AppKey("session", list[aiohttp.ClientSession])
TASKS = web.AppKey("tasks", dict[str, asyncio.Task[None]])
# Submissions in flight, by job id: a concurrent PUT of the same job waits on it.
SUBMISSIONS = web.AppKey("submissions", dict[str, asyncio.Future[None]])
EVENTS = web.AppKey("events", EventHub)
WEBHOOKS = web.AppKey("webhooks", WebhookSender)
SESSIONS = web.AppKey("sessions", Sessions)
