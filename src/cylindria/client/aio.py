"""`AsyncClient`: Cylindria's HTTP API from asyncio code, on aiohttp."""

from __future__ import annotations

import asyncio
import json
import mimetypes
import os
import time
import urllib.parse
from collections.abc import AsyncGenerator, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from .errors import FINAL_STATES, CylindriaError
from .files import make_folder, open_inputs, output_name, read_workflow, unique_path
from .sse import Event, EventParser

DEFAULT_URL = "http://127.0.0.1:8000"
# The longest a single `GET /jobstatus/{id}/?wait=` round asks the service to hold on.
WAIT_ROUND = 60
# A round answered sooner than this did not wait (the service ignores ?wait=, or the job
# changed): the next one comes after a short pause, longer each time, up to MAX_PAUSE.
QUICK_ANSWER = 1.0
FIRST_PAUSE = 0.2
MAX_PAUSE = 2.0
# How often a dropped event stream is reconnected in a row before giving up: about 20
# seconds without the service (a restart takes less).
RECONNECTS = 12
CHUNK = 256 * 1024

Workflow = str | os.PathLike[str] | Mapping[str, Any]
InputFile = str | os.PathLike[str] | bytes


class AsyncClient:
    """A client of one Cylindria service.

    `url` is the service's base URL, `key` its API key (sent as `X-API-Key`), `session`
    an aiohttp ClientSession to use (it stays open when the client closes); without one
    the client makes its own on first use. Every error answer raises `CylindriaError`.
    `last_status` is the HTTP status of the last answer (0 before the first, and when
    the last request got none), for showing it: calls made side by side overwrite it.

        async with AsyncClient("http://127.0.0.1:8000") as cy:
            await cy.submit("hello-1", "docs/examples/quick.json", gpu="auto")
            status = await cy.wait("hello-1")
            files = await cy.download("hello-1", "out")
    """

    def __init__(self, url: str = DEFAULT_URL, key: str | None = None,
                 session: aiohttp.ClientSession | None = None,
                 timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout
        self._session = session
        self._own_session = session is None
        self.last_status = 0

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session the client made (one passed in is left open)."""
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- jobs --------------------------------------------------------------------------

    async def submit(self, job_id: str, workflow: Workflow, gpu: str | int = "auto",
                     priority: int | None = None,
                     inputs: Mapping[str, InputFile] | None = None,
                     callback_url: str | None = None) -> dict[str, Any]:
        """`PUT /startjob/{job_id}/`: submit an API-format workflow (a dict, or the path
        of its JSON file) to GPU `gpu` or `"auto"`. `inputs` maps the file names the
        workflow uses to paths or bytes, sent with it as one multipart form. Answers the
        `/startjob` body (202 new, 200 the same job again)."""
        params: dict[str, str] = {"GpuId": str(gpu)}
        if priority is not None:
            params["priority"] = str(priority)
        headers = {"X-Callback-Url": callback_url} if callback_url else {}
        body = read_workflow(workflow)
        if not inputs:
            headers["Content-Type"] = "application/json"
            return await self._json("PUT", f"/startjob/{quote(job_id)}/", params=params,
                                    data=body, headers=headers)
        form = aiohttp.FormData()
        form.add_field("workflow", body, content_type="application/json",
                       filename="workflow.json")
        # Files are streamed from disk as the form goes out, and closed after.
        opened = open_inputs(inputs)
        try:
            for name, content in opened:
                kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
                form.add_field(name, content, content_type=kind, filename=name)
            return await self._json("PUT", f"/startjob/{quote(job_id)}/", params=params,
                                    data=form, headers=headers)
        finally:
            for _, content in opened:
                if not isinstance(content, bytes):
                    content.close()

    async def status(self, job_id: str) -> dict[str, Any]:
        """`GET /jobstatus/{job_id}/`: where the job is, its progress, ETA and outputs."""
        return await self._json("GET", f"/jobstatus/{quote(job_id)}/")

    async def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The job's status once it is finished (completed, failed, cancelled or
        rejected). Asks `GET /jobstatus/{id}/?wait=S` in rounds of up to a minute; a
        service that answers at once is asked again after a short pause. Raises
        `CylindriaError` with code `timeout` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = FIRST_PAUSE
        most = WAIT_ROUND
        while True:
            left = most if deadline is None else deadline - time.monotonic()
            round_s = max(0, min(most, int(left)))
            started = time.monotonic()
            try:
                body = await self._json("GET", f"/jobstatus/{quote(job_id)}/",
                                        params={"wait": str(round_s)} if round_s else None,
                                        timeout=self.timeout + round_s)
            except CylindriaError as exc:
                if exc.code == "too_many_waiters":
                    # No slot to wait in: ask at once, and again after a pause.
                    body = await self.status(job_id)
                elif (shorter := allowed_wait(exc, round_s)) is not None:
                    most = shorter  # the service waits less long (CYLINDRIA_MAX_WAIT)
                    continue
                else:
                    raise
            if body.get("state") in FINAL_STATES:
                return body
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise CylindriaError(0, "timeout", f"Job {job_id!r} is still "
                                     f"{body.get('state')} after {timeout:g} seconds.", body)
            if now - started < QUICK_ANSWER:
                rest = pause if deadline is None else min(pause, deadline - now)
                await asyncio.sleep(max(rest, 0.0))
                pause = min(pause * 2, MAX_PAUSE)
            else:
                pause = FIRST_PAUSE

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """`POST /canceljob/{job_id}/`: the job's status as the cancel found it. A job
        already finished raises `CylindriaError` with code `job_finished`."""
        return await self._json("POST", f"/canceljob/{quote(job_id)}/")

    async def retry(self, job_id: str, gpu: str | int | None = None) -> dict[str, Any]:
        """`POST /retryjob/{job_id}/`: run a failed, cancelled or rejected job again."""
        params = None if gpu is None else {"GpuId": str(gpu)}
        return await self._json("POST", f"/retryjob/{quote(job_id)}/", params=params)

    async def jobs(self, state: str | Iterable[str] | None = None, gpu: int | None = None,
                   limit: int | None = None, before: int | None = None) -> dict[str, Any]:
        """`GET /jobs/`: a page of jobs, newest first: `{"jobs": [...], "next_before"}`;
        pass `next_before` as `before` for the next page."""
        params: dict[str, str] = {}
        if state is not None:
            params["state"] = state if isinstance(state, str) else ",".join(state)
        for name, value in (("gpu", gpu), ("limit", limit), ("before", before)):
            if value is not None:
                params[name] = str(value)
        return await self._json("GET", "/jobs/", params=params)

    async def download(self, job_id: str, out_dir: str | os.PathLike[str],
                       status: Mapping[str, Any] | None = None) -> list[Path]:
        """Every output of the job, streamed into `out_dir` (made if missing) under its
        own file name made safe (never outside `out_dir`; a name taken twice gets a
        suffix). Text outputs are saved as `.txt` files. Answers the paths written."""
        if status is None:
            status = await self.status(job_id)
        folder = make_folder(out_dir)
        written: list[Path] = []
        for index, entry in enumerate(status.get("outputs") or []):
            target = unique_path(folder, output_name(entry, job_id, index), written)
            await self._save(f"/joboutput/{quote(job_id)}/{index}", target)
            written.append(target)
        return written

    async def events(self, job_id: str | None = None,
                     last_event_id: str | None = None) -> AsyncGenerator[Event, None]:
        """`GET /events/`: job changes as they happen (`Event.data` holds the job's
        status), for one job or all. A dropped stream is reconnected with
        `Last-Event-ID`, so no change is missed; an event `resync` says some were and
        the state should be read again. Runs until the caller stops iterating."""
        params = {"job_id": job_id} if job_id else None
        failures = 0
        retry_ms = 2000
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id is not None:
                headers["Last-Event-ID"] = last_event_id
            parser = EventParser()
            try:
                async with self._open("GET", "/events/", params=params, headers=headers,
                                      timeout=None) as resp:
                    failures = 0
                    async for line in resp.content:
                        event = parser.feed(line)
                        if event is None:
                            continue
                        if event.id is not None:
                            last_event_id = event.id
                        yield event
            except CylindriaError as exc:
                if exc.code != "unreachable":
                    raise
                # Dropped, or not reachable: reconnect with the last id seen.
                failures += 1
                if failures > RECONNECTS:
                    raise
            retry_ms = parser.retry_ms or retry_ms
            await asyncio.sleep(min(retry_ms / 1000, 0.1 * 2 ** failures))

    # -- GPUs --------------------------------------------------------------------------

    async def server_status(self, gpu: int = 0) -> dict[str, Any]:
        """`GET /serverstatus?GpuId=n`: GPU n's ComfyUI, reachable or not, its devices."""
        return await self._json("GET", "/serverstatus", params={"GpuId": str(gpu)})

    async def gpus(self) -> dict[str, Any]:
        """`GET /gpus/`: every GPU's state, running job, queue depth and load."""
        return await self._json("GET", "/gpus/")

    # -- HTTP --------------------------------------------------------------------------

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _open(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
              data: Any = None, headers: Mapping[str, str] | None = None,
              timeout: float | None = -1.0) -> _Answer:
        sent = dict(headers or {})
        if self.key:
            sent["X-API-Key"] = self.key
        total = self.timeout if timeout == -1.0 else timeout
        limits = aiohttp.ClientTimeout(total=total, sock_connect=min(self.timeout, 10.0))
        return _Answer(self, self._session_now().request(
            method, self.url + path, params=params, data=data, headers=sent,
            timeout=limits))

    async def _json(self, method: str, path: str, *, timeout: float | None = -1.0,
                    **kwargs: Any) -> dict[str, Any]:
        async with self._open(method, path, timeout=timeout, **kwargs) as resp:
            try:
                return await resp.json(content_type=None)
            except ValueError as exc:
                raise CylindriaError(resp.status, "bad_answer", f"{method} {path} "
                                     f"answered what is not JSON ({exc}).") from None

    async def _save(self, path: str, target: Path) -> None:
        partial = target.with_name(f".{target.name}.part")
        try:
            async with self._open("GET", path, timeout=None) as resp:
                with partial.open("wb") as out:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        out.write(chunk)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)


