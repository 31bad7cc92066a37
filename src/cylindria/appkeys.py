"""Every typed key under which state lives on the application."""

from __future__ import annotations

import asyncio

from aiohttp import web

from .config import Settings
from .core.jobs import JobsService
from .core.registry import Registry
from .store.inputs import InputStore
from .store.journal import Journal
from .upstream.gpus import Gpu
from .upstream.heartbeat import Cluster
from .upstream.peers import PeerClient
from .upstream.webhooks import WebhookSender
from .web.eventhub import EventHub
from .web.signins import Signins
from .web.waiters import Waiters

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", Registry)
EVENTS = web.AppKey("events", EventHub)
SIGNINS = web.AppKey("signins", Signins)
# Requests waiting with ?wait= for a job to finish.
WAITERS = web.AppKey("waiters", Waiters)
# Set during start-up, once the ClientSession they use exists.
GPUS = web.AppKey("gpus", list[Gpu])
JOBS = web.AppKey("jobs", JobsService)
JOURNAL = web.AppKey("journal", Journal)
WEBHOOKS = web.AppKey("webhooks", WebhookSender)
INPUTS = web.AppKey("inputs", InputStore)
# This node and the others sharing its PostgreSQL database, as heartbeats show them.
CLUSTER = web.AppKey("cluster", Cluster)
# The other nodes, asked over the process's one ClientSession (outputs they hold).
PEERS = web.AppKey("peers", PeerClient)
# (The metrics' key is METRICS in web/metrics.py, which reads the keys above.)
# Background tasks by name: each GPU's listener and poller.
TASKS = web.AppKey("tasks", dict[str, asyncio.Task[None]])
