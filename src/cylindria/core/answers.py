"""ComfyUI's answers and event frames read into what the service needs of them.

Plain functions of their arguments: for a large answer they run in the worker process
(core/reading.py), so that only what is kept comes back, never a whole body. A body
may come as the chunks it arrived in, joined here rather than on the event loop.

ComfyUI writes JSON with Python's json, which puts a NaN or an infinity as the bare
words NaN and Infinity, which are not JSON. They are turned into the strings the one
encoder writes for them (jsonio.py) as they come in, so nothing kept (the registry, the
state file) holds a number no strict parser reads.
"""

from __future__ import annotations

from typing import Any

import ujson

from ..jsonio import finite
from .ports import QueueSnapshot

Raw = bytes | str | list[bytes]


def whole(raw: Raw) -> bytes | str:
    """`raw` as one buffer."""
    return b"".join(raw) if isinstance(raw, list) else raw


def raw_size(raw: Raw) -> int:
    return sum(map(len, raw)) if isinstance(raw, list) else len(raw)


def json_document(raw: Raw) -> Any:
    """Any JSON answer, decoded whole, non-finite numbers as their words. ValueError if
    it is not JSON."""
    text = whole(raw)
    data = ujson.loads(text)
    return finite(data) if _may_hold_non_finite(text) else data


def _may_hold_non_finite(text: bytes | str) -> bool:
    """Whether ComfyUI's words for a non-finite number appear in `text`: a substring
    search is quick, and the walk is made only when it says so (a text that merely
    mentions NaN costs the walk, and loses nothing). A number too large for a float
    (1e999) is not looked for: Python never writes one; the encoder still never
    emits what it reads as."""
    # A capital N is rare in ComfyUI's JSON, and one byte is found at memchr's speed:
    # most answers are cleared of NaN without the slower search for three.
    if isinstance(text, bytes):
        return (b"N" in text and b"NaN" in text) or b"Infinity" in text
    return ("N" in text and "NaN" in text) or "Infinity" in text


def queue_snapshot(raw: Raw) -> QueueSnapshot:
    """ComfyUI's `/queue` answer as a snapshot."""
    data = json_document(raw)
    return parse_queue(data if isinstance(data, dict) else {})


def history_entry(raw: Raw, prompt_id: str) -> dict[str, Any] | None:
    """The entry of `prompt_id` in a `/history/{prompt_id}` answer, without the workflow
    it repeats (which can be as large as the outputs), or None while ComfyUI has none."""
    data = json_document(raw)
    entry = data.get(prompt_id) if isinstance(data, dict) else None
    if not isinstance(entry, dict):
        return None
    entry.pop("prompt", None)
    return entry


def parse_frame(raw: Raw) -> tuple[str, dict[str, Any]]:
    """(type, data) of one websocket text frame; ValueError, KeyError or TypeError if
    it is not one ComfyUI sends."""
    msg = json_document(raw)
    if not isinstance(msg, dict):
        raise TypeError("the frame is not an object")
    data = msg.get("data") or {}
    if not isinstance(data, dict):
        raise TypeError("data is not an object")
    return msg["type"], data


def parse_queue(raw: dict[str, Any]) -> QueueSnapshot:
    """ComfyUI's `/queue` body as a snapshot. Its pending heap comes as stored, not in
    run order: sorted here by number, then prompt id, as its heap orders them."""
    running_items = [item for item in raw.get("queue_running", []) if _is_item(item)]
    pending_items = [item for item in raw.get("queue_pending", []) if _is_item(item)]
    pending_items.sort(key=lambda item: (_number(item[0]), str(item[1])))
    graphs: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for item in (*running_items, *pending_items):
        if len(item) > 4 and isinstance(item[2], dict) and isinstance(item[4], list):
            graphs[str(item[1])] = (item[2], [str(o) for o in item[4]])
    return QueueSnapshot(running=[str(item[1]) for item in running_items],
                         pending=[str(item[1]) for item in pending_items], graphs=graphs)


def _is_item(item: Any) -> bool:
    return isinstance(item, list | tuple) and len(item) > 1


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return number if number == number else 0.0
