"""The one HTTP client: every call out over the process's shared session (ComfyUI's
REST, files and websocket, and webhook POSTs)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import ujson
from yarl import URL

from ..addresses import (
    AllowList,
    IPAddress,
    callback_refusal,
    endpoints,
    has_userinfo,
    parse_allow,
    without_userinfo,
)
from ..config import Settings, Timing
from ..core.answers import Raw, history_entry, json_document, parse_queue, queue_snapshot
from ..core.ports import QueueSnapshot, Submitted
from ..errors import (
    ApiError,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    CallbackNotAllowed,
)
from ..jsonio import dumps

log = logging.getLogger(__name__)

JSON_HEADERS = {"Content-Type": "application/json"}
STREAM_BODY_BYTES = 1 << 20

# REST connections allowed per ComfyUI, on top of its one long-lived websocket.
REST_CONNECTIONS_PER_GPU = 32
# ComfyUI sends full-size PNGs over the socket (SaveImageWebsocket): frames of
# 8 MiB and more happen, past aiohttp's 4 MiB default.
WS_MAX_MSG_SIZE = 256 * 1024 * 1024


@contextlib.asynccontextmanager
async def open_session(num_gpus: int, timing: Timing) -> AsyncIterator[aiohttp.ClientSession]:
    """The process's one ClientSession, closed on exit; sized so that each GPU's
    websocket never starves its REST calls of connections."""
    per_gpu = REST_CONNECTIONS_PER_GPU + 1
    connector = aiohttp.TCPConnector(limit=per_gpu * num_gpus, limit_per_host=per_gpu)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, connect=timing.connect_timeout,
                                      sock_connect=timing.connect_timeout))
    try:
        yield session
    finally:
        await session.close()


class ComfyClient:
    """One ComfyUI instance. Transport failures become BackendUnavailable (502) or
    BackendTimeout (504); answers Cylindria does not understand, BackendError."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str,
                 request_timeout: float, decode: Decoder | None = None) -> None:
        self._session = session
        # Large answers (a queue or history holding big workflows) may be decoded off
        # the event loop.
        self._decode = decode or _decode_here
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._urls: dict[str, URL] = {}
        # Told (endpoint, seconds) after each REST call, answered or not (for /metrics).
        self.observe: Callable[[str, float], None] | None = None

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    @contextlib.contextmanager
    def _transport_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except TimeoutError:
            raise BackendTimeout(
                f"ComfyUI at {self.base_url} did not answer {what} in time; it may be busy "
                "or hung. Retry later.") from None
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(
                f"ComfyUI at {self.base_url} is unreachable ({exc.__class__.__name__}: "
                f"{exc}); check that it runs.") from None

    async def _request(self, method: str, path: str, *, json_body: Any = None,
                       body: bytes | Parts | None = None, timeout: float | None = None,
                       ok: tuple[int, ...] = (200,), read: Callable[..., Any] = json_document,
                       args: tuple[Any, ...] = ()) -> tuple[int, Any]:
        """One request with a JSON body (`json_body` to encode, or `body` encoded
        already); returns (status, `read(answer, *args)` or None for no JSON answer).
        `read` is a plain function (core/answers.py): a large answer is read in the
        worker process, so only what it returns comes back to the loop."""
        kwargs: dict[str, Any] = {}
        if json_body is not None:
            body = dumps(json_body).encode()
        if body is not None:
            kwargs["data"] = body
            kwargs["headers"] = JSON_HEADERS
        client_timeout = _timeout(timeout) if timeout is not None else self.timeout
        url = self._urls.get(path)
        if url is None:
            # Parsed once: aiohttp takes a URL object as it is.
            url = URL(self.url(path))
            if path.count("/") == 1:  # a fixed endpoint, not one per prompt
                self._urls[path] = url
        started = time.perf_counter()
        with self._transport_errors(f"{method} {path}"), self._timed(path, started):
            async with self._session.request(method, url, timeout=client_timeout,
                                             **kwargs) as resp:
                raw = await _read_answer(resp)
                if resp.status not in ok:
                    head = raw[0] if isinstance(raw, list) else raw
                    text = head[:2000].decode("utf-8", "replace").strip()[:500]
                    raise BackendError(
                        f"ComfyUI at {self.base_url} answered {method} {path} with HTTP "
                        f"{resp.status}: {text or '(empty body)'}",
                        extra={"upstream_status": resp.status})
                if not raw or resp.content_type != "application/json":
                    return resp.status, None
                try:
                    return resp.status, await self._decode(read, raw, *args)
                except ValueError:
                    raise BackendError(
                        f"ComfyUI at {self.base_url} sent invalid JSON for {method} {path}."
                    ) from None

    @contextlib.contextmanager
    def _timed(self, path: str, started: float) -> Iterator[None]:
        try:
            yield
        finally:
            if self.observe is not None:
                # The endpoint, never the prompt id: /history/{id} counts as /history.
                self.observe("/" + path.split("/")[1].split("?")[0],
                             time.perf_counter() - started)

    async def submit(self, workflow: bytes, client_id: str, prompt_id: str,
                     timeout: float) -> Submitted:
        """POST /prompt. `workflow` is the JSON document `{"prompt": ..., "extra_data":
        ...}`, sent as it is (never decoded again here: it may be large)."""
        head = dumps({"client_id": client_id, "prompt_id": prompt_id}).encode()
        # Joined only when small: a large workflow goes out in slices, never copied.
        parts = (head[:-1], b",", memoryview(workflow)[1:])
        body: bytes | Parts = (b"".join(parts) if len(workflow) < STREAM_BODY_BYTES
                               else Parts(parts))
        status, data = await self._request("POST", "/prompt", body=body, timeout=timeout,
                                           ok=(200, 400))
        if not isinstance(data, dict):
            raise BackendError(f"ComfyUI at {self.base_url} answered POST /prompt with "
                               f"HTTP {status} and no JSON body.")
        return Submitted(accepted=status == 200, body=data)

    async def queue(self) -> QueueSnapshot:
        _, snapshot = await self._request("GET", "/queue", read=queue_snapshot)
        return snapshot if snapshot is not None else parse_queue({})

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry, or None while ComfyUI has none (unknown, pending, running)."""
        _, entry = await self._request("GET", f"/history/{prompt_id}", read=history_entry,
                                       args=(prompt_id,))
        return entry

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

    async def upload(self, path: str, name: str, media_type: str, subfolder: str,
                     read_timeout: float) -> str:
        """POST /upload/image: the file at `path`, streamed from disk (ComfyUI takes any
        kind of file there). Returns the name a workflow gives it, "<subfolder>/<name>":
        ComfyUI keeps an identical file it has under that name, and renames the upload
        when the name holds other bytes."""
        started = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=None, sock_read=read_timeout)
        handle = await asyncio.to_thread(open, path, "rb")
        try:
            form = aiohttp.FormData()
            form.add_field("image", handle, filename=name, content_type=media_type)
            form.add_field("type", "input")
            form.add_field("subfolder", subfolder)
            with self._transport_errors("POST /upload/image"), \
                    self._timed("/upload", started):
                async with self._session.post(self.url("/upload/image"), data=form,
                                              timeout=timeout) as resp:
                    raw = await resp.read()
                    if resp.status != 200 or resp.content_type != "application/json":
                        raise BackendError(
                            f"ComfyUI at {self.base_url} refused the upload of {name} with "
                            f"HTTP {resp.status}.", extra={"upstream_status": resp.status})
        finally:
            await asyncio.to_thread(handle.close)
        try:
            answer = ujson.loads(raw)
            stored = str(answer["name"])
            folder = str(answer.get("subfolder") or "")
        except (ValueError, KeyError, TypeError):
            raise BackendError(f"ComfyUI at {self.base_url} answered an upload with "
                               "something other than the name it stored.") from None
        return f"{folder}/{stored}" if folder else stored

    @contextlib.asynccontextmanager
    async def view(self, params: dict[str, str], headers: dict[str, str],
                   read_timeout: float) -> AsyncIterator[aiohttp.ClientResponse]:
        """ComfyUI's answer to GET /view, to be streamed by the caller; a failure while
        reading its body raises the same errors as the request itself."""
        # No total timeout: a large file may take long; a stalled read still ends.
        timeout = aiohttp.ClientTimeout(total=None, sock_read=read_timeout)
        with self._transport_errors("GET /view"):
            async with self._session.get(self.url("/view"), params=params, headers=headers,
                                         timeout=timeout) as resp:
                yield resp

    def websocket(self, client_id: str, heartbeat: float, close_timeout: float
                  ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientWebSocketResponse]:
        """The event socket; ComfyUI sends a client's events to the socket registered
        with its clientId."""
        scheme = "wss" if self.base_url.startswith("https") else "ws"
        url = f"{scheme}{self.base_url[self.base_url.index(':'):]}/ws?clientId={client_id}"
        return self._session.ws_connect(
            # Frames come as bytes: decoding a large one to text would hold the loop, and
            # the JSON reader takes UTF-8 as it is.
            url, heartbeat=heartbeat, max_msg_size=WS_MAX_MSG_SIZE, autoping=True,
            decode_text=False,
            timeout=aiohttp.ClientWSTimeout(ws_close=close_timeout))


# decode(read, raw, *args): read(raw, *args), on the loop or off it (core/reading.py).
Decoder = Callable[..., Awaitable[Any]]


async def _decode_here(read: Callable[..., Any], raw: Raw, *args: Any) -> Any:
    return read(raw, *args)


async def _read_answer(resp: aiohttp.ClientResponse) -> Raw:
    """The body of `resp`: one buffer, or for a large one the chunks it came in (joining
    them would copy megabytes on the event loop; the reader joins them off it)."""
    length = resp.content_length
    if length is not None and length <= STREAM_BODY_BYTES:
        return await resp.read()
    chunks = [chunk async for chunk in resp.content.iter_any()]
    return chunks[0] if len(chunks) == 1 else chunks if chunks else b""


class Parts(aiohttp.Payload):
    """A request body made of buffers, sent slice by slice and never joined: a large
    workflow goes out without a copy that would hold the event loop."""

    SLICE = 256 * 1024

    def __init__(self, parts: Sequence[bytes | memoryview]) -> None:
        super().__init__(parts, content_type="application/json")
        self._parts = tuple(parts)
        self._size = sum(len(part) for part in self._parts)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._parts).decode(encoding, errors)

    async def write(self, writer: Any) -> None:
        for part in self._parts:
            view = memoryview(part)
            for start in range(0, len(view), self.SLICE):
                await writer.write(view[start:start + self.SLICE])


@functools.lru_cache(maxsize=16)
def _timeout(total: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=total)


# Why a callback URL with credentials is refused; it never repeats them.
USERINFO_REFUSAL = (
    "X-Callback-Url must not carry a user name or password (user:password@host): Cylindria "
    "would keep them and show them in /jobstatus. Leave them out; to tell Cylindria's "
    "webhooks from others, check their X-Cylindria-Signature header (the operator sets "
    "CYLINDRIA_WEBHOOK_SECRET).")

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address the system's resolver gives for `host`, in its order."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)
    except UnicodeError as exc:
        # The IDNA codec refuses an empty label or one over 63 characters: no such name
        # resolves, which callers hear as they hear any other such name.
        raise OSError(f"{host!r} is not a host name ({exc})") from None
    return [ipaddress.ip_address(str(info[4][0])) for info in infos]


@dataclass(frozen=True, slots=True)
class Pinned:
    """A callback request bound to one checked address: the URL with that address as
    its host, and the Host header and TLS server name of the URL as given."""

    url: URL
    host_header: str
    server_hostname: str | None


def pin(url: URL, ip: IPAddress) -> Pinned:
    """The request for `url` that connects to `ip` and nowhere else. For https the
    certificate is still checked against the host name in `url`."""
    host = url.raw_host or ""
    named = _literal(host) is None
    return Pinned(url=url.with_host(str(ip)),
                  host_header=url.host_port_subcomponent or host,
                  server_hostname=host.rstrip(".") if named and url.scheme == "https" else None)


def _literal(host: str) -> IPAddress | None:
    """`host` as an address when it is one, without an IPv6 zone: a URL's zone cannot
    be trusted to mean this machine's interface, and the address is what is checked."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return ipaddress.IPv6Address(int(ip)) if isinstance(ip, ipaddress.IPv6Address) else ip


