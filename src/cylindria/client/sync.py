"""`Client`: the blocking face of `AsyncClient`, for scripts and notebooks."""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Coroutine, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .aio import DEFAULT_URL, AsyncClient, InputFile, Workflow
from .errors import CylindriaError
from .sse import Event

T = TypeVar("T")


class Client:
    """The same calls as `AsyncClient`, blocking. They run on an event loop of the
    client's own, in a background thread, so a client works where a loop already runs
    (a notebook) as well as in a plain script.

        with Client("http://127.0.0.1:8000") as cy:
            cy.submit("hello-1", "docs/examples/quick.json")
            print(cy.wait("hello-1")["state"])
    """

    def __init__(self, url: str = DEFAULT_URL, key: str | None = None,
                 timeout: float = 30.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="cylindria-client", daemon=True)
        self._thread.start()
        self._async = AsyncClient(url, key, timeout=timeout)
        self.url = self._async.url
        # A client never closed is closed when it is collected, or at exit.
        self._finalizer = weakref.finalize(self, _shut, self._loop, self._thread,
                                           self._async)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def last_status(self) -> int:
        """See `AsyncClient.last_status`."""
        return self._async.last_status

    def close(self) -> None:
        """Close the connections and stop the client's thread."""
        self._finalizer()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._finalizer.alive:
            coro.close()
            raise CylindriaError(0, "closed", "This client is closed: make a new one.")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # Ctrl-C while waiting: the call on the client's loop stops too.
            future.cancel()
            raise

    def submit(self, job_id: str, workflow: Workflow, gpu: str | int = "auto",
               priority: int | None = None, inputs: Mapping[str, InputFile] | None = None,
               callback_url: str | None = None) -> dict[str, Any]:
        """See `AsyncClient.submit`."""
        return self._run(self._async.submit(job_id, workflow, gpu, priority, inputs,
                                            callback_url))

    def status(self, job_id: str) -> dict[str, Any]:
        """See `AsyncClient.status`."""
        return self._run(self._async.status(job_id))

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """See `AsyncClient.wait`."""
        return self._run(self._async.wait(job_id, timeout))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """See `AsyncClient.cancel`."""
        return self._run(self._async.cancel(job_id))

    def retry(self, job_id: str, gpu: str | int | None = None) -> dict[str, Any]:
        """See `AsyncClient.retry`."""
        return self._run(self._async.retry(job_id, gpu))

    def jobs(self, state: str | Iterable[str] | None = None, gpu: int | None = None,
             limit: int | None = None, before: int | None = None) -> dict[str, Any]:
        """See `AsyncClient.jobs`."""
        return self._run(self._async.jobs(state, gpu, limit, before))

    def download(self, job_id: str, out_dir: str | os.PathLike[str],
                 status: Mapping[str, Any] | None = None) -> list[Path]:
        """See `AsyncClient.download`."""
        return self._run(self._async.download(job_id, out_dir, status))

    def events(self, job_id: str | None = None,
               last_event_id: str | None = None) -> Iterator[Event]:
        """See `AsyncClient.events`; the stream closes when the loop over it ends."""
        stream = self._async.events(job_id, last_event_id)
        try:
            while True:
                try:
                    yield self._run(_next(stream))
                except StopAsyncIteration:
                    return
        finally:
            if not self._loop.is_closed():
                self._run(stream.aclose())

    def server_status(self, gpu: int = 0) -> dict[str, Any]:
        """See `AsyncClient.server_status`."""
        return self._run(self._async.server_status(gpu))

    def gpus(self) -> dict[str, Any]:
        """See `AsyncClient.gpus`."""
        return self._run(self._async.gpus())


async def _next(stream: AsyncGenerator[Event, None]) -> Event:
    return await anext(stream)


def _shut(loop: asyncio.AbstractEventLoop, thread: threading.Thread,
          client: AsyncClient) -> None:
    asyncio.run_coroutine_threadsafe(client.close(), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
