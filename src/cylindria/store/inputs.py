"""The input store: files clients send, kept once each by content address, next to the
state file; every disk operation runs in a worker thread."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import mimetypes
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ujson

from ..core.inputs import ID_RE, input_id
from ..errors import (
    BodyTooLarge,
    InputGone,
    InputInUse,
    InputNotFound,
    InputStoreFull,
    StateUnavailable,
)

if TYPE_CHECKING:
    from .shared_inputs import SharedFile, SharedInputs

log = logging.getLogger(__name__)

# Received bytes are written in batches of about this size: one thread hop each.
WRITE_BATCH = 1 << 20
DEFAULT_MEDIA_TYPE = "application/octet-stream"
EXTENSION_RE = re.compile(r"\.[A-Za-z0-9]{1,8}$", re.ASCII)


@dataclass(slots=True)
class StoredInput:
    """One stored file: its content address, what it is, and when a job last used it."""

    id: str
    size: int
    media_type: str
    name: str
    created_at: float
    last_used: float

    @property
    def extension(self) -> str:
        """The file's extension for ComfyUI (some loaders list files by it)."""
        found = EXTENSION_RE.search(self.name)
        if found:
            return found.group(0).lower()
        return mimetypes.guess_extension(self.media_type, strict=False) or ""

    @property
    def comfy_name(self) -> str:
        """The name it is uploaded under: the same on every ComfyUI, never colliding."""
        return f"{self.id}{self.extension}"

    def meta(self) -> dict[str, Any]:
        return {"size": self.size, "media_type": self.media_type, "name": self.name,
                "created_at": self.created_at}


def media_type_for(declared: str | None, name: str) -> str:
    """The declared type, or one guessed from the name when none useful was declared."""
    declared = (declared or "").split(";")[0].strip().lower()
    if declared and declared != DEFAULT_MEDIA_TYPE:
        return declared
    return mimetypes.guess_type(name, strict=False)[0] or DEFAULT_MEDIA_TYPE


