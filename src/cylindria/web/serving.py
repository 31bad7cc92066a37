"""Serving the app on a socket: aiohttp's runner, with idle, request-head and body
timeouts, and connection limits."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..appkeys import WAITERS
from ..config import Settings
from ..errors import CannotListen
from .connections import BACKLOG, guard

log = logging.getLogger(__name__)


class HeadTimeouts:
    """Closes each new connection that has not sent a complete request head within
    `timeout` seconds.

    aiohttp has no such limit of its own, and its keep-alive timer only starts when a
    connection opens or a response ends; this covers the first head of a connection,
    the keep-alive timer the later ones. It works on the server's public hooks
    (`connection_made`, `connection_lost`, `request_factory`, each wrapped on the
    instance) rather than on the request handler's private state, so that it has to be
    installed after the runner is set up and before any site starts.
    """

    def __init__(self, server: web.Server, timeout: float) -> None:
        self.timeout = timeout
        self._timers: dict[web.RequestHandler, asyncio.TimerHandle] = {}
        timers = self._timers
        loop = asyncio.get_running_loop()
        made, lost, factory = (server.connection_made, server.connection_lost,
                               server.request_factory)

        def connection_made(handler: web.RequestHandler, transport: asyncio.Transport
                            ) -> None:
            made(handler, transport)
            self._timers[handler] = loop.call_later(
                timeout, self._expire, handler, transport.get_extra_info("peername"))

        def connection_lost(handler: web.RequestHandler,
                            exc: BaseException | None = None) -> None:
            self._forget(handler)
            lost(handler, exc)

        # Called once a request head is complete (or found malformed, to answer 400).
        def request_factory(message: Any, payload: Any, protocol: web.RequestHandler,
                            writer: Any, task: Any) -> web.BaseRequest:
            # _forget, inline: this runs for every request.
            timer = timers.pop(protocol, None)
            if timer is not None:
                timer.cancel()
            return factory(message, payload, protocol, writer, task)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]
        server.request_factory = request_factory

    def _forget(self, handler: web.RequestHandler) -> None:
        timer = self._timers.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, handler: web.RequestHandler, peer: Any) -> None:
        self._timers.pop(handler, None)
        # DEBUG: whoever opens connections must not be able to fill the log with them.
        log.debug("closed a connection from %s: no complete request head within %g s",
                  peer, self.timeout)
        handler.force_close()


class QuietBadRequests(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server log, but a request that is not valid HTTP (anyone can send one)
    is an INFO line without a traceback, not an ERROR."""

    def exception(self, msg: object, *args: Any, exc_info: Any = True,
                  **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.info("%s: %s", msg % args if args else msg,
                      str(exc_info).replace("\n", " ")[:300])
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)


def server_options(settings: Settings) -> dict[str, Any]:
    """How the HTTP server is run, in the service and in the tests alike: bodies are
    left compressed for Cylindria to decode where it reads one (so a bad encoding gets
    a clear 4xx, never a decode inside the server), and idle connections time out."""
    return {"keepalive_timeout": settings.timing.keepalive_timeout,
            "auto_decompress": False,
            "logger": QuietBadRequests(logging.getLogger("aiohttp.server"), {})}


def listen_error(host: str, port: int, exc: OSError) -> str:
    """One line for an address that cannot be served on."""
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    hint = ("something else is listening there: stop it, or choose another port"
            if exc.errno == errno.EADDRINUSE else "check the address")
    return f"cannot listen on {host}:{port} ({reason}): {hint}"


async def start_server(app: web.Application, settings: Settings, *,
                       access_log: logging.Logger | None = None) -> web.AppRunner:
    """Set `app` up and serve it on `settings.host`:`settings.port`, as `cylindria serve`
    does; `runner.cleanup()` stops it."""
    timing = settings.timing
    runner = web.AppRunner(app, access_log=access_log, **server_options(settings))
    try:
        # Inside: a start-up that fails half-way still closes what it opened.
        await runner.setup()
        server = runner.server
        if server is None:  # setup() made it; the type allows None only before that
            raise RuntimeError("aiohttp's runner has no server after setup()")
        HeadTimeouts(server, timing.head_timeout)
        # After HeadTimeouts: a connection refused at once never gets its timer.
        guard(server, settings)
        # Requests waiting with ?wait= give their slot back as their client leaves.
        app[WAITERS].watch(server)
        site = web.TCPSite(runner, settings.host, settings.port, backlog=BACKLOG)
        try:
            await site.start()
        except OSError as exc:
            raise CannotListen(listen_error(settings.host, settings.port, exc)) from None
    except BaseException:
        await runner.cleanup()
        raise
    return runner
