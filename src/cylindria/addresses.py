"""Facts about host names and addresses, as plain functions on their values."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

LOCALHOST_NAMES = frozenset({"localhost", "localhost.localdomain"})


def is_loopback(host: str | None) -> bool:
    """Whether `host` names this machine's loopback interface."""
    if not host:
        return False
    if host in LOCALHOST_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bracket(host: str) -> str:
    """`host` as it stands in a URL: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


def ports_free(host: str, base: int, count: int) -> bool:
    """Whether ports base..base+count-1 on `host` can all be bound right now."""
    socks: list[socket.socket] = []
    try:
        for port in range(base, base + count):
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            socks.append(sock)
            sock.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        for sock in socks:
            sock.close()


def free_port_run(count: int, host: str = "127.0.0.1", tries: int = 50) -> int:
    """A base port such that base..base+count-1 are all free on `host` right now."""
    for _ in range(tries):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
            base = probe.getsockname()[1]
        if base + count <= 65536 and ports_free(host, base, count):
            return base
    raise OSError(f"no run of {count} free ports found on {host}")


# -- where callbacks may go ---------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network
PUBLIC_ADVICE = ("{who} may only go to public addresses, or to hosts the operator lists "
                 "in CYLINDRIA_CALLBACK_ALLOW.")
OWN_ADVICE = "{who} never go to this service's ComfyUIs or to Cylindria itself."
# The first row holding an address names what it is. An IPv4 address inside IPv6
# (mapped, NAT64, 6to4) is judged as that IPv4 address.
REFUSED: tuple[tuple[IPNetwork, str], ...] = (
    (_V4("0.0.0.0/8"), "an unspecified address"),
    (_V4("127.0.0.0/8"), "a loopback address"),
    (_V4("169.254.0.0/16"), "a link-local address"),
    (_V4("10.0.0.0/8"), "a private address"),
    (_V4("172.16.0.0/12"), "a private address"),
    (_V4("192.168.0.0/16"), "a private address"),
    # Shared address space: carrier-grade NAT, and some clouds' internal services
    # (one cloud's metadata service is 100.100.100.200); never a public endpoint.
    (_V4("100.64.0.0/10"), "a private address"),
    (_V4("224.0.0.0/4"), "a multicast address"),
    (_V4("240.0.0.0/4"), "a reserved address"),  # and 255.255.255.255, broadcast
    (_V4("192.0.0.0/24"), "a reserved address"),  # IETF protocol assignments
    (_V4("192.0.2.0/24"), "a reserved address"),  # documentation
    (_V4("198.51.100.0/24"), "a reserved address"),
    (_V4("203.0.113.0/24"), "a reserved address"),
    (_V4("198.18.0.0/15"), "a reserved address"),  # benchmarking
    (_V4("192.88.99.0/24"), "a reserved address"),  # the retired 6to4 relay anycast
    (_V6("::/128"), "an unspecified address"),
    (_V6("::1/128"), "a loopback address"),
    (_V6("fe80::/10"), "a link-local address"),
    (_V6("fc00::/7"), "a private address"),  # unique local
    # Site-local is deprecated, but networks that still use it mean it as internal.
    (_V6("fec0::/10"), "a private address"),
    (_V6("64:ff9b:1::/48"), "a private address"),  # NAT64 for local use
    (_V6("ff00::/8"), "a multicast address"),
    (_V6("2001::/23"), "a reserved address"),  # IETF protocol assignments, Teredo
    (_V6("2001:db8::/32"), "a reserved address"),  # documentation
    (_V6("3fff::/20"), "a reserved address"),  # documentation
)
# Every public IPv6 unicast address lies here; the rest is reserved or special.
GLOBAL_UNICAST_V6 = _V6("2000::/3")
NAT64 = _V6("64:ff9b::/96")
SIX_TO_FOUR = _V6("2002::/16")
# The ways to reach a service listening on this machine without knowing its addresses.
THIS_MACHINE: tuple[IPNetwork, ...] = (_V4("127.0.0.0/8"), _V4("0.0.0.0/32"),
                                       _V6("::1/128"), _V6("::/128"))
EVERYWHERE: tuple[IPNetwork, ...] = (_V4("0.0.0.0/0"), _V6("::/0"))
HOST_LABEL_RE = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)", re.ASCII)


@dataclass(frozen=True, slots=True)
class AllowList:
    """Destinations the operator lets callbacks reach whatever their address: host
    names (lower case, without a trailing dot) and networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    def allows(self, host: str, ip: IPAddress) -> bool:
        if host_key(host) in self.hosts:
            return True
        candidates = {ip, plain(ip)}
        return any(a.version == net.version and a in net
                   for net in self.networks for a in candidates)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An address and port callbacks never reach, whatever the allow list says."""

    network: IPNetwork
    port: int
    label: str


def host_key(host: str) -> str:
    """A host name as the allow list compares it: case and a final dot do not count."""
    return host.lower().removesuffix(".")


def plain(ip: IPAddress) -> IPAddress:
    """`ip` without an IPv6 scope, and an IPv4-mapped IPv6 address as its IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        bare = ipaddress.IPv6Address(int(ip))
        return bare.ipv4_mapped or bare
    return ip


