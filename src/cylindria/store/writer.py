"""The journal's one thread: runs database work in order, answers on the event loop."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = object()


class WriterThread:
    """A single worker thread. Lighter than a thread pool for what the journal needs:
    one queue in, and each result handed back with `call_soon_threadsafe`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="journal", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        done: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((work, args, done))
        return done

    async def stop(self) -> None:
        """Finish what was queued, then end the thread."""
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            work, args, done = item
            try:
                result = work(*args)
            except BaseException as exc:  # handed to the waiting side, not lost
                self._loop.call_soon_threadsafe(_fail, done, exc)
            else:
                self._loop.call_soon_threadsafe(_succeed, done, result)


def _succeed(done: asyncio.Future[Any], result: Any) -> None:
    if not done.done():
        done.set_result(result)


def _fail(done: asyncio.Future[Any], exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)
