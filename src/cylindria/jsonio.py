"""JSON out: the one encoder, and the JSON response helper, for the service and the simulator.

No non-finite number ever leaves as NaN or Infinity: those are not JSON, and one in an
answer makes strict parsers (JavaScript's JSON.parse, Go's encoding/json) refuse the
whole body. A NaN or an infinity that reaches the encoder (ComfyUI's Python writes them,
a state file from an older version may hold them) is written as a string, as the
protobuf JSON mapping does: "NaN", "Infinity" or "-Infinity". A string rather than
null, because null would erase what ComfyUI said (a NaN, an infinity of either sign,
and no value at all would read the same) and a client can map the three words back.
Requests are held to the same rule the other way: a workflow with one is refused
(core/workflow.py).
"""

from __future__ import annotations

import functools
import json
import math
from typing import TYPE_CHECKING, Any

import ujson

if TYPE_CHECKING:
    from aiohttp import web

# Slashes stay as they are: URLs read /joboutput/..., not \/joboutput\/...; and ujson
# refuses (OverflowError) rather than writes a non-finite number.
_ujson_dumps = functools.partial(ujson.dumps, escape_forward_slashes=False, allow_nan=False)
_ujson_pretty = functools.partial(ujson.dumps, indent=2, ensure_ascii=False,
                                  escape_forward_slashes=False, allow_nan=False)

NAN, INFINITY, MINUS_INFINITY = "NaN", "Infinity", "-Infinity"


def dumps(data: Any) -> str:
    """`data` as compact JSON (ASCII). The fast path is ujson's alone: only a document
    ujson refuses is walked in Python, once."""
    try:
        return _ujson_dumps(data)
    except OverflowError:
        # A non-finite number, or a number ujson gives up on that Python's json (which
        # ComfyUI uses) still writes.
        return json.dumps(finite(data), allow_nan=False, separators=(",", ":"))


def pretty(data: Any) -> str:
    """`data` as indented JSON for people to read (the dashboard), non-ASCII as is."""
    try:
        return _ujson_pretty(data)
    except OverflowError:
        return json.dumps(finite(data), allow_nan=False, indent=2, ensure_ascii=False)


def word(number: float) -> str:
    """The string a non-finite number is written as."""
    if math.isnan(number):
        return NAN
    return INFINITY if number > 0 else MINUS_INFINITY


def finite(value: Any) -> Any:
    """`value` with every non-finite float (in dicts, lists and tuples, at any depth)
    replaced by its word; containers are copied, anything else is kept as it is."""
    if isinstance(value, float):
        return value if math.isfinite(value) else word(value)
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def first_non_finite(value: Any) -> float | None:
    """The first non-finite float in `value` (searched as `finite` walks), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else value
    items = (value.values() if isinstance(value, dict)
             else value if isinstance(value, list | tuple) else ())
    for item in items:
        found = first_non_finite(item)
        if found is not None:
            return found
    return None


def json_response(data: Any, *, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    # Imported here: the core and the store encode through this module, and they run
    # without aiohttp (a module import is a dictionary lookup once done).
    from aiohttp import web

    return web.json_response(data, status=status, headers=headers, dumps=dumps)
