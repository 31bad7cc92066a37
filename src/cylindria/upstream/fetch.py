"""Input files given by URL: fetched into the input store under the webhooks' address
policy, each redirect checked again."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urljoin

import aiohttp
from yarl import URL

from ..addresses import has_userinfo, without_userinfo
from ..errors import ApiError, BodyTooLarge, InputUnavailable
from ..store.inputs import InputStore, StoredInput, media_type_for
from .comfy import CallbackClient, pin

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
CHUNK = 256 * 1024


class InputFetcher(CallbackClient):
    """GETs input URLs over the shared session. Like a webhook, a request connects only
    to an address checked against the policy (CYLINDRIA_CALLBACK_ALLOW opens private
    ones); a redirect is followed only after its target is checked the same way."""

    WHAT = "The input URL"
    WHO = "input URLs"
    REFUSAL = InputUnavailable

    async def fetch(self, url: str, name: str, store: InputStore, limit: int,
                    timeout: float) -> StoredInput:
        """The file at `url`, in the store; InputUnavailable (422) saying why not."""
        try:
            async with asyncio.timeout(timeout):
                return await self._follow(url, name, store, limit, timeout)
        except TimeoutError:
            raise self._failed(name, url, f"it did not arrive within {timeout:g} s") from None
        except BodyTooLarge:
            raise self._failed(name, url, f"it is more than {limit} bytes "
                                          "(CYLINDRIA_INPUT_MAX)") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self._failed(name, url, f"it could not be fetched "
                                          f"({exc.__class__.__name__})") from None

    async def _follow(self, url: str, name: str, store: InputStore, limit: int,
                      timeout: float) -> StoredInput:
        client_timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout,
                                               sock_connect=self._resolve_timeout)
        for _ in range(MAX_REDIRECTS + 1):
            target = self._checked_target(name, url)
            try:
                addresses = await self._addresses(url, target, self._resolve_timeout)
            except ApiError as exc:
                raise InputUnavailable(f"Input {name!r}: {exc.message}",
                                       extra={"input": name}) from None
            pinned = pin(target, addresses[0])
            async with self._session.get(
                    pinned.url, headers={"Host": pinned.host_header},
                    server_hostname=pinned.server_hostname, allow_redirects=False,
                    timeout=client_timeout, auto_decompress=False) as resp:
                if resp.status in REDIRECTS and "Location" in resp.headers:
                    url = urljoin(url, resp.headers["Location"])
                    continue
                if resp.status != 200:
                    raise self._failed(name, url, f"it answered HTTP {resp.status}")
                if resp.headers.get("Content-Encoding", "identity") != "identity":
                    raise self._failed(name, url, "it sent the file compressed "
                                                  f"({resp.headers['Content-Encoding']})")
                if (resp.content_length or 0) > limit:
                    raise BodyTooLarge("")
                media_type = media_type_for(resp.headers.get("Content-Type"), name)
                entry, _ = await store.add(resp.content.iter_chunked(CHUNK), media_type,
                                           name, limit)
                return entry
        raise self._failed(name, url, f"it redirected more than {MAX_REDIRECTS} times")

    def _checked_target(self, name: str, url: str) -> URL:
        if has_userinfo(url):
            raise InputUnavailable(f"Input {name!r}: the URL must not carry a user name or "
                                   "password.", extra={"input": name})
        try:
            target = URL(url)
        except ValueError:
            target = None
        if target is None or target.scheme not in ("http", "https") or not target.raw_host:
            raise InputUnavailable(f"Input {name!r}: {without_userinfo(url)[:200]!r} is not "
                                   "an http:// or https:// URL.", extra={"input": name})
        return target

    def _failed(self, name: str, url: str, why: str) -> InputUnavailable:
        return InputUnavailable(f"Input {name!r} from {without_userinfo(url)[:200]}: {why}. "
                                "Check the URL, or upload the file with POST /inputs/.",
                                extra={"input": name})
