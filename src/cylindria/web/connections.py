"""Client connections: how many one address and all clients may hold, request bodies
that must keep arriving, and log lines that stay few while either is refused."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader

from ..addresses import IPAddress
from ..config import Settings, Timing, trusted_networks
from ..errors import ApiError, BodyTimeout, ServerBusy, TooManyConnections
from ..jsonio import dumps
from ..upstream.comfy import REST_CONNECTIONS_PER_GPU
from .clients import TrustedProxies, node_address
from .render import error_body

try:
    import resource
except ImportError:  # not on every platform; the limits then assume the usual 1024
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# Descriptors kept back from client connections: the state file with its journal and
# lock, input files being written or read, the log, the listening sockets, the event
# loop's own, the worker process's pipes. ComfyUI's connections come on top, per GPU.
RESERVED_DESCRIPTORS = 64
# The listening socket's backlog, which is also how many connections asyncio accepts
# in one go before any is handled (or refused and closed): a burst of descriptors
# on top of those held. A refused connection's descriptor is closed two turns of the
# loop after its accept, by when the next batch may be accepted too: two batches are
# kept free.
BACKLOG = 128
ACCEPT_BURST = 2 * BACKLOG
# Bounds of the derived total: a large descriptor limit does not stand for more
# connections than one process on one event loop serves well.
MOST_CONNECTIONS = 10_000
FEWEST_CONNECTIONS = 16
# The derived cap per client address: this share of the total, and at least
# FEWEST_PER_ADDRESS (a browser opens 6 per host, a client library's pool more).
ADDRESS_SHARE = 8
FEWEST_PER_ADDRESS = 8
# How far the soft descriptor limit is raised toward the hard one at start.
DESCRIPTOR_CEILING = 65536
USUAL_DESCRIPTORS = 1024
# Refusals, cut bodies and failed accepts are logged once, then summed a window at a time.
LOG_WINDOW = 60.0
RETRY_AFTER = 5
# A timer may wake this early; a deadline that close has come.
_SLACK = 0.001


def descriptor_limit() -> int:
    """The process's soft RLIMIT_NOFILE: how many files and sockets it may hold open."""
    if resource is None:
        return USUAL_DESCRIPTORS
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return DESCRIPTOR_CEILING if soft == resource.RLIM_INFINITY else soft


