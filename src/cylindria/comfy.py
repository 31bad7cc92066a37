"""The thin client of one ComfyUI instance, over the process's shared session."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
import ujson

from .errors import BackendError, BackendTimeout, BackendUnavailable

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Submitted:
    """ComfyUI's answer to POST /prompt: accepted (200) or refused (400)."""

    accepted: bool
    body: dict[str, Any]


class ComfyClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str,
                 request_timeout: float) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=request_timeout)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def ws_url(self, client_id: str) -> str:
        scheme = "wss" if self.base_url.startswith("https") else "ws"
        return f"{scheme}{self.base_url[self.base_url.index(':'):]}/ws?clientId={client_id}"

    async def _request(self, method: str, path: str, *, json_body: Any = None,
                       timeout: float | None = None,
                       ok: tuple[int, ...] = (200,)) -> tuple[int, Any]:
        """One request; returns (status, parsed JSON or None). Transport failures
        become BackendUnavailable / BackendTimeout, unexpected answers BackendError."""
        kwargs: dict[str, Any] = {}
        if json_body is not None:
            kwargs["data"] = ujson.dumps(json_body)
            kwargs["headers"] = {"Content-Type": "application/json"}
        client_timeout = (aiohttp.ClientTimeout(total=timeout) if timeout is not None
                          else self.timeout)
        try:
            async with self.session.request(method, self.url(path), timeout=client_timeout,
                                            **kwargs) as resp:
                raw = await resp.read()
                if resp.status not in ok:
                    text = raw.decode("utf-8", "replace").strip()[:500]
                    raise BackendError(
                        f"ComfyUI at {self.base_url} answered {method} {path} with HTTP "
                        f"{resp.status}: {text or '(empty body)'}",
                        extra={"upstream_status": resp.status})
                if not raw or resp.content_type != "application/json":
                    return resp.status, None
                try:
                    return resp.status, ujson.loads(raw)
                except ValueError:
                    raise BackendError(
                        f"ComfyUI at {self.base_url} sent invalid JSON for {method} {path}."
                    ) from None
        except TimeoutError:
            raise BackendTimeout(
                f"ComfyUI at {self.base_url} did not answer {method} {path} in time; "
                "it may be busy or hung. Retry later.") from None
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(
                f"ComfyUI at {self.base_url} is unreachable ({exc.__class__.__name__}: "
                f"{exc}); check that it runs.") from None

    async def submit(self, prompt: dict[str, Any], extra_data: dict[str, Any],
                     client_id: str, prompt_id: str, timeout: float) -> Submitted:
        body: dict[str, Any] = {"prompt": prompt, "client_id": client_id,
                                "prompt_id": prompt_id}
        if extra_data:
            body["extra_data"] = extra_data
        status, data = await self._request("POST", "/prompt", json_body=body,
                                           timeout=timeout, ok=(200, 400))
        if not isinstance(data, dict):
            raise BackendError(f"ComfyUI at {self.base_url} answered POST /prompt with "
                               f"HTTP {status} and no JSON body.")
        return Submitted(accepted=status == 200, body=data)

    async def queue(self) -> dict[str, Any]:
        _, data = await self._request("GET", "/queue")
        return data if isinstance(data, dict) else {}

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry, or None while ComfyUI has none (unknown, pending, running)."""
        _, data = await self._request("GET", f"/history/{prompt_id}")
        if isinstance(data, dict):
            entry = data.get(prompt_id)
            if isinstance(entry, dict):
                return entry
        return None

    async def job(self, prompt_id: str) -> dict[str, Any] | None:
        """`/api/jobs/{id}`: None for 404 (ComfyUI has never heard of it, or forgot)."""
        status, data = await self._request("GET", f"/api/jobs/{prompt_id}", ok=(200, 404))
        if status == 404:
            return None
        return data if isinstance(data, dict) else {}

    async def system_stats(self, timeout: float) -> dict[str, Any]:
        _, data = await self._request("GET", "/system_stats", timeout=timeout)
        return data if isinstance(data, dict) else {}

    async def delete_pending(self, prompt_id: str) -> None:
        await self._request("POST", "/queue", json_body={"delete": [prompt_id]})

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt this prompt only if it is the one running (never a global one)."""
        await self._request("POST", "/interrupt", json_body={"prompt_id": prompt_id})

    async def is_queued(self, prompt_id: str) -> bool:
        """Whether ComfyUI holds this prompt id: queued, running or in history."""
        queue = await self.queue()
        for item in (*queue.get("queue_running", []), *queue.get("queue_pending", [])):
            if len(item) > 1 and item[1] == prompt_id:
                return True
        return await self.job(prompt_id) is not None


def sorted_queue(queue: dict[str, Any]) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """(running prompt ids, pending prompt ids in execution order, outputs per prompt).

    ComfyUI returns its pending heap as stored, not in run order: sort by number,
    then by prompt id, as its heap does.
    """
    running = [str(item[1]) for item in queue.get("queue_running", []) if len(item) > 1]
    pending_items = [item for item in queue.get("queue_pending", []) if len(item) > 1]
    pending_items.sort(key=lambda item: (_number(item[0]), str(item[1])))
    pending = [str(item[1]) for item in pending_items]
    outputs: dict[str, list[str]] = {}
    for item in (*queue.get("queue_running", []), *pending_items):
        if len(item) > 4 and isinstance(item[4], list):
            outputs[str(item[1])] = [str(o) for o in item[4]]
    return running, pending, outputs


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0

