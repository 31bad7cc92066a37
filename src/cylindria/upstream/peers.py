"""Nodes sharing a PostgreSQL database: requests to another node of the cluster, over the
process's one ClientSession (a job's output asked of the node that holds it)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp

from ..errors import BackendTimeout, BackendUnavailable

# What a node puts on a request it passes to another node: its own name. A request that
# carries it is never passed on again, so two nodes cannot send one back and forth.
FORWARDED = "X-Cylindria-Forwarded"


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
    async def get(self, peer: str, base_url: str, path: str,
                  headers: dict[str, str]) -> AsyncIterator[aiohttp.ClientResponse]:
        """Node `peer`'s answer to GET `path` at `base_url`, to be streamed by the
        caller. Unreachable: BackendUnavailable (502); silent: BackendTimeout (504), also
        when it fails while its body is read."""
        sent = {**headers, FORWARDED: self.node}
        if self._api_key:
            sent["X-API-Key"] = self._api_key
        # No total timeout: a large file may take long; a stalled read still ends.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._read_timeout,
                                        sock_read=self._read_timeout)
        url = base_url.rstrip("/") + path
        try:
            async with self._session.get(url, headers=sent, timeout=timeout,
                                         allow_redirects=False) as resp:
                yield resp
        except TimeoutError:
            raise BackendTimeout(
                f"Node {peer} at {base_url} did not answer GET {path} in time; it may be "
                "busy. Retry later, or ask that node directly.") from None
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(
                f"Node {peer}, which holds the job, cannot be reached at {base_url} "
                f"({exc.__class__.__name__}: {exc}); check that it runs (GET /gpus/ shows "
                "which nodes are alive), or ask it directly.",
                extra={"node": peer}) from None
