"""Input files on their way: into the store (inline bytes, URLs) and onto a GPU's ComfyUI
before a job runs there, each file once per GPU (remembered until its ComfyUI may have
restarted), a few uploads per GPU at once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from ..errors import BackendUnavailable, InputGone, InputStoreFull, StateUnavailable
from ..store.inputs import InputStore, StoredInput, media_type_for
from .fetch import InputFetcher
from .gpus import Gpu

log = logging.getLogger(__name__)

# Uploads to one ComfyUI at the same time; more wait their turn.
UPLOADS_PER_GPU = 2
SUBFOLDER = "cylindria"


class InputDelivery:
    """The input store as the jobs service uses it; what each GPU's ComfyUI holds of
    it, and the uploads that put it there. Many jobs over one file share one upload
    per GPU."""

    def __init__(self, store: InputStore, fetcher: InputFetcher, limit: int,
                 fetch_timeout: float, read_timeout: float) -> None:
        self.store = store
        self._fetcher = fetcher
        self.limit = limit
        self._fetch_timeout = fetch_timeout
        self._read_timeout = read_timeout
        self._held: dict[int, dict[str, str]] = {}
        self._underway: dict[tuple[int, str], asyncio.Future[str]] = {}
        self._slots: dict[int, asyncio.Semaphore] = {}
        # Told (gpu, bytes, seconds) after each upload that worked (for /metrics).
        self.observe: Callable[[int, int, float], None] | None = None
        self.uploads = 0

    def get(self, ident: str) -> StoredInput | None:
        return self.store.get(ident)

    def touch(self, idents: list[str]) -> None:
        self.store.touch(idents)

    async def lookup(self, idents: list[str]) -> dict[str, StoredInput]:
        return await self.store.lookup(idents)

    async def add_bytes(self, data: bytes, name: str) -> StoredInput:
        entry, _ = await self.store.add_bytes(data, media_type_for(None, name), name,
                                              self.limit)
        return entry

    async def fetch(self, url: str, name: str) -> StoredInput:
        return await self._fetcher.fetch(url, name, self.store, self.limit,
                                         self._fetch_timeout)

    def holds(self, gpu: int, ident: str) -> bool:
        return ident in self._held.get(gpu, {})

    def forget(self, gpu: int, idents: Iterable[str] | None = None) -> None:
        """Its ComfyUI may have lost these files (all of them, when None): upload again."""
        held = self._held.get(gpu)
        if not held:
            return
        if idents is None:
            held.clear()
        else:
            for ident in idents:
                held.pop(ident, None)

    async def place(self, gpu: Gpu, idents: Iterable[str]) -> dict[str, str]:
        """The name each input has on this GPU's ComfyUI, uploading what it lacks.
        BackendError when ComfyUI does not take one; InputGone when the store lost one."""
        wanted = list(dict.fromkeys(idents))
        names = await asyncio.gather(*(self._one(gpu, ident) for ident in wanted))
        return dict(zip(wanted, names, strict=True))

    async def _one(self, gpu: Gpu, ident: str) -> str:
        held = self._held.setdefault(gpu.index, {})
        if ident in held:
            return held[ident]
        key = (gpu.index, ident)
        underway = self._underway.get(key)
        if underway is None:
            underway = asyncio.get_running_loop().create_future()
            self._underway[key] = underway
            try:
                name = await self._upload(gpu, ident)
            except asyncio.CancelledError:
                underway.cancel()  # a waiter makes the upload itself
                raise
            except BaseException as exc:
                underway.set_exception(exc)
                underway.exception()  # retrieved: each waiter raises it for itself
                raise
            else:
                held[ident] = name
                underway.set_result(name)
                return name
            finally:
                self._underway.pop(key, None)
        try:
            return await asyncio.shield(underway)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if underway.cancelled() and task is not None and not task.cancelling():
                return await self._one(gpu, ident)
            raise

    async def _upload(self, gpu: Gpu, ident: str) -> str:
        # With nodes sharing a database, a file this node's disk lacks is read from there.
        # Not now is a submission that did not reach ComfyUI (a job from the queue goes
        # back in line), as when ComfyUI cannot be reached.
        try:
            entry = await self.store.obtain(ident)
        except (StateUnavailable, InputStoreFull) as exc:
            raise BackendUnavailable(
                f"The input {ident} is not on this node's disk and cannot be read from the "
                f"database now: {exc.message}", extra={"input_id": ident}) from None
        if entry is None:
            raise InputGone(f"The input {ident} is no longer stored (it was deleted or "
                            "evicted); upload it again and submit the job anew.",
                            extra={"input_id": ident})
        slots = self._slots.setdefault(gpu.index, asyncio.Semaphore(UPLOADS_PER_GPU))
        async with slots:
            started = time.perf_counter()
            try:
                name = await gpu.comfy.upload(str(self.store.path(ident)), entry.comfy_name,
                                              entry.media_type, SUBFOLDER, self._read_timeout)
            except FileNotFoundError:
                raise InputGone(f"The input {ident} is no longer stored; upload it again "
                                "and submit the job anew.", extra={"input_id": ident}) from None
            seconds = time.perf_counter() - started
        self.uploads += 1
        if self.observe is not None:
            self.observe(gpu.index, entry.size, seconds)
        log.info("input %s is on gpu %d as %s (%d bytes in %.3f s)", ident, gpu.index, name,
                 entry.size, seconds)
        return name
