"""Facts about host names and addresses, as plain functions on their values."""

from __future__ import annotations

import ipaddress
import socket

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