class _Answer:
    """One request: its error answers and connection failures as CylindriaError."""

    def __init__(self, client: AsyncClient, pending: Any) -> None:
        self.client = client
        self.pending = pending
        self.resp: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        self.client.last_status = 0
        try:
            self.resp = resp = await self.pending
        except aiohttp.ClientConnectionError as exc:
            raise CylindriaError(0, "unreachable", f"Cylindria at {self.client.url} "
                                 f"could not be reached ({exc}).") from None
        except TimeoutError:
            raise CylindriaError(0, "unreachable", f"Cylindria at {self.client.url} did "
                                 "not answer in time.") from None
        except aiohttp.ClientResponseError as exc:
            # Raised when what came back is not HTTP: something else has that port.
            what = (exc.message.splitlines() or [""])[0].rstrip(":")
            raise CylindriaError(0, "unreachable", f"{self.client.url} did not answer in "
                                 f"HTTP ({what}): is that Cylindria's address?") from None
        self.client.last_status = resp.status
        if resp.status >= 400:
            try:
                raw = await resp.read()
            finally:
                resp.release()
            raise error_from(resp.status, raw)
        return resp

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        if self.resp is not None:
            self.resp.release()
        if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientConnectionError
                      | TimeoutError):
            raise CylindriaError(0, "unreachable", f"The answer of Cylindria at "
                                 f"{self.client.url} was cut short ({exc}).") from None


def quote(job_id: str) -> str:
    """A job id as one path segment: a `/` or `?` in it cannot reach another route."""
    return urllib.parse.quote(job_id, safe="")


def allowed_wait(exc: CylindriaError, asked: int) -> int | None:
    """The longest wait the service takes, when `exc` refused a longer one: the error's
    `max_wait` field."""
    error = exc.body.get("error") if isinstance(exc.body, dict) else None
    most = error.get("max_wait") if isinstance(error, dict) else None
    if exc.status != 400 or not isinstance(most, int) or not 1 <= most < asked:
        return None
    return most


def error_from(status: int, raw: bytes) -> CylindriaError:
    """The API's `{"error": {"code", "message"}}` answer as a CylindriaError."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        return CylindriaError(status, str(error.get("code", "error")),
                              str(error.get("message", "")), body)
    text = raw[:200].decode("utf-8", "replace").strip()
    return CylindriaError(status, "http_error", f"HTTP {status}: {text or 'no body'}",
                          body if isinstance(body, dict) else None)
