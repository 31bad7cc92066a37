"""Decoding large JSON off the event loop: in a worker process, started when needed."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from .answers import Raw, raw_size
from .workflow import Workflow, read_workflow

T = TypeVar("T")

# JSON up to this size is decoded on the event loop (a few milliseconds at most);
# larger goes to the worker, since decoding JSON holds the interpreter whole.
INLINE_BYTES = 256 * 1024


class WorkflowReader:
    """Reads PUT /startjob bodies (and other large JSON, such as ComfyUI's frames): small
    ones at once, large ones in one worker process (spawned, not forked: the service
    has threads)."""

    def __init__(self, max_nodes: int) -> None:
        self.max_nodes = max_nodes
        self._pool: ProcessPoolExecutor | None = None

    async def read(self, raw: Raw, names: frozenset[str] = frozenset()) -> Workflow:
        return await self.decode(read_workflow, raw, self.max_nodes, names)

    async def decode(self, work: Callable[..., T], raw: Raw, *args: Any) -> T:
        """`work(raw, *args)`: here if `raw` is small, else in the worker. `work` is a
        plain function of its arguments (it may run in another process), and `raw` a
        buffer or the chunks of one."""
        if raw_size(raw) <= INLINE_BYTES:
            return work(raw, *args)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return await asyncio.get_running_loop().run_in_executor(self._pool, work, raw, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
