"""Reading large workflows off the event loop: in a worker process, started when needed."""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from .workflow import Workflow, read_workflow

# Bodies up to this size are read on the event loop (a few milliseconds at most);
# larger ones go to the worker, since decoding JSON holds the interpreter whole.
INLINE_BYTES = 256 * 1024


class WorkflowReader:
    """Reads PUT /startjob bodies: small ones at once, large ones in one worker process
    (spawned, not forked: the service has threads)."""

    def __init__(self, max_nodes: int) -> None:
        self.max_nodes = max_nodes
        self._pool: ProcessPoolExecutor | None = None

    async def read(self, raw: bytes | str) -> Workflow:
        if len(raw) <= INLINE_BYTES:
            return read_workflow(raw, self.max_nodes)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, read_workflow, raw, self.max_nodes)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
