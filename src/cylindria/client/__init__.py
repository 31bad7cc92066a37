"""A Python client of Cylindria's HTTP API: `AsyncClient` for asyncio, `Client` blocking.

It needs aiohttp and nothing of the server, so it can call a Cylindria anywhere."""

from .aio import AsyncClient
from .errors import FINAL_STATES, CylindriaError
from .sse import Event
from .sync import Client

__all__ = ["FINAL_STATES", "AsyncClient", "Client", "CylindriaError", "Event"]
