"""What the journal needs of the database that keeps the jobs, whichever it is."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import ujson

from ..core.records import Job, from_record
from ..nodes import NodeInfo

IN_FLIGHT_STATES = ("queued", "running")

# A row as the writer thread receives it: (seq, job_id, state, gpu_id, finished_at, record).
Row = tuple[int, str, str, int | None, float | None, dict[str, Any]]


@dataclass(slots=True)
class Loaded:
    """What start-up reads: jobs for memory, and where numbering and memory stand."""

    install_id: str
    jobs: list[Job] = field(default_factory=list)
    last_seq: int = 0
    evicted_through: int = 0
    held: int = 0
    # Run times learned by an earlier run (RunTimes.to_state), or None.
    run_times: dict[str, Any] | None = None
    # With nodes sharing the database: the other nodes' jobs in flight, by node (left
    # to them).
    elsewhere: dict[str, int] = field(default_factory=dict)


class Database(Protocol):
    """One open database, used from the journal's thread only (and, where
    `commits_inline` says so, for one commit on the event loop while that thread is
    idle). The SQLite state file (`database`) and PostgreSQL (`postgres`) are two."""

    # How messages name it: "state file ./cylindria-state.sqlite3", "database
    # postgresql://cylindria@db:5432/cylindria" (never with a password).
    kind: ClassVar[str]
    name: str
    # What its driver raises when a statement fails: the journal logs it and goes on.
    errors: ClassVar[tuple[type[Exception], ...]]
    # Whether one commit is quick enough for the event loop (no network round trip).
    commits_inline: ClassVar[bool]
    # What the operator should look at when writes fail ("the disk").
    look_at: ClassVar[str]
    # Whether it holds nodes: then it also has `beat(gpus_json)`, which writes this
    # node's heartbeat and returns the other nodes' rows, `leave()`, and
    # `elsewhere(job_id)`, the other nodes' jobs of an id (PostgreSQL).
    clustered: ClassVar[bool]

    def load(self, memory_jobs: int) -> Loaded:
        """Every job in flight, the newest finished ones, and where numbering stands."""

    def set_meta(self, key: str, value: str) -> None: ...

    def write(self, rows: Sequence[Row], workflows: Sequence[tuple[str, bytes]]
              ) -> list[str] | None:
        """One transaction: the workflows first written, then every row. Returns the ids
        of rows left alone because another node has taken them (None: none can be)."""

    def prune(self, before: float, batch: int) -> int:
        """Delete up to `batch` jobs finished before `before` (epoch seconds)."""

    def job(self, job_id: str) -> Job | None: ...

    def workflow(self, job_id: str) -> bytes | str | None: ...

    def page(self, states: Iterable[str] | None, gpu_id: int | None, before: int,
             limit: int) -> list[Job]:
        """Newest first, below `before`."""

    def held(self) -> int: ...

    def close(self) -> None: ...


# Strings longer than this (a node's text output) are encoded a slice at a time: one
# ujson call holds the interpreter, and so the event loop, for all of its work (about
# 80 ms for a 32 MiB text here), while many short calls let it run in between.
LONG_STRING = 1 << 20


def decode_job(text: str) -> Job:
    """A job from its stored record (as `encode_record` wrote it)."""
    return from_record(ujson.loads(text))


def decode_run_times(text: str | None) -> dict[str, Any] | None:
    """Run times learned by an earlier run from their stored form; None when there are
    none, or when they cannot be read (they are learned again from the next jobs)."""
    if text is None:
        return None
    try:
        return ujson.loads(text)
    except ValueError:
        return None


def encode_record(record: dict[str, Any], long_string: int = LONG_STRING) -> str:
    """`record` as JSON; strings longer than `long_string` (in its outputs, the only
    place they occur) are encoded a slice at a time."""
    outputs = record.get("outputs")
    if not outputs or not _has_long_string(outputs, long_string):
        return ujson.dumps(record)
    pieces: list[str] = []
    _encode_into(record, pieces, long_string)
    return "".join(pieces)


def _has_long_string(value: Any, long_string: int) -> bool:
    if isinstance(value, str):
        return len(value) > long_string
    if isinstance(value, dict):
        return any(_has_long_string(item, long_string) for item in value.values())
    if isinstance(value, list | tuple):
        return any(_has_long_string(item, long_string) for item in value)
    return False


def _encode_into(value: Any, pieces: list[str], long_string: int) -> None:
    if isinstance(value, str) and len(value) > long_string:
        pieces.append('"')
        for start in range(0, len(value), long_string):
            pieces.append(ujson.dumps(value[start:start + long_string])[1:-1])
        pieces.append('"')
    elif isinstance(value, dict):
        pieces.append("{")
        for n, (key, item) in enumerate(value.items()):
            pieces.append(',"' if n else '"')
            pieces.append(ujson.dumps(str(key))[1:-1])
            pieces.append('":')
            _encode_into(item, pieces, long_string)
        pieces.append("}")
    elif isinstance(value, list | tuple):
        pieces.append("[")
        for n, item in enumerate(value):
            if n:
                pieces.append(",")
            _encode_into(item, pieces, long_string)
        pieces.append("]")
    else:
        pieces.append(ujson.dumps(value))


T = TypeVar("T")


class SharedDatabase(Protocol):
    """The database nodes share (PostgreSQL), as the modules of its own tables (the
    queue, cancels, events) use it: on the journal's thread, as this node."""

    node: NodeInfo
    # Seconds of waiting worth one priority level in the shared queue.
    aging: float

    @property
    def params(self) -> dict[str, Any]:
        """How to open a connection of one's own (a listener's)."""

    def run(self, work: Callable[[Any], T]) -> T:
        """`work` on the journal's connection, once more on a new one if it was lost."""