class InputStore:
    """Files on disk under `directory` (a private temporary folder when None, removed
    at close): `sha256-<hex>` holds the bytes, `sha256-<hex>.json` what they are, and
    `incoming/` files still arriving (removed at start-up: they were cut short).

    `in_use(id)` says whether a job in flight uses an input: such an input is never
    evicted or deleted. Over `max_bytes`, the least recently used of the others go.

    With `shared` (nodes sharing PostgreSQL), every file accepted is in the database too
    before `add` returns, and the disk is this node's cache of it: a file the disk lacks
    is read back from the database when it is needed (`obtain`).
    """

    def __init__(self, directory: Path | None, max_bytes: int,
                 in_use: Callable[[str], bool], sync: bool = False,
                 shared: SharedInputs | None = None) -> None:
        self._given = directory
        self.directory = directory or Path(".")
        self.max_bytes = max_bytes
        self._in_use = in_use
        self._sync = sync
        self._entries: dict[str, StoredInput] = {}
        self._touched: set[str] = set()
        self.total_bytes = 0
        self.shared = shared
        # Files being read back from the database, one read per file at a time; and
        # the files this node knows the database holds.
        self._pulls: dict[str, asyncio.Lock] = {}
        self._in_database: set[str] = set()

    # -- life --------------------------------------------------------------------

    async def open(self) -> None:
        if self._given is None:
            self.directory = Path(await asyncio.to_thread(
                tempfile.mkdtemp, prefix="cylindria-inputs-"))
        entries = await asyncio.to_thread(_scan, self.directory)
        self._entries = {entry.id: entry for entry in entries}
        self.total_bytes = sum(entry.size for entry in entries)
        log.info("input files are kept in %s: %d stored, %.1f MiB", self.directory,
                 len(entries), self.total_bytes / 2**20)

    async def close(self) -> None:
        await self.flush_touches()
        if self._given is None:
            await asyncio.to_thread(shutil.rmtree, self.directory, True)
        if self.shared is not None:
            await self.shared.close()

    # -- lookups -----------------------------------------------------------------

    def get(self, ident: str) -> StoredInput | None:
        return self._entries.get(ident)

    def find(self, ident: str) -> StoredInput:
        entry = self._entries.get(ident) if ID_RE.fullmatch(ident) else None
        if entry is None:
            raise InputNotFound(f"No input {ident[:80]!r} is stored here; upload it with "
                                "POST /inputs/.", extra={"input_id": ident[:80]})
        return entry

    def path(self, ident: str) -> Path:
        return self.directory / ident

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, ident: object) -> bool:
        return ident in self._entries

    def touch(self, idents: list[str]) -> None:
        """A job uses these now: they are the last to be evicted."""
        now = time.time()
        for ident in idents:
            entry = self._entries.get(ident)
            if entry is not None:
                entry.last_used = now
                self._touched.add(ident)

    async def flush_touches(self) -> None:
        """Write recent uses as the files' modification times, so they outlive a restart
        (and in the database, so that no node prunes a file another one uses)."""
        used = {i: self._entries[i].last_used for i in self._touched if i in self._entries}
        self._touched.clear()
        if used:
            await asyncio.to_thread(_set_times, [(self.path(i), t) for i, t in used.items()])
        if used and self.shared is not None:
            try:
                await self.shared.mark_used(used)
            except StateUnavailable as exc:
                log.warning("input store: the uses of %d input(s) could not be written in "
                            "the database (%s)", len(used), exc.message)

    # -- the database's copy (nodes sharing PostgreSQL) ----------------------------

    async def lookup(self, idents: list[str]) -> dict[str, StoredInput]:
        """The stored inputs of these ids: those on this disk, and with a database, the
        others it holds (described only: `obtain` reads them when they are needed)."""
        found = {i: entry for i in idents if (entry := self._entries.get(i)) is not None}
        missing = [i for i in dict.fromkeys(idents) if i not in found and ID_RE.fullmatch(i)]
        if self.shared is None:
            return found
        # A file kept here before the database had it (a restart onto PostgreSQL, a
        # write that failed) goes there before a job is accepted with it.
        await asyncio.gather(*(self._share(entry) for entry in found.values()
                               if entry.id not in self._in_database))
        if missing:
            now = time.time()
            for ident, shared in (await self.shared.describe(missing)).items():
                found[ident] = _from_shared(shared, now)
        return found

    async def obtain(self, ident: str) -> StoredInput | None:
        """The input of this id on this disk, read back from the database first when
        the disk lacks it; None when it is held nowhere."""
        entry = self._entries.get(ident)
        if entry is not None or self.shared is None or not ID_RE.fullmatch(ident):
            return entry
        lock = self._pulls.setdefault(ident, asyncio.Lock())
        try:
            async with lock:
                return self._entries.get(ident) or await self._pull(ident)
        finally:
            if not lock.locked() and self._pulls.get(ident) is lock:
                del self._pulls[ident]

    async def _pull(self, ident: str) -> StoredInput | None:
        assert self.shared is not None
        sink = _Sink(self.directory / "incoming" / f"{secrets.token_hex(8)}.part")
        try:
            await asyncio.to_thread(sink.open)
            shared = await self.shared.read(ident, sink)
            if shared is None:
                return None
            if input_id(sink.digest.hexdigest()) != ident:
                log.error("input store: the database's copy of %s is corrupt", ident)
                return None
            entry, _ = await self._settle(sink, shared.media_type, shared.name,
                                          share=False)
            self._in_database.add(ident)
            self.touch([ident])
            log.info("input %s read back from the database (%d bytes)", ident, entry.size)
            return entry
        finally:
            await asyncio.shield(asyncio.to_thread(sink.discard))

    async def _share(self, entry: StoredInput) -> None:
        if self.shared is None:
            return
        try:
            await self.shared.keep(entry, self.path(entry.id), entry.last_used)
            self._in_database.add(entry.id)
        except FileNotFoundError:  # evicted meanwhile to make room for another
            raise InputGone(f"The input {entry.id} was evicted from this node's store as it "
                            "was being kept; send it again.",
                            extra={"input_id": entry.id}) from None

    # -- adding --------------------------------------------------------------------

    async def add(self, chunks: AsyncIterator[bytes], media_type: str, name: str,
                  limit: int) -> tuple[StoredInput, bool]:
        """Store what `chunks` yields (at most `limit` bytes, else 413 and nothing kept).
        Returns the entry, and whether these bytes were new. A failure or a cancel
        while they arrive leaves no file behind."""
        part = self.directory / "incoming" / f"{secrets.token_hex(8)}.part"
        sink = _Sink(part)
        try:
            await asyncio.to_thread(sink.open)
            pending: list[bytes] = []
            pending_size = 0
            async for chunk in chunks:
                if sink.size + pending_size + len(chunk) > limit:
                    raise too_large(limit, name)
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= WRITE_BATCH:
                    await asyncio.to_thread(sink.write, pending)
                    pending, pending_size = [], 0
            if pending:
                await asyncio.to_thread(sink.write, pending)
            return await self._settle(sink, media_type, name)
        finally:
            await asyncio.shield(asyncio.to_thread(sink.discard))

    async def add_bytes(self, data: bytes, media_type: str, name: str,
                        limit: int) -> tuple[StoredInput, bool]:
        if len(data) > limit:
            raise too_large(limit, name)

        async def one() -> AsyncIterator[bytes]:
            yield data

        return await self.add(one(), media_type, name, limit)

    async def _settle(self, sink: _Sink, media_type: str, name: str, share: bool = True
                      ) -> tuple[StoredInput, bool]:
        ident = input_id(sink.digest.hexdigest())
        existing = self._entries.get(ident)
        if existing is not None:
            self.touch([ident])
            if share:
                await self._share(existing)
            return existing, False
        self._make_room(sink.size, name)
        now = time.time()
        entry = StoredInput(ident, sink.size, media_type, name, now, now)
        await asyncio.to_thread(sink.keep, self.path(ident), entry.meta(), self._sync)
        existing = self._entries.get(ident)  # the same bytes may have settled meanwhile
        if existing is not None:
            entry, created = existing, False
        else:
            self._entries[ident] = entry
            self.total_bytes += entry.size
            created = True
        if share:
            await self._share(entry)
        return entry, created

    def _make_room(self, size: int, name: str) -> None:
        """Forget least recently used inputs no job in flight uses until `size` more
        bytes fit; 507 when they cannot."""
        if self.total_bytes + size <= self.max_bytes:
            return
        free = sorted((e for e in self._entries.values() if not self._in_use(e.id)),
                      key=lambda e: e.last_used)
        room = self.max_bytes - self.total_bytes
        doomed: list[StoredInput] = []
        for entry in free:
            if room >= size:
                break
            doomed.append(entry)
            room += entry.size
        if room < size:
            raise InputStoreFull(
                f"The input store cannot take {name!r} ({size} bytes): it holds "
                f"{self.total_bytes} of its {self.max_bytes} bytes "
                "(CYLINDRIA_INPUT_STORE_MAX) for jobs still in flight. Retry when some "
                "have finished.", headers={"Retry-After": "30"})
        for entry in doomed:
            self._forget(entry)
        log.info("input store: evicted %d least recently used input(s) to make room",
                 len(doomed))

    # -- removing ------------------------------------------------------------------

    async def delete(self, ident: str) -> StoredInput:
        """Delete the input here, and with a database, its copy there (unless a job in
        flight on another node uses it: 409 as for this node's own)."""
        if self.shared is None or not ID_RE.fullmatch(ident):
            self.find(ident)  # 404
        if self._in_use(ident):
            raise InputInUse(f"Input {ident} is used by a job in flight; delete it once that "
                             "job has finished.", extra={"input_id": ident})
        if self.shared is not None:
            shared = await self.shared.delete(ident)
            entry = self.get(ident)
            if entry is None:
                if shared is None:
                    return self.find(ident)  # 404
                return _from_shared(shared, time.time())
        entry = self.find(ident)
        removed = self._forget(entry)
        if removed is not None:
            await removed
        return entry

    def _forget(self, entry: StoredInput) -> asyncio.Future[None] | None:
        """Drop the entry at once; its files go in a thread (eviction happens while a
        request waits). Returns that removal, or None if the entry was gone already."""
        if self._entries.pop(entry.id, None) is None:
            return None
        self.total_bytes -= entry.size
        self._touched.discard(entry.id)
        self._in_database.discard(entry.id)
        removal = asyncio.get_running_loop().run_in_executor(None, _unlink,
                                                             self.path(entry.id))
        removal.add_done_callback(_log_failure)
        return removal

    async def prune(self, before: float) -> int:
        """Forget inputs no job in flight uses that no job has used since `before`; with
        a database, its copies no node used since then that no job in flight uses."""
        await self.flush_touches()
        doomed = [e for e in self._entries.values()
                  if e.last_used < before and not self._in_use(e.id)]
        for entry in doomed:
            self._forget(entry)
        if self.shared is not None:
            try:
                dropped = await self.shared.prune(before)
            except StateUnavailable as exc:
                log.warning("input store: old input files could not be pruned from the "
                            "database (%s); tried again next time", exc.message)
            else:
                if dropped:
                    log.info("dropped %d input file(s) from the database that no node "
                             "used since their retention", dropped)
        return len(doomed)


