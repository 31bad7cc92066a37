"""Webhooks: POST a finished job's status to its callback URL, signed, with retries."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
from collections.abc import Callable

import aiohttp

from ..addresses import without_userinfo
from ..config import Timing
from ..core.records import Job, isoformat, utcnow
from ..core.registry import Registry
from ..errors import CallbackNotAllowed
from .comfy import CallbackClient

log = logging.getLogger(__name__)

RETRIES = 3
MAX_CONCURRENT = 16
SIGNATURE_HEADER = "X-Cylindria-Signature"
# Webhook states that still owe a delivery.
DUE = frozenset({"pending", "retrying"})


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSender:
    """A registry subscriber: delivers each job whose webhook the registry marked
    pending, each delivery in its own task so a slow or dead endpoint never delays
    another job's."""

    def __init__(self, registry: Registry, client: CallbackClient, secret: str | None,
                 timing: Timing, render: Callable[[Job], bytes]) -> None:
        self.registry = registry
        self.client = client
        self.secret = secret
        self.timing = timing
        self.render = render
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        # Delivery attempts by outcome, for /metrics.
        self.outcomes: collections.Counter[str] = collections.Counter()

    def on_change(self, job: Job) -> None:
        if (job.webhook is None or job.webhook.get("state") not in DUE
                or job.job_id in self._tasks):
            return
        task = asyncio.get_running_loop().create_task(self.deliver(job, job.webhook["url"]),
                                                      name=f"webhook-{job.job_id}")
        # Kept until done, and cancelled at shutdown by close().
        self._tasks[job.job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.job_id, None))

    async def check(self, url: str) -> None:
        """Raise CallbackNotAllowed unless webhooks may go to `url`."""
        await self.client.check(url)

    def resume(self, jobs: list[Job]) -> None:
        """Deliver what an earlier run of the process did not get to."""
        for job in jobs:
            self.on_change(job)

    async def deliver(self, job: Job, url: str) -> None:
        shown = without_userinfo(url)
        if shown != url:
            # Only a state file from before credentials were refused holds such a URL:
            # it is not called, and from now on not shown.
            self.registry.set_webhook(job, url=shown)
        body = self.render(job)
        headers = {"Content-Type": "application/json", "User-Agent": "cylindria-webhook"}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        error = None
        for attempt in range(1, RETRIES + 2):
            if attempt > 1:
                await asyncio.sleep(self.timing.webhook_backoff * 2 ** (attempt - 2))
            try:
                async with self._slots:
                    status = await self.client.post(url, body, headers,
                                                    self.timing.webhook_timeout)
                if 200 <= status < 300:
                    self.registry.set_webhook(job, state="delivered", attempts=attempt,
                                              last_error=None,
                                              delivered_at=isoformat(utcnow()))
                    self.outcomes["delivered"] += 1
                    log.info("webhook for job %s delivered to %s", job.job_id, shown)
                    return
                error = f"HTTP {status}"
            except CallbackNotAllowed as exc:
                # The policy's verdict, not a passing failure: trying again would not help.
                self.registry.set_webhook(job, state="failed", attempts=attempt,
                                          last_error=exc.message[:300])
                self.outcomes["not_allowed"] += 1
                log.warning("webhook for job %s not sent: %s", job.job_id, exc.message)
                return
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = f"{exc.__class__.__name__}: {exc}"[:300]
            state = "retrying" if attempt <= RETRIES else "failed"
            self.outcomes["retried" if attempt <= RETRIES else "failed"] += 1
            self.registry.set_webhook(job, state=state, attempts=attempt, last_error=error)
            log.warning("webhook for job %s to %s failed (attempt %d of %d): %s", job.job_id,
                        shown, attempt, RETRIES + 1, error)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