class CallbackClient:
    """POSTs to the callback URLs clients gave, over the same session. The host is
    resolved here and every address it has is checked; the request then connects to a
    checked address (never to the name, which could resolve elsewhere a moment later)
    and never follows a redirect."""

    # How refusals name the URL, and the error they raise.
    WHAT = "X-Callback-Url"
    WHO = "callbacks"
    REFUSAL: type[ApiError] = CallbackNotAllowed

    def __init__(self, session: aiohttp.ClientSession, allow: AllowList,
                 own: Sequence[tuple[str, int, str]], resolve_timeout: float,
                 resolver: Resolver = resolve) -> None:
        self._session = session
        self._allow = allow
        # (host, port, label) of each service callbacks must never reach.
        self._own = tuple(own)
        self._resolve_timeout = resolve_timeout
        self._resolver = resolver

    @classmethod
    def for_settings(cls, session: aiohttp.ClientSession, settings: Settings) -> CallbackClient:
        """The client for this service: its GPUs' ComfyUIs and its own listening address
        are out of bounds, and the operator's CYLINDRIA_CALLBACK_ALLOW applies."""
        own = [(URL(url).raw_host or "", URL(url).port or 0, f"GPU {n}'s ComfyUI")
               for n, url in enumerate(settings.gpu_urls)]
        own.append((settings.host, settings.port, "Cylindria itself"))
        return cls(session, parse_allow(settings.callback_allow), own,
                   settings.timing.connect_timeout)

    async def check(self, url: str) -> None:
        """Raise CallbackNotAllowed unless a callback to `url` may be sent: it carries no
        credentials, and its host resolves to addresses the policy allows."""
        target = _target(url)
        try:
            await self._addresses(url, target, self._resolve_timeout)
        except OSError as exc:  # TimeoutError included
            log.debug("callback host %s does not resolve: %s", target.host, exc)
            raise CallbackNotAllowed(
                f"X-Callback-Url {url} names the host {target.host}, which does not resolve; "
                "give a host name or address that resolves to a public address.") from None

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   timeout: float) -> int:
        """The HTTP status of the answer. CallbackNotAllowed when `url` may not be called
        (now); transport failures raise aiohttp.ClientError, TimeoutError or OSError."""
        target = _target(url)
        async with asyncio.timeout(timeout):
            addresses = await self._addresses(url, target, timeout)
            for ip in addresses[:-1]:
                try:
                    return await self._send(pin(target, ip), body, headers)
                except aiohttp.ClientConnectorError as exc:
                    # Nothing was sent: the next address may take the request.
                    log.debug("callback to %s: %s did not connect (%s)", url, ip, exc)
            return await self._send(pin(target, addresses[-1]), body, headers)

    async def _send(self, pinned: Pinned, body: bytes, headers: dict[str, str]) -> int:
        async with self._session.post(pinned.url, data=body,
                                      headers={**headers, "Host": pinned.host_header},
                                      server_hostname=pinned.server_hostname,
                                      allow_redirects=False) as resp:
            return resp.status

    async def _addresses(self, url: str, target: URL, timeout: float) -> list[IPAddress]:
        """Every address of `target`'s host, each one checked; OSError when the host does
        not resolve in `timeout` seconds."""
        host, port = target.raw_host or "", target.port or 0
        async with asyncio.timeout(timeout):
            addresses = await self._lookup(host, port)
            forbidden = [end for own_host, own_port, label in self._own
                         for ip in await self._own_addresses(own_host, own_port)
                         for end in endpoints(ip, own_port, label)]
        if not addresses:
            raise OSError(f"{host} has no address")
        for ip in addresses:
            reason = callback_refusal(host, ip, port, self._allow, forbidden, self.WHO)
            if reason is not None:
                raise self.REFUSAL(f"{self.WHAT} {url} {reason}")
        return addresses

    async def _lookup(self, host: str, port: int) -> list[IPAddress]:
        literal = _literal(host)
        if literal is not None:
            return [literal]
        found: list[IPAddress] = []
        for ip in await self._resolver(host, port):
            bare = _literal(str(ip))
            if bare is not None and bare not in found:
                found.append(bare)
        return found

    async def _own_addresses(self, host: str, port: int) -> list[IPAddress]:
        try:
            return await self._lookup(host, port)
        except OSError as exc:
            # A callback resolved now cannot reach a name that does not resolve now.
            log.debug("%s does not resolve, so no callback can reach it: %s", host, exc)
            return []


def _target(url: str) -> URL:
    """`url` parsed as aiohttp will read it; CallbackNotAllowed when it carries
    credentials or is no http(s) URL that parser takes (it is stricter than urlsplit)."""
    if has_userinfo(url):
        raise CallbackNotAllowed(USERINFO_REFUSAL)
    try:
        target = URL(url)
    except ValueError:
        target = None
    if (target is None or target.scheme not in ("http", "https") or not target.raw_host
            or target.user is not None or target.password is not None):
        raise CallbackNotAllowed(f"X-Callback-Url {without_userinfo(url)[:200]!r} is not an "
                                 "http:// or https:// URL Cylindria can call.")
    return target