def parse_allow(entries: Iterable[str]) -> AllowList:
    """The allow list from its entries: CIDRs, bare addresses (one address each) and
    host names. Raises ValueError naming the first entry that is none of these."""
    hosts: set[str] = set()
    networks: list[IPNetwork] = []
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        try:
            # Host bits are forgiven: 10.1.2.3/8 means 10.0.0.0/8, as in most firewalls.
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        if not is_host_name(entry):
            raise ValueError(entry)
        hosts.add(host_key(entry))
    return AllowList(frozenset(hosts), tuple(networks))


def trusted_networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """The trusted proxies as networks (an address is a network of one). Raises
    ValueError naming the first entry that is neither an address nor a CIDR."""
    networks: list[IPNetwork] = []
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        try:
            # Strict, unlike the callback allow list: a trust wider than was written
            # (10.1.2.3/8 read as 10.0.0.0/8) would let more hosts name any client.
            networks.append(ipaddress.ip_network(entry))
        except ValueError:
            raise ValueError(entry) from None
    return tuple(networks)


def is_host_name(text: str) -> bool:
    """Whether `text` is an ASCII host name (punycode for international names)."""
    name = text.removesuffix(".")
    return (0 < len(name) <= 253
            and all(HOST_LABEL_RE.fullmatch(label) for label in name.lower().split(".")))


def address_kind(ip: IPAddress) -> str | None:
    """What makes `ip` no place for a callback ("a loopback address"), or None when it
    is a public address."""
    ip = plain(ip)
    for network, kind in REFUSED:
        if ip.version == network.version and ip in network:
            return kind
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in NAT64:
            return address_kind(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in SIX_TO_FOUR and ip.sixtofour is not None:
            return address_kind(ip.sixtofour)
        if ip not in GLOBAL_UNICAST_V6:
            return "a reserved address"
    return None


def endpoints(ip: IPAddress, port: int, label: str) -> tuple[Endpoint, ...]:
    """Where callbacks must not go to stay away from a service at `ip`:`port`. On
    loopback that is the port on every loopback address and on the unspecified one (a
    server bound to all addresses answers on each); for a service bound to all
    addresses, which this code cannot list, the port on every address."""
    ip = plain(ip)
    if ip.is_unspecified:
        networks = THIS_MACHINE + EVERYWHERE
    elif ip.is_loopback:
        networks = THIS_MACHINE
    else:
        networks = (ipaddress.ip_network(ip),)
    return tuple(Endpoint(network, port, label) for network in networks)


def callback_refusal(host: str, ip: IPAddress, port: int, allow: AllowList,
                     forbidden: Iterable[Endpoint], who: str = "callbacks") -> str | None:
    """Why a callback (or another call out: `who` names them) to `host`, connecting to
    `ip`:`port`, must not be sent, as the end of a sentence that begins with its URL;
    None when it may be sent."""
    bare = plain(ip)
    for end in forbidden:
        if port == end.port and bare.version == end.network.version and bare in end.network:
            return (f"points at {end.label} ({bracket(str(bare))}:{port}); "
                    + OWN_ADVICE.format(who=who))
    if allow.allows(host, ip):
        return None
    kind = address_kind(bare)
    if kind is None:
        return None
    return f"points at {kind} ({bare}); " + PUBLIC_ADVICE.format(who=who)


def without_userinfo(url: str) -> str:
    """`url` with any user name and password taken out of its authority, for showing."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(not a URL)"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def same_host(a: str, b: str) -> bool:
    """Whether two listening addresses may be one host (a wildcard is every host)."""
    if a == b:
        return True
    wildcard = {"0.0.0.0", "::", ""}
    if a in wildcard or b in wildcard:
        return True
    return is_loopback(a) and is_loopback(b)


def has_userinfo(url: str) -> bool:
    """Whether `url` carries a user name or password (even an empty one)."""
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:
        return False


def database_url_problem(url: str) -> str | None:
    """What keeps `url` from being a PostgreSQL URL, as the end of a sentence that
    begins with its name, or None. Never quotes the URL, which may hold a password."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return "is not a URL, or its port is not a number"
    if parts.scheme not in ("postgresql", "postgres"):
        return "must start with postgresql://"
    if port == 0:
        return "has port 0"
    return None
