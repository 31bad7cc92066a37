"""Shared test support for the simulator: a recording websocket listener, waits, workflows."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import ujson

import workflows

WAIT = 10.0


@dataclass(slots=True)
class Frame:
    kind: str  # "text", "binary" or "closed"
    msg: dict[str, Any] | None = None
    data: bytes = b""

    @property
    def type(self) -> str | None:
        return self.msg["type"] if self.msg is not None else None

    @property
    def event(self) -> int | None:
        return int.from_bytes(self.data[:4], "big") if self.kind == "binary" else None


@dataclass
class Listener:
    """A websocket to the simulator whose every frame is kept, read by one task."""

    ws: aiohttp.ClientWebSocketResponse
    frames: list[Frame] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, url: Any) -> Listener:
        listener = cls(await session.ws_connect(url))
        listener.task = asyncio.create_task(listener._read())
        return listener

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.frames.append(Frame("text", ujson.loads(msg.data)))
            elif msg.type == aiohttp.WSMsgType.BINARY:
                self.frames.append(Frame("binary", data=msg.data))
            self.changed.set()
        self.frames.append(Frame("closed"))
        self.changed.set()

    @property
    def closed(self) -> bool:
        return bool(self.frames) and self.frames[-1].kind == "closed"

    def texts(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [f.msg for f in self.frames
                if f.msg is not None and (kind is None or f.msg["type"] == kind)]

    async def wait_for(self, predicate: Callable[[list[Frame]], Any],
                       timeout: float = WAIT) -> Any:
        """Wait until predicate(frames) is truthy; returns its value."""
        async with asyncio.timeout(timeout):
            while True:
                self.changed.clear()
                value = predicate(self.frames)
                if value:
                    return value
                await self.changed.wait()

    async def wait_message(self, kind: str, timeout: float = WAIT,
                           **fields: Any) -> dict[str, Any]:
        def find(frames: list[Frame]) -> dict[str, Any] | None:
            for frame in frames:
                msg = frame.msg
                if msg is not None and msg["type"] == kind and all(
                        msg["data"].get(k) == v for k, v in fields.items()):
                    return msg
            return None
        return await self.wait_for(find, timeout)

    async def wait_done(self, prompt_id: str, timeout: float = WAIT) -> None:
        """Until the job's last message, `executing` with node null, has arrived."""
        await self.wait_message("executing", timeout, node=None, prompt_id=prompt_id)

    async def close(self) -> None:
        await self.ws.close()
        if self.task is not None:
            async with asyncio.timeout(WAIT):
                await self.task


async def wait_until(predicate: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Poll a condition on the simulator's state, within a bound."""
    async with asyncio.timeout(timeout):
        while True:
            value = predicate()
            if value:
                return value
            await asyncio.sleep(0.005)


# --- workflows -----------------------------------------------------------------------------

def quick(color: int = 0x336699, prefix: str = "cyl/ok", batch: int = 1,
          size: int = 64) -> dict[str, Any]:
    """EmptyImage -> ImageInvert -> SaveImage."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size,
                                                      "batch_size": batch, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": prefix}},
    }


def streamed(color: int = 0x102030, batch: int = 3) -> dict[str, Any]:
    """EmptyImage -> SaveImageWebsocket: one progress tick and PNG frame per image."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16,
                                                      "batch_size": batch, "color": color}},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }


def txt2img(steps: int = 4, seed: int = 42,
            ckpt: str = "v1-5-pruned-emaonly.safetensors") -> dict[str, Any]:
    """The usual text-to-image chain, with a fixed seed so reruns can hit the cache."""
    return workflows.txt2img(steps=steps, seed=seed, ckpt=ckpt)
