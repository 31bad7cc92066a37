"""What the core needs of the outside: a ComfyUI's calls and answers, a GPU, the journal."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from .records import Job
from .workflow import plan_nodes


@dataclass(slots=True)
class Submitted:
    """ComfyUI's answer to POST /prompt: accepted (200) or refused (400)."""

    accepted: bool
    body: dict[str, Any]


@dataclass(slots=True)
class QueueSnapshot:
    """One reading of ComfyUI's `/queue`: prompt ids running, and pending in run order."""

    running: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    # Per prompt id: (its graph, the output nodes ComfyUI will execute).
    graphs: dict[str, tuple[dict[str, Any], list[str]]] = field(default_factory=dict)

    def holds(self, prompt_id: str) -> bool:
        return prompt_id in self.running or prompt_id in self.pending

    def plan(self, prompt_id: str) -> frozenset[str] | None:
        """The nodes ComfyUI will run for this prompt, when the queue says."""
        found = self.graphs.get(prompt_id)
        return None if found is None else plan_nodes(*found)


class ComfyApi(Protocol):
    """The calls the core makes to one ComfyUI; errors are BackendError subclasses."""

    async def submit(self, workflow: bytes, client_id: str, prompt_id: str,
                     timeout: float) -> Submitted: ...

    async def queue(self) -> QueueSnapshot: ...

    async def history(self, prompt_id: str) -> dict[str, Any] | None: ...

    async def job(self, prompt_id: str) -> dict[str, Any] | None: ...

    async def delete_pending(self, prompt_id: str) -> None: ...

    async def interrupt(self, prompt_id: str) -> None: ...


class GpuPort(Protocol):
    """One GPU as the core sees it."""

    index: int
    client_id: str
    drained: bool
    queue_remaining: int | None
    # Since when its ComfyUI has not answered a reconciliation (None: it answers).
    unreachable_since: datetime | None
    comfy: ComfyApi

    async def is_healthy(self) -> bool: ...

    def healthy_now(self) -> bool | None:
        """Health from a recent probe, or None when a new probe is needed."""


@dataclass(slots=True)
class HeldElsewhere:
    """Another node's job, as that node last wrote it to the database the nodes share."""

    node: str
    # The URL the node advertises, or None when it has no row in `nodes`.
    advertise_url: str | None
    # Whether its last heartbeat is within its grace period and it has not stopped.
    node_alive: bool
    job: Job


@dataclass(slots=True)
class Listed:
    """A job in the listing of every node's jobs (nodes sharing a database): its place in
    the order across the nodes (`key`, what `before` pages by), and the job as its node
    last wrote it."""

    key: int
    held: HeldElsewhere


class Store(Protocol):
    """The journal behind the registry, as the jobs service uses it."""

    def ensure_writable(self) -> None:
        """Raise StateUnavailable while the journal cannot write."""

    def remember_workflow(self, job_id: str, workflow: bytes) -> None: ...

    async def durable(self, job: Job) -> None: ...

    async def fetch(self, job_id: str) -> Job | None: ...

    async def elsewhere(self, job_id: str) -> list[HeldElsewhere]:
        """The other nodes' jobs of this id (none without nodes), by node name."""

    @property
    def clustered(self) -> bool:
        """Whether nodes share the database (and so one queue of held jobs)."""

    @property
    def node_name(self) -> str:
        """This node's name among nodes sharing the database ("" without nodes)."""

    async def claim(self, gpu: int, models: Iterable[str], window: int,
                    seq: int) -> tuple[str, Job, bytes | None] | None:
        """The first job of the nodes' shared line for this node's GPU `gpu`, now this
        node's, with the node that held it (its number here is `seq` if it comes from
        another); None when the line is empty."""

    async def take_back(self, job_id: str) -> bool:
        """Take this node's held job out of the shared line; False if another node has
        taken it."""

    async def taken(self, job_ids: list[str]) -> list[str]:
        """Of these jobs of this node, the ones other nodes have taken."""

    async def request_cancel(self, node: str, job_id: str) -> None:
        """Ask another node to cancel its job (nodes sharing a database only)."""

    async def pending_cancels(self) -> list[str]:
        """This node's jobs other nodes asked it to cancel (none without nodes)."""

    async def drop_cancels(self, job_ids: list[str]) -> None: ...

    async def workflow(self, job_id: str) -> bytes | str | None: ...

    async def page(self, states: Iterable[str] | None, gpu_id: int | None, before: int,
                   limit: int) -> list[Job]: ...

    async def listing(self, states: Iterable[str] | None, gpu: tuple[str, int] | None,
                      before: int | None, limit: int) -> list[Listed]:
        """Every node's jobs, newest first across the nodes (nodes sharing a database
        only); `gpu` is (node, GPU number)."""


class InputFile(Protocol):
    """A stored input file, as the core sees it."""

    id: str
    size: int
    media_type: str
    name: str


class Inputs(Protocol):
    """The input store and the way files reach ComfyUIs, as the jobs service uses them."""

    def get(self, ident: str) -> InputFile | None: ...

    def touch(self, idents: list[str]) -> None: ...

    async def lookup(self, idents: list[str]) -> Mapping[str, InputFile]:
        """The stored inputs of these ids: this node's, and with nodes sharing a
        database, the others it holds (read back when a GPU needs them)."""

    async def add_bytes(self, data: bytes, name: str) -> InputFile:
        """Store bytes sent inline (deduplicated); ApiError when they cannot be kept."""

    async def fetch(self, url: str, name: str) -> InputFile:
        """Fetch a URL into the store; InputUnavailable saying why it could not."""

    async def place(self, gpu: GpuPort, idents: Iterable[str]) -> dict[str, str]:
        """The name of each input on this GPU's ComfyUI, uploading what it lacks;
        BackendError when ComfyUI does not take one, InputGone when one is lost."""

    def forget(self, gpu: int, idents: Iterable[str] | None = None) -> None:
        """This GPU's ComfyUI may have lost these files: upload them again."""


class JobLookup(Protocol):
    """What the parts of the core that look beyond this node use of the jobs service:
    its own look-up, and the journal behind it."""

    store: Store

    async def lookup(self, job_id: str, foresee: bool = True) -> Job | None:
        """This node's job, from memory or the journal; None if it holds none."""
