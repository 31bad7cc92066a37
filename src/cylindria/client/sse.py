"""Server-sent events read line by line, as the HTML standard says a browser reads them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Event:
    """One event of `GET /events/`: `event` is `job` (then `data` is the job's status,
    as `/jobstatus` gives it) or `resync`; `id` is what resumes the stream after it."""

    id: str | None
    event: str
    data: Any


class EventParser:
    """Feed it the stream's lines; it answers an Event when a blank line ends one."""

    def __init__(self) -> None:
        self.retry_ms: int | None = None
        self._id: str | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, raw: bytes) -> Event | None:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Event | None:
        if not self._data:
            self._event = ""
            return None
        text = "\n".join(self._data)
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = text
        event = Event(self._id, self._event or "message", data)
        self._event, self._data = "", []
        return event
