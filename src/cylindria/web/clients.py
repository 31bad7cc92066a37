"""The client address of a request: the peer's, or the one its trusted proxies name."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aiohttp import hdrs, web

from ..addresses import IPAddress, IPNetwork, plain

# Not aiohttp-remotes (1.4.0), whose middlewares each miss part of what the throttles
# need. XForwardedRelaxed and ForwardedRelaxed believe the header from any peer, so a
# client connecting directly could name any address. XForwardedStrict and
# ForwardedStrict want exactly one header entry per configured hop and answer 400
# otherwise: to every peer that is not a proxy, and to every client that sends an
# X-Forwarded-For of its own (nginx appends to it). XForwardedFiltered walks from the
# right as wanted, but never looks at the peer either, and answers 400 when any entry
# (even one the client wrote) is not an address, or when the header comes twice. All of
# them also take the request's host and scheme from the headers (X-Forwarded-Host and
# -Proto, Forwarded's host= and proto=), which would change what the dashboard's origin
# check compares. The RFC 7239 syntax is
# aiohttp's own `request.forwarded`; only the walk along the hops is here.

_PORT = re.compile(r":([0-9]{1,5})", re.ASCII)


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """The proxies whose X-Forwarded-For and Forwarded headers are believed
    (CYLINDRIA_TRUSTED_PROXIES)."""

    networks: tuple[IPNetwork, ...] = ()

    def trusts(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.networks)

    def client(self, hops: Sequence[str | None]) -> IPAddress | None:
        """The right-most hop that is not a trusted proxy, or the left-most when all
        are; None when there are no hops or one read before that is not an address
        (nothing then says who the client is).

        Each proxy appends the address it was connected from, so the hops right of the
        client were written by trusted proxies, and those left of it by the client.
        """
        found = None
        for hop in reversed(hops):
            found = node_address(hop)
            if found is None:
                return None
            if not self.trusts(found):
                return found
        return found


TRUSTED_PROXIES: web.AppKey[TrustedProxies] = web.AppKey("trusted_proxies", TrustedProxies)


def node_address(text: str | None) -> IPAddress | None:
    """The address in one hop as proxies write it (`192.0.2.1`, `2001:db8::1`, with a
    port `192.0.2.1:80` or `[2001:db8::1]:80`); None for anything else, such as
    RFC 7239's `unknown` and obfuscated names."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):
        host, closed, port = text[1:].partition("]")
        if not closed or (port and not _is_port(port)):
            return None
    elif text.count(":") == 1:
        host, port = text.split(":")
        if not _is_port(":" + port):
            return None
    else:
        host = text
    try:
        return plain(ipaddress.ip_address(host))
    except ValueError:
        return None


def _is_port(text: str) -> bool:
    """Whether `text` is a colon and a port number."""
    match = _PORT.fullmatch(text)
    return match is not None and int(match[1]) <= 65535


def x_forwarded_for(values: Iterable[str]) -> list[str | None]:
    """The hops of X-Forwarded-For, from the client to the last proxy; several header
    lines are one list, in order, as for any list header in HTTP."""
    return [hop.strip() for value in values for hop in value.split(",")]


def client_address(request: web.Request) -> str:
    """The address of the client that sent `request`: what the wrong-key throttles
    count, and what log lines name.

    From a trusted proxy, the right-most address of X-Forwarded-For (or, without that
    header, of Forwarded's `for=`) that is not a trusted proxy itself. A header that
    does not say (a hop that is not an address, an empty one) leaves the proxy's own
    address, so no header value can name an address no proxy vouched for, or fail the
    request. From any other peer those headers are ignored: anyone can send them.
    """
    peer = node_address(request.remote)
    if peer is None:
        return request.remote or "-"
    proxies = request.app[TRUSTED_PROXIES]
    if not proxies.trusts(peer):
        return str(peer)
    headers = request.headers
    hops: list[str | None]
    if hdrs.X_FORWARDED_FOR in headers:
        hops = x_forwarded_for(headers.getall(hdrs.X_FORWARDED_FOR))
    elif hdrs.FORWARDED in headers:
        hops = [element.get("for") for element in request.forwarded]
    else:
        return str(peer)
    return str(proxies.client(hops) or peer)
