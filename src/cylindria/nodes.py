"""A node: one Cylindria among those sharing a PostgreSQL database, by its name and the
URL the others reach it at. Plain functions and one record; no aiohttp."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from .addresses import bracket

NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,63}")
# Seconds between two heartbeats of a node (CYLINDRIA_HEARTBEAT_INTERVAL).
DEFAULT_HEARTBEAT = 3.0
# A node whose last heartbeat is older than this many of its intervals is not alive.
GRACE_BEATS = 3
# Seconds a node may be silent (and at least GRACE_BEATS of its intervals) before
# another settles its jobs in flight as lost, once its session is gone too
# (CYLINDRIA_NODE_GRACE).
DEFAULT_NODE_GRACE = 30.0
# The settings read from the environment, by Settings field.
NODE_ENV = (("node_name", "CYLINDRIA_NODE_NAME"), ("advertise_url", "CYLINDRIA_ADVERTISE_URL"))
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node writes of itself into the database's `nodes` table."""

    name: str
    advertise_url: str
    heartbeat_seconds: float = DEFAULT_HEARTBEAT


def default_node_name() -> str:
    """This host's name, made a valid node name (other characters become '-')."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:63]
    return name or "cylindria"


def node_name_problem(name: str) -> str | None:
    if NODE_NAME.fullmatch(name):
        return None
    return (f"--node-name / CYLINDRIA_NODE_NAME must be 1 to 63 letters, digits, '-', '_' "
            f"or '.' (got {name!r}); name this host's Cylindria, e.g. gpu-a")


def advertise_url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is no number
    except ValueError:
        parts = None
    if parts is not None and parts.scheme in ("http", "https") and parts.hostname:
        return None
    return ("--advertise-url / CYLINDRIA_ADVERTISE_URL must be an http:// or https:// URL "
            f"with a host, e.g. http://gpu-a.example.com:8000 (got {url!r})")


def advertised_url(host: str, port: int, given: str | None) -> str:
    """The URL other nodes are told: `given`, else http://HOST:PORT of the service, a
    wildcard host (0.0.0.0, ::) being this host's name."""
    if given:
        return given.rstrip("/")
    name = socket.gethostname() if host in WILDCARD_HOSTS else host
    return f"http://{bracket(name)}:{port}"


def gpu_name(node: str, index: int) -> str:
    """A GPU across the nodes: "gpu-a:0"."""
    return f"{node}:{index}"
