"""Nodes sharing a PostgreSQL database: requests to another node of the cluster, over the
process's one ClientSession (a job's output or event stream asked of the node that holds
it, streamed; a retry passed to it, answered whole)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from ..core.ports import HeldElsewhere
from ..errors import BackendTimeout, BackendUnavailable

# What a node puts on a request it passes to another node: its own name. A request that
# carries it is never passed on again, so two nodes cannot send one back and forth.
FORWARDED = "X-Cylindria-Forwarded"
# The most of another node's JSON answer that is read (a retry's answer is far smaller).
ANSWER_MAX = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PeerAnswer:
    """Another node's whole JSON answer: its status, body and Retry-After."""

    status: int
    body: bytes
    retry_after: str | None


def holder_url(held: HeldElsewhere) -> str:
    """The URL of the node that holds a job; BackendUnavailable (502) when it has none
    on record (no row in `nodes`)."""
    if held.advertise_url is None:
        raise BackendUnavailable(
            f"Job {held.job.job_id!r} is held by node {held.node}, which has no URL on "
            "record: ask that node directly.", extra={"node": held.node})
    return held.advertise_url


class PeerClient:
    """This node (`node`) asking the others; with the service's API key, which the nodes
    of one cluster share."""

    def __init__(self, session: aiohttp.ClientSession, node: str, api_key: str | None,
                 read_timeout: float) -> None:
        self._session = session
        self.node = node
        self._api_key = api_key
        self._read_timeout = read_timeout

    @contextlib.asynccontextmanager
    async def request(self, method: str, peer: str, base_url: str, path: str,
                      headers: dict[str, str], body: bytes | None = None,
                      read_timeout: float | None = None
                      ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Node `peer`'s answer to `method` `path` at `base_url`, to be read by the
        caller. Unreachable: BackendUnavailable (502); silent for `read_timeout` seconds
        (the client's request timeout by default): BackendTimeout (504), also when it
        fails while its body is read."""
        sent = {**headers, FORWARDED: self.node}
        if self._api_key:
            sent["X-API-Key"] = self._api_key
        read = self._read_timeout if read_timeout is None else read_timeout
        # No total timeout: a large file or a stream may take long; a stalled read ends.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._read_timeout,
                                        sock_read=read)
        url = base_url.rstrip("/") + path
        try:
            async with self._session.request(method, url, headers=sent, data=body,
                                             timeout=timeout,
                                             allow_redirects=False) as resp:
                yield resp
        except TimeoutError:
            raise BackendTimeout(
                f"Node {peer} at {base_url} did not answer {method} {path} in time; it "
                "may be busy. Retry later, or ask that node directly.") from None
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(
                f"Node {peer}, which holds the job, cannot be reached at {base_url} "
                f"({exc.__class__.__name__}: {exc}); check that it runs (GET /gpus/ shows "
                "which nodes are alive), or ask it directly.",
                extra={"node": peer}) from None

    def get(self, peer: str, base_url: str, path: str, headers: dict[str, str]
            ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """GET, to be streamed by the caller (see `request`)."""
        return self.request("GET", peer, base_url, path, headers)

    async def call(self, method: str, peer: str, base_url: str, path: str,
                   headers: dict[str, str], body: bytes | None = None,
                   wait: float = 0.0) -> PeerAnswer:
        """Node `peer`'s whole JSON answer to a request; `wait`: seconds the other node
        may take on top of the usual timeout (a request with ?wait=)."""
        async with self.request(method, peer, base_url, path, headers, body,
                                self._read_timeout + wait) as resp:
            return await read_answer(peer, resp)


async def read_answer(peer: str, resp: aiohttp.ClientResponse) -> PeerAnswer:
    """Another node's JSON answer, read whole (at most ANSWER_MAX bytes); anything else
    is BackendUnavailable (502), since a node always answers in JSON."""
    if resp.content_type != "application/json":
        raise BackendUnavailable(
            f"Node {peer} answered HTTP {resp.status} with {resp.content_type!r} instead "
            "of JSON; is its --advertise-url a Cylindria?", extra={"node": peer})
    body = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > ANSWER_MAX:
            raise BackendUnavailable(
                f"Node {peer} answered with over {ANSWER_MAX // 2**20} MiB of JSON.",
                extra={"node": peer})
    return PeerAnswer(resp.status, bytes(body), resp.headers.get("Retry-After"))
