"""Webhooks: POST a job's final status to its callback URL, signed, with retries."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import ujson

from .config import Timing
from .errors import BadRequest
from .registry import Job, JobState, Registry, isoformat, utcnow

log = logging.getLogger(__name__)

RETRIES = 3
MAX_CONCURRENT = 16
SIGNATURE_HEADER = "X-Cylindria-Signature"


def check_callback_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2048:
        raise BadRequest("X-Callback-Url must be an absolute http:// or https:// URL "
                         f"(got {url[:200]!r}).")
    return url


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSender:
    """Delivers each finished job's status once, each delivery in its own task so a
    slow or dead endpoint never delays another job's."""

    def __init__(self, registry: Registry, secret: str | None, timing: Timing,
                 render: Callable[[Job], dict[str, Any]]) -> None:
        self.registry = registry
        self.secret = secret
        self.timing = timing
        self.render = render
        self.session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)

    def on_change(self, job: Job) -> None:
        if (job.callback_url is None or not job.terminal or job.webhook is not None
                or job.state is JobState.REJECTED or self.session is None):
            return
        job.webhook = {"url": job.callback_url, "state": "pending", "attempts": 0,
                       "last_error": None, "delivered_at": None}
        task = asyncio.get_running_loop().create_task(self.deliver(job),
                                                      name=f"webhook-{job.job_id}")
        # Kept until done, and cancelled at shutdown by close().
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, job: Job) -> None:
        assert self.session is not None and job.callback_url is not None
        body = ujson.dumps(self.render(job)).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "cylindria-webhook"}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        timeout = aiohttp.ClientTimeout(total=self.timing.webhook_timeout)
        error = None
        for attempt in range(1, RETRIES + 2):
            if attempt > 1:
                await asyncio.sleep(self.timing.webhook_backoff * 2 ** (attempt - 2))
            try:
                async with self._slots, self.session.post(
                        job.callback_url, data=body, headers=headers, timeout=timeout,
                        allow_redirects=False) as resp:
                    if 200 <= resp.status < 300:
                        self.registry.set_webhook(job, state="delivered", attempts=attempt,
                                                  last_error=None,
                                                  delivered_at=isoformat(utcnow()))
                        log.info("webhook for job %s delivered to %s", job.job_id,
                                 job.callback_url)
                        return
                    error = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = f"{exc.__class__.__name__}: {exc}"[:300]
            state = "retrying" if attempt <= RETRIES else "failed"
            self.registry.set_webhook(job, state=state, attempts=attempt, last_error=error)
            log.warning("webhook for job %s to %s failed (attempt %d of %d): %s", job.job_id,
                        job.callback_url, attempt, RETRIES + 1, error)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