def shared_store(url: str | None) -> SharedInputs | None:
    """With PostgreSQL (`url`), the database's copy of the input files; psycopg is
    imported only then."""
    if url is None:
        return None
    from .shared_inputs import SharedInputs

    return SharedInputs(url)


def _from_shared(shared: SharedFile, now: float) -> StoredInput:
    return StoredInput(shared.id, shared.size, shared.media_type, shared.name,
                       shared.created_at, now)


def too_large(limit: int, name: str | None = None) -> BodyTooLarge:
    """413 for a file over the limit for one input file."""
    what = f"The input {name!r}" if name else "The file"
    return BodyTooLarge(f"{what} is more than {limit} bytes, this server's limit for one "
                        "file (CYLINDRIA_INPUT_MAX); send a smaller file.",
                        extra={"input": name} if name else None)


class _Sink:
    """A file being received: written and hashed in a worker thread, a batch at a time."""

    def __init__(self, part: Path) -> None:
        self.part = part
        self.digest = hashlib.sha256()
        self.size = 0
        self._file: Any = None

    def open(self) -> None:
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.part, "wb")

    def write(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.digest.update(chunk)
            self._file.write(chunk)
            self.size += len(chunk)

    def rewind(self) -> None:
        """Start again from nothing (a read from the database tried once more)."""
        self._file.seek(0)
        self._file.truncate()
        self.digest = hashlib.sha256()
        self.size = 0

    def keep(self, target: Path, meta: dict[str, Any], sync: bool) -> None:
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        sidecar = target.with_name(target.name + ".json")
        temp = sidecar.with_name(sidecar.name + ".part")
        temp.write_text(ujson.dumps(meta))
        os.replace(temp, sidecar)
        os.replace(self.part, target)

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        _unlink(self.part)


def _unlink(path: Path) -> None:
    for each in (path, path.with_name(path.name + ".json")):
        try:
            each.unlink()
        except FileNotFoundError:
            pass


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("input store: a file could not be removed: %s", future.exception())


def _set_times(touched: list[tuple[Path, float]]) -> None:
    for path, moment in touched:
        try:
            os.utime(path, (moment, moment))
        except FileNotFoundError:
            pass


def _scan(directory: Path) -> list[StoredInput]:
    """The stored inputs, as found: what arrived only in part is removed, and so is a
    file without its description or a description without its file."""
    directory.mkdir(parents=True, exist_ok=True)
    incoming = directory / "incoming"
    if incoming.exists():
        shutil.rmtree(incoming, ignore_errors=True)
    found: list[StoredInput] = []
    for path in directory.iterdir():
        if path.name.endswith(".json.part"):
            path.unlink(missing_ok=True)
            continue
        if not ID_RE.fullmatch(path.name):
            continue
        sidecar = path.with_name(path.name + ".json")
        try:
            meta = ujson.loads(sidecar.read_text())
            stat = path.stat()
            found.append(StoredInput(path.name, stat.st_size, str(meta["media_type"]),
                                     str(meta["name"]), float(meta["created_at"]),
                                     stat.st_mtime))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("input store: %s is incomplete (%s); removing it", path, exc)
            _unlink(path)
    for sidecar in directory.glob("sha256-*.json"):
        if not sidecar.with_name(sidecar.name[:-5]).exists():
            sidecar.unlink(missing_ok=True)
    return found
