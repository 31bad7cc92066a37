"""JSON out: one encoder and one JSON response helper, for the service and the simulator."""

from __future__ import annotations

import functools
import json
from typing import Any

import ujson
from aiohttp import web

# Slashes stay as they are: URLs read /joboutput/..., not \/joboutput\/...
_ujson_dumps = functools.partial(ujson.dumps, escape_forward_slashes=False)


def dumps(data: Any) -> str:
    try:
        return _ujson_dumps(data)
    except OverflowError:
        # ujson gives up on some numbers Python's json (which ComfyUI uses) still writes.
        return json.dumps(data)


def json_response(data: Any, *, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=dumps)
