"""The websocket clients of one simulated ComfyUI, and the one sender that writes to them."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import WSCloseCode, web

from ..jsonio import dumps

log = logging.getLogger(__name__)


class Sockets:
    """The clientId registry, each client's feature flags and the outgoing queue."""

    def __init__(self) -> None:
        # The registry maps clientId to the socket events go to, as ComfyUI's dict does;
        # _open holds every open socket, registered or muted.
        self._registry: dict[str, web.WebSocketResponse] = {}
        self._client_flags: dict[str, dict[str, Any]] = {}
        self._open: set[web.WebSocketResponse] = set()
        self._outbox: asyncio.Queue[tuple[str | None, str | bytes]] = asyncio.Queue()

    @property
    def open_count(self) -> int:
        return len(self._open)

    @property
    def client_ids(self) -> list[str]:
        return list(self._registry)

    def register(self, sid: str, ws: web.WebSocketResponse) -> None:
        # A second socket with the same clientId takes over the registry entry; the
        # older one stays open but muted (ComfyUI behaves the same way).
        self._registry[sid] = ws
        self._client_flags[sid] = {}
        self._open.add(ws)

    def unregister(self, sid: str, ws: web.WebSocketResponse) -> None:
        # Unconditional, as in ComfyUI: when the older of two same-id sockets closes,
        # this unregisters the newer one.
        self._registry.pop(sid, None)
        self._client_flags.pop(sid, None)
        self._open.discard(ws)

    def registered(self, sid: str) -> web.WebSocketResponse | None:
        return self._registry.get(sid)

    def set_flags(self, sid: str, flags: dict[str, Any]) -> None:
        self._client_flags[sid] = flags

    def wants_preview_metadata(self, sid: str) -> bool:
        return bool(self._client_flags.get(sid, {}).get("supports_preview_metadata"))

    def send(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        """Queue a text message: to the socket registered as `sid` at send time, or to
        every registered socket when sid is None."""
        self._outbox.put_nowait((sid, dumps({"type": event, "data": data})))

    def send_bytes(self, payload: bytes, sid: str | None) -> None:
        self._outbox.put_nowait((sid, payload))

    def drop_queued(self) -> None:
        self._outbox = asyncio.Queue()

    def forget_clients(self) -> None:
        self._registry.clear()
        self._client_flags.clear()

    async def publish(self) -> None:
        # One sender for everything, in order: a slow socket delays every other one,
        # exactly the trade-off ComfyUI makes.
        while True:
            sid, payload = await self._outbox.get()
            if sid is None:
                targets = list(self._registry.values())
            else:
                ws = self._registry.get(sid)
                targets = [ws] if ws is not None else []
            for ws in targets:
                await self.deliver(ws, payload)

    @staticmethod
    async def deliver(ws: web.WebSocketResponse, payload: str | bytes) -> None:
        if ws.closed:
            return
        try:
            if isinstance(payload, str):
                await ws.send_str(payload)
            else:
                await ws.send_bytes(payload)
        except (ConnectionError, RuntimeError) as exc:
            log.debug("dropping a message for a closing socket: %r", exc)

    async def close_all(self) -> None:
        sockets = list(self._open)
        await asyncio.gather(
            *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"Server shutdown")
              for ws in sockets),
            return_exceptions=True)