def raise_descriptor_limit(ceiling: int = DESCRIPTOR_CEILING) -> int:
    """Raise the soft descriptor limit toward the hard one, up to `ceiling`, as the hard
    limit allows any process to; return the limit in force.

    The usual soft limit (1024) is a default for programs that use select(), which
    this one does not; a limit set on purpose (systemd's LimitNOFILE=, `ulimit -Hn`)
    sets the hard limit too, and is kept."""
    if resource is None:
        return USUAL_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.info("could not raise the file descriptor limit from %d to %d: %s", soft,
                     wanted, exc)
    return descriptor_limit()


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The client connections one server holds at once: `total` in all, and
    `per_address` from one peer address (0: no such cap)."""

    total: int
    per_address: int
    descriptors: int

    def refusal(self, held: int, held_here: int, exempt: bool) -> type[ApiError] | None:
        """Why a new connection is refused, given the connections held in all and from
        its address; None to take it. A trusted proxy's address (`exempt`) carries many
        clients: it counts toward the total only."""
        if not exempt and self.per_address and held_here >= self.per_address:
            return TooManyConnections
        if held >= self.total:
            return ServerBusy
        return None


def room_for_clients(num_gpus: int, descriptors: int) -> int:
    """The descriptors left for client connections once the service's own files,
    ComfyUI's connections (a websocket and a REST pool per GPU) and a burst of accepted
    connections not yet refused are counted."""
    return (descriptors - RESERVED_DESCRIPTORS - ACCEPT_BURST
            - (REST_CONNECTIONS_PER_GPU + 1) * num_gpus)


def connection_limits(settings: Settings, descriptors: int | None = None
                      ) -> ConnectionLimits:
    """The limits in force: those set, else derived from the descriptor limit."""
    descriptors = descriptor_limit() if descriptors is None else descriptors
    room = room_for_clients(settings.num_gpus, descriptors)
    total = settings.max_connections or max(FEWEST_CONNECTIONS,
                                            min(MOST_CONNECTIONS, room))
    per_address = settings.max_connections_per_address
    if per_address is None:
        per_address = min(total, max(FEWEST_PER_ADDRESS, total // ADDRESS_SHARE))
    return ConnectionLimits(total, per_address, descriptors)


class Summary:
    """Log lines for something anyone can cause many times: the first as it happens,
    then at most one a window, saying how many followed and the latest."""

    def __init__(self, level: int, first: str, later: str,
                 window: float = LOG_WINDOW) -> None:
        self._level, self._first, self._later, self._window = level, first, later, window
        self._count = 0
        self._latest: tuple[object, ...] = ()
        self._timer: asyncio.TimerHandle | None = None
        self.total = 0

    def note(self, *args: object) -> None:
        """One more; `args` fill the first line's placeholders, and the later's after
        the count and the window."""
        self.total += 1
        if self._timer is None:
            log.log(self._level, self._first, *args)
            self._timer = asyncio.get_running_loop().call_later(self._window, self._flush)
        else:
            self._count += 1
            self._latest = args

    def _flush(self) -> None:
        if not self._count:
            self._timer = None
            return
        log.log(self._level, self._later, self._count, self._window, *self._latest)
        self._count = 0
        self._timer = asyncio.get_running_loop().call_later(self._window, self._flush)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _peer(transport: asyncio.BaseTransport | None) -> Any:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return peer[0] if isinstance(peer, tuple) and peer else peer


def refusal_answer(error: ApiError) -> bytes:
    """A whole HTTP answer for a connection refused as it opens, before any request is
    read: the JSON error every answer has, and the connection closed."""
    body = dumps(error_body(error)).encode()
    head = (f"HTTP/1.1 {error.status} Service Unavailable\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Retry-After: {RETRY_AFTER}\r\n"
            "Cache-Control: no-store\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            "Connection: close\r\n\r\n")
    return head.encode("ascii") + body


class ConnectionCaps:
    """Refuses a new connection past the limits, with a 503 written at once and the
    connection closed before any request on it is read, and no timer started for it.

    Installed on the server's `connection_made` and `connection_lost` (wrapped on the
    instance, as HeadTimeouts is), after the other wrappers, so a refused connection
    costs nothing more."""

    def __init__(self, server: web.Server, limits: ConnectionLimits,
                 proxies: TrustedProxies) -> None:
        self.limits = limits
        self.refused = Summary(
            logging.WARNING, "refused a connection from %s: %s; refusals in the next "
            f"{LOG_WINDOW:g} s are counted in one line",
            "refused %d more connection(s) in the last %g s; the latest from %s: %s")
        self._held: dict[web.RequestHandler, IPAddress | None] = {}
        self._per_address: dict[IPAddress, int] = {}
        self._answers = {
            TooManyConnections: refusal_answer(TooManyConnections(
                f"This address holds {limits.per_address} connections to Cylindria, the "
                "most one address may. Close some or reuse them (keep-alive), then "
                "retry.")),
            ServerBusy: refusal_answer(ServerBusy(
                f"Cylindria holds {limits.total} connections, the most it takes at once. "
                f"Retry in {RETRY_AFTER} seconds."))}
        self._reasons = {
            TooManyConnections: f"it holds {limits.per_address}, the most per address "
                                "(CYLINDRIA_MAX_CONNECTIONS_PER_ADDRESS)",
            ServerBusy: f"{limits.total} are open, the most in all "
                        "(CYLINDRIA_MAX_CONNECTIONS)"}
        made, lost = server.connection_made, server.connection_lost
        loop = asyncio.get_running_loop()

        def connection_made(handler: web.RequestHandler, transport: asyncio.Transport
                            ) -> None:
            peer = _peer(transport)
            address = node_address(peer) if isinstance(peer, str) else None
            exempt = address is None or proxies.trusts(address)
            here = 0 if address is None else self._per_address.get(address, 0)
            refusal = limits.refusal(len(self._held), here, exempt)
            if refusal is not None:
                transport.write(self._answers[refusal])
                # Once the handler has started (it is made right after this returns):
                # closed before, it would find itself torn down as it starts.
                loop.call_soon(handler.force_close)
                self.refused.note(peer, self._reasons[refusal])
                return
            if exempt:
                self._held[handler] = None
            else:
                self._held[handler] = address
                self._per_address[address] = here + 1  # type: ignore[index]
            made(handler, transport)

        def connection_lost(handler: web.RequestHandler,
                            exc: BaseException | None = None) -> None:
            if handler in self._held:
                address = self._held.pop(handler)
                if address is not None:
                    left = self._per_address.pop(address) - 1
                    if left:
                        self._per_address[address] = left
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    @property
    def held(self) -> int:
        return len(self._held)


@dataclass(slots=True, eq=False)
class _Body:
    """A request body still arriving, and what has been seen of it."""

    payload: StreamReader
    started: float
    seen: int
    seen_at: float
    checked: float
    timer: asyncio.TimerHandle | None = None
    expired: bool = False


class BodyDeadlines:
    """Every request body must arrive within `body_timeout`, plus a second for each
    `body_min_rate` bytes received (Apache's mod_reqtimeout counts the same way), and
    must not stop arriving for `body_idle_timeout`.

    A body complete with its head (most API bodies) costs one check; one still arriving
    gets one timer, which wakes at its next deadline, and is dropped as the body ends.
    Past a deadline the body's reader gets BodyTimeout (a 408, and the connection closes
    since the body was not read to its end); a connection still open `body_timeout`
    later (a handler that reads no body) is closed.
    """

    def __init__(self, server: web.Server, timing: Timing) -> None:
        self.timing = timing
        self.cut = Summary(
            logging.INFO, "cut a request body from %s: %s; cuts in the next "
            f"{LOG_WINDOW:g} s are counted in one line",
            "cut the body of %d more request(s) in the last %g s; the latest from %s: %s")
        self._bodies: dict[web.RequestHandler, _Body] = {}
        self._loop = asyncio.get_running_loop()
        lost, factory = server.connection_lost, server.request_factory

        def request_factory(message: Any, payload: Any, protocol: web.RequestHandler,
                            writer: Any, task: Any) -> web.BaseRequest:
            request = factory(message, payload, protocol, writer, task)
            if not payload.is_eof():
                self._watch(protocol, payload)
            return request

        def connection_lost(handler: web.RequestHandler,
                            exc: BaseException | None = None) -> None:
            self._forget(handler)
            lost(handler, exc)

        server.request_factory = request_factory
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def _watch(self, handler: web.RequestHandler, payload: StreamReader) -> None:
        self._forget(handler)
        now = self._loop.time()
        body = _Body(payload, now, payload.total_bytes, now, now)
        self._bodies[handler] = body
        body.timer = self._loop.call_at(self._deadline(body), self._check, handler, body)
        payload.on_eof(lambda: self._done(handler, body))

    def _deadline(self, body: _Body) -> float:
        timing = self.timing
        return min(body.started + timing.body_timeout + body.seen / timing.body_min_rate,
                   body.seen_at + timing.body_idle_timeout)

    def _done(self, handler: web.RequestHandler, body: _Body) -> None:
        if self._bodies.get(handler) is body:
            self._forget(handler)

    def _forget(self, handler: web.RequestHandler) -> None:
        body = self._bodies.pop(handler, None)
        if body is not None and body.timer is not None:
            body.timer.cancel()

    def _check(self, handler: web.RequestHandler, body: _Body) -> None:
        body.timer = None
        payload = body.payload
        if self._bodies.get(handler) is not body:
            return
        if body.expired:
            # Told a while ago, and the connection is still open: nothing reads the body.
            self._forget(handler)
            handler.force_close()
            return
        if payload.is_eof() or payload.exception() is not None:
            self._forget(handler)
            return
        now = self._loop.time()
        total = payload.total_bytes
        # `_size` is not public: what arrived and waits for the handler. From the low
        # water mark on, aiohttp may have stopped reading the socket: the wait is then
        # Cylindria's, not the client's.
        held_back = getattr(payload, "_size", 0) >= payload.get_read_buffer_limits()[0]
        if held_back:
            body.started += now - body.checked
        if total > body.seen or held_back:
            body.seen, body.seen_at = total, now
        body.checked = now
        deadline = self._deadline(body)
        if deadline > now + _SLACK:
            body.timer = self._loop.call_at(deadline, self._check, handler, body)
            return
        self._expire(handler, body, now)

    def _expire(self, handler: web.RequestHandler, body: _Body, now: float) -> None:
        timing = self.timing
        if now >= body.seen_at + timing.body_idle_timeout - _SLACK:
            why = f"it stopped arriving for {timing.body_idle_timeout:g} s"
        else:
            why = (f"{body.seen} bytes came in {now - body.started:.0f} s, where "
                   f"{timing.body_timeout:g} s and a second per {timing.body_min_rate:g} "
                   "bytes received are allowed")
        body.payload.set_exception(BodyTimeout(
            f"The request body arrived too slowly ({why}); nothing of it was kept. Send "
            f"it again, at {timing.body_min_rate:g} bytes a second or faster."))
        body.expired = True
        body.timer = self._loop.call_later(timing.body_timeout, self._check, handler, body)
        self.cut.note(_peer(handler.transport), why)


class AcceptErrors:
    """accept() failing for want of descriptors: asyncio logs it with a traceback and
    tries again a second later, for as long as it lasts. Here it is a WARNING line a
    window, with the count; every other report goes to the handler there was."""

    MESSAGE = "socket.accept() out of system resource"
    RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

    def __init__(self, loop: asyncio.AbstractEventLoop, descriptors: int) -> None:
        self._loop = loop
        self._previous = loop.get_exception_handler()
        self.failed = Summary(
            logging.WARNING, "could not accept a connection: %s (file descriptor limit "
            f"{descriptors}); new connections wait meanwhile, and failures in the next "
            f"{LOG_WINDOW:g} s are counted in one line",
            "could not accept a connection %d more time(s) in the last %g s: %s")
        loop.set_exception_handler(self._handle)

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (context.get("message") == self.MESSAGE and isinstance(exc, OSError)
                and exc.errno in self.RESOURCES):
            self.failed.note(exc.strerror or str(exc))
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def close(self) -> None:
        self.failed.close()
        if self._loop.get_exception_handler() == self._handle:
            self._loop.set_exception_handler(self._previous)


def guard(server: web.Server, settings: Settings) -> ConnectionLimits:
    """Put the connection limits and the body deadlines on `server` (after HeadTimeouts,
    before any site starts); its shutdown takes them off again."""
    limits = connection_limits(settings)
    loop = asyncio.get_running_loop()
    bodies = BodyDeadlines(server, settings.timing)
    caps = ConnectionCaps(server, limits,
                          TrustedProxies(trusted_networks(settings.trusted_proxies)))
    accepts = AcceptErrors(loop, limits.descriptors)
    shutdown: Callable[..., Any] = server.shutdown

    async def shut_down(timeout: float | None = None) -> None:
        try:
            await shutdown(timeout)
        finally:
            for summary in (bodies.cut, caps.refused):
                summary.close()
            accepts.close()

    server.shutdown = shut_down  # type: ignore[method-assign]
    log.info("connections: at most %d in all and %s per client address (file descriptors: "
             "%d)", limits.total, limits.per_address or "no cap", limits.descriptors)
    room = room_for_clients(settings.num_gpus, limits.descriptors)
    if limits.total > room:
        given = (f"CYLINDRIA_MAX_CONNECTIONS={limits.total} is" if settings.max_connections
                 else f"{limits.total} connections are")
        log.warning("%s more than the file descriptor limit (%d) leaves room for with %d "
                    "GPU(s) (%d): raise the limit (LimitNOFILE=, ulimit -n)", given,
                    limits.descriptors, settings.num_gpus, max(room, 0))
    return limits
