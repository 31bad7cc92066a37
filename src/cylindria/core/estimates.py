"""Time estimates: what each node of a workflow costs, what it took before, how far a job is."""

from __future__ import annotations

import math
import re
import statistics
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

SAMPLERS = frozenset({"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"})

# Inputs that carry the latent or image a node works on, in the order they are tried.
_SIZE_INPUTS = ("samples", "latent_image", "latent", "samples1", "pixels", "image", "images",
                "image1", "destination")
_LATENT_INPUTS = ("latent_image", "latent", "samples")
_MODEL_INPUT = re.compile(r"[a-z0-9_]*_name\d*")

# Links followed upstream from one node, and batches of batches: a hostile graph stays cheap.
_MAX_CHAIN, _MAX_DEPTH = 256, 8
# A running job shows at most this much until ComfyUI says it succeeded.
_CAP = 0.99
# The cost key of what a job takes beyond its nodes (ComfyUI's set-up before the first
# node and after the last): learned per GPU like a node's, one unit per job.
JOB_OVERHEAD = "(job)"


@dataclass(frozen=True, slots=True)
class NodeCost:
    """What a node's time depends on: `key` (its class_type) and the `units` of work in it.

    Units are 1.0 for ordinary nodes, steps * megapixels * batch for samplers (without
    steps when they cannot be told), and megapixels * batch for VAE decode and encode. A
    video latent counts its frames as batch; a size that cannot be told counts as one
    megapixel. `steps` is set for a sampler, which reports progress once per step."""

    key: str
    units: float
    steps: int | None


def node_costs(workflow: dict[str, Any]) -> dict[str, NodeCost]:
    """For each node id of an API-format workflow (or ComfyUI's envelope of one), its cost
    key and units. Entries that are not nodes are left out; odd input never raises."""
    graph = _Graph(workflow)
    return {node_id: graph.cost(class_type, inputs)
            for node_id, (class_type, inputs) in graph.nodes.items()}


def models_of(workflow: dict[str, Any]) -> frozenset[str]:
    """The model files a workflow loads: the `*_name` inputs (ckpt_name, clip_name1,
    lora_name ...) of its loader nodes."""
    found: set[str] = set()
    for class_type, inputs in _Graph(workflow).nodes.values():
        if not any(word in class_type for word in ("Loader", "Lora", "LoRA", "LORA")):
            continue
        for name, value in inputs.items():
            if (isinstance(name, str) and name != "sampler_name" and isinstance(value, str)
                    and value not in ("", "None") and _MODEL_INPUT.fullmatch(name)):
                found.add(value)
    return frozenset(found)


@dataclass(frozen=True, slots=True)
class _Size:
    """A latent or an image, measured in pixels (a latent as the image it decodes to)."""

    width: float
    height: float
    batch: float = 1.0
    frames: float = 1.0

    def megapixels(self) -> float:
        return self.width * self.height * self.batch * self.frames / 1e6


class _Graph:
    """A workflow's nodes, and the sizes worked out so far."""

    def __init__(self, workflow: Any) -> None:
        self.nodes: dict[str, tuple[str, dict[Any, Any]]] = {}
        self._sizes: dict[str, _Size | None] = {}
        if not isinstance(workflow, dict):
            return
        graph = workflow.get("prompt")
        if not isinstance(graph, dict) or isinstance(graph.get("class_type"), str):
            graph = workflow
        for node_id, node in graph.items():
            if isinstance(node, dict) and isinstance(node.get("class_type"), str):
                inputs = node.get("inputs")
                self.nodes[str(node_id)] = (node["class_type"],
                                            inputs if isinstance(inputs, dict) else {})

    def cost(self, class_type: str, inputs: dict[Any, Any]) -> NodeCost:
        if class_type in SAMPLERS or ("steps" in inputs
                                      and _first_link(inputs, _LATENT_INPUTS) is not None):
            steps, pixels = self.steps(inputs), self.megapixels(inputs, _LATENT_INPUTS)
            if steps is None:
                return NodeCost(class_type, pixels, None)
            return NodeCost(class_type, _finite(steps * pixels), steps or None)
        if class_type.startswith(("VAEDecode", "VAEEncode")):
            return NodeCost(class_type, self.megapixels(inputs, ("samples", "pixels")), None)
        return NodeCost(class_type, 1.0, None)

    def megapixels(self, inputs: dict[Any, Any], names: tuple[str, ...]) -> float:
        source = _first_link(inputs, names)
        size = self.size(source) if source is not None else None
        return _finite(size.megapixels()) if size is not None else 1.0

    def size(self, node_id: str, depth: int = 0) -> _Size | None:
        """The size of what a node puts out, following links upstream; None if unknown."""
        chain: list[str] = []
        seen: set[str] = set()
        size: _Size | None = None
        current: str | None = node_id
        while (current is not None and current in self.nodes and current not in seen
               and len(chain) < _MAX_CHAIN):
            if current in self._sizes:
                size = self._sizes[current]
                break
            seen.add(current)
            chain.append(current)
            class_type, inputs = self.nodes[current]
            if class_type.startswith("Empty"):
                break
            current = _first_link(inputs, _SIZE_INPUTS)
        for node in reversed(chain):
            class_type, inputs = self.nodes[node]
            size = self._sizes[node] = _sane(self._reshape(class_type, inputs, size, depth))
        return size

    def _reshape(self, class_type: str, inputs: dict[Any, Any], size: _Size | None,
                 depth: int) -> _Size | None:
        """What a node makes of the size that comes in."""
        width, height = _positive(inputs, "width"), _positive(inputs, "height")
        if class_type.startswith("Empty"):
            if width is None or height is None:
                return None
            return _Size(width, height, _positive(inputs, "batch_size") or 1.0,
                         _positive(inputs, "length") or 1.0)
        if size is None:
            # A node that sets both sides (ImageScale of a loaded image) still tells them.
            return _Size(width, height) if width and height else None
        if class_type in ("LatentFromBatch", "ImageFromBatch"):
            index = min(max(_number(inputs.get("batch_index")) or 0.0, 0.0), size.batch - 1)
            length = _positive(inputs, "length") or 1.0
            return replace(size, batch=max(min(length, size.batch - index), 1.0))
        if class_type.startswith("Repeat"):
            amount = _positive(inputs, "amount")
            return replace(size, batch=size.batch * amount) if amount else size
        other = _link(inputs.get("samples2")) or _link(inputs.get("image2"))
        if other is not None and class_type.endswith("Batch"):
            second = self.size(other[0], depth + 1) if depth < _MAX_DEPTH else None
            return replace(size, batch=size.batch + (second or size).batch)
        scale = _positive(inputs, "scale_by")
        if scale is not None:
            return replace(size, width=size.width * scale, height=size.height * scale)
        total = _positive(inputs, "megapixels")
        if total is not None:
            factor = math.sqrt(total * 1e6 / (size.width * size.height))
            return replace(size, width=size.width * factor, height=size.height * factor)
        if width or height:
            # A side left at 0 keeps the aspect ratio, as LatentUpscale and ImageScale do.
            return replace(size, width=width or size.width * (height or 0) / size.height,
                           height=height or size.height * (width or 0) / size.width)
        return size

    def steps(self, inputs: dict[Any, Any]) -> int | None:
        """The steps a sampler runs: its own `steps` (KSamplerAdvanced: the part between
        start_at_step and end_at_step), or those of the scheduler behind its sigmas."""
        total = _number(inputs.get("steps"))
        if total is None:
            link = _link(inputs.get("sigmas"))
            return self._sigma_steps(link) if link is not None else None
        steps = max(int(total), 0)
        start, end = _number(inputs.get("start_at_step")), _number(inputs.get("end_at_step"))
        if start is None and end is None:
            return steps
        last = steps if end is None else min(max(int(end), 0), steps)
        return max(last - (0 if start is None else max(int(start), 0)), 0)

    def _sigma_steps(self, link: tuple[str, int] | None) -> int | None:
        chain: list[tuple[dict[Any, Any], int]] = []
        seen: set[str] = set()
        steps: int | None = None
        while (link is not None and link[0] in self.nodes and link[0] not in seen
               and len(chain) < _MAX_CHAIN):
            seen.add(link[0])
            inputs = self.nodes[link[0]][1]
            total = _number(inputs.get("steps"))
            if total is not None:
                steps = max(int(total), 0)
                break
            chain.append((inputs, link[1]))
            link = _link(inputs.get("sigmas"))
        if steps is None:
            return None
        for inputs, output in reversed(chain):
            split = _number(inputs.get("step"))
            if split is not None:
                # SplitSigmas: its first output runs the first `step` steps, its second the rest.
                first = min(max(int(split), 0), steps)
                steps = first if output == 0 else steps - first
        return steps


def _sane(size: _Size | None) -> _Size | None:
    """A size that every later step can divide by, or None."""
    if size is None or not (0 < size.width * size.height < math.inf
                            and 0 < size.batch * size.frames < math.inf):
        return None
    return size


def _link(value: Any) -> tuple[str, int] | None:
    """An input that is a link to another node's output: (node id, output index)."""
    if (isinstance(value, list | tuple) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool)):
        return value[0], value[1]
    return None


def _first_link(inputs: dict[Any, Any], names: tuple[str, ...]) -> str | None:
    """The node that the first linked input of `names` comes from."""
    return next((link[0] for name in names if (link := _link(inputs.get(name)))), None)


def _number(value: Any) -> float | None:
    """A finite number from an input (ComfyUI also takes numbers written as text)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _positive(inputs: dict[Any, Any], name: str) -> float | None:
    number = _number(inputs.get(name))
    return number if number is not None and number > 0 else None


def _finite(units: float) -> float:
    return units if math.isfinite(units) else 1.0


def _usable(value: Any) -> bool:
    """A finite number, not negative (and not text)."""
    return not isinstance(value, str) and (number := _number(value)) is not None and number >= 0


class RunTimes:
    """Learned execution time per GPU and cost key, in seconds per unit: an exponentially
    weighted moving average (the first observation taken as is). At most `limit` keys
    are kept; the least recently updated go first. `version` grows with every
    observation taken, so a saver can tell that something changed."""

    def __init__(self, alpha: float = 0.3, limit: int = 4096) -> None:
        self.alpha, self.limit, self.version = alpha, max(limit, 1), 0
        self._rates: OrderedDict[tuple[int, str], float] = OrderedDict()
        # The GPUs that know each key, for the mean that stands in for a GPU that does not.
        self._gpus: dict[str, set[int]] = {}

    def __len__(self) -> int:
        return len(self._rates)

    def observe(self, gpu: int, key: str, units: float, seconds: float) -> None:
        """Learn that `units` of `key` took `seconds` on `gpu`; nonsense is ignored."""
        if not (_usable(units) and units > 0 and _usable(seconds)):
            return
        rate = seconds / units
        if not math.isfinite(rate):
            return
        old = self._rates.get((gpu, key))
        self._store(gpu, key, rate if old is None else old + self.alpha * (rate - old))
        self.version += 1

    def expect(self, gpu: int | None, key: str, units: float) -> float | None:
        """Expected seconds: this GPU's estimate, else the mean over the GPUs that know
        the key (all of them for gpu=None), else None."""
        if not _usable(units):
            return None
        rate = self._rates.get((gpu, key)) if gpu is not None else None
        if rate is None:
            gpus = self._gpus.get(key)
            if not gpus:
                return None
            rate = sum(self._rates[(g, key)] for g in gpus) / len(gpus)
        return rate * units

    def node_seconds(self, gpu: int | None,
                     costs: dict[str, NodeCost]) -> tuple[dict[str, float], bool]:
        """Expected seconds of each node, and whether that adds up to an estimate.

        A node not known yet counts as the median known node of the job (the median, as
        one sampler would carry a mean far above the small nodes); when nothing is known,
        each node counts 1.0. It is an estimate when something is known and at most half
        the units are unknown."""
        seconds = {node: self.expect(gpu, cost.key, cost.units)
                   for node, cost in costs.items()}
        known = [s for s in seconds.values() if s is not None]
        if not known:
            return dict.fromkeys(seconds, 1.0), False
        stand_in = statistics.median(known)
        unknown_units = sum(costs[node].units for node, s in seconds.items() if s is None)
        total_units = sum(cost.units for cost in costs.values())
        return ({node: stand_in if s is None else s for node, s in seconds.items()},
                unknown_units * 2 <= total_units)

    def expect_job(self, gpu: int | None, costs: dict[str, NodeCost],
                   skip: Iterable[str] = ()) -> float | None:
        """Expected seconds of a job's nodes not in `skip` (see node_seconds for unknown
        nodes); None when nothing is known or more than half the units are unknown, 0.0
        when no node is left."""
        left_out = set(skip)
        nodes = {node: cost for node, cost in costs.items() if node not in left_out}
        if not nodes:
            return 0.0
        seconds, sure = self.node_seconds(gpu, nodes)
        return sum(seconds.values()) if sure else None

    def to_state(self) -> dict[str, Any]:
        """A JSON-ready copy for the state file, least recently updated first."""
        return {"format": 1,
                "rates": [[gpu, key, rate] for (gpu, key), rate in self._rates.items()]}

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> RunTimes:
        """RunTimes from to_state's form; entries that make no sense are skipped."""
        times = cls()
        rates = data.get("rates") if isinstance(data, dict) else None
        for entry in rates if isinstance(rates, list) else ():
            if not (isinstance(entry, list | tuple) and len(entry) == 3):
                continue
            gpu, key, rate = entry
            if (isinstance(gpu, int) and not isinstance(gpu, bool) and isinstance(key, str)
                    and _usable(rate)):
                times._store(gpu, key, float(rate))
        return times

    def _store(self, gpu: int, key: str, rate: float) -> None:
        self._rates[(gpu, key)] = rate
        self._rates.move_to_end((gpu, key))
        self._gpus.setdefault(key, set()).add(gpu)
        while len(self._rates) > self.limit:
            (old_gpu, old_key), _ = self._rates.popitem(last=False)
            gpus = self._gpus[old_key]
            gpus.discard(old_gpu)
            if not gpus:
                del self._gpus[old_key]


class Timeline:
    """One running job on one GPU, fed its ComfyUI events in order with a clock value
    (monotonic seconds) from the caller; each node that ran is learned into `times`.

    `costs` are the nodes the job runs (node_costs of its workflow, or those planned)."""

    def __init__(self, gpu: int, costs: dict[str, NodeCost], times: RunTimes) -> None:
        self.gpu, self.costs, self.times = gpu, dict(costs), times
        self.started_at: float | None = None
        # Seconds of the nodes observed so far: the rest of the job is its overhead.
        self._observed = 0.0
        self._done: set[str] = set()
        self._cached: set[str] = set()
        self._current: str | None = None
        self._since = 0.0
        # The current node's progress: share done, share after its next tick, last tick's time.
        self._share: float | None = None
        self._next_share: float | None = None
        self._tick = 0.0
        self._finished = self._success = False
        self._shown = 0.0
        self._seconds: tuple[dict[str, float], bool] = ({}, False)
        self._seconds_for: int | None = None

    def started(self, now: float) -> None:
        if self.started_at is None:
            self.started_at = now

    def cached(self, nodes: Iterable[str]) -> None:
        """Nodes ComfyUI took from its cache: done, at no cost."""
        for node in map(str, nodes):
            if node != self._current and node not in self._done:
                self._cached.add(node)
        self._seconds_for = None

    def executing(self, node: str | None, now: float) -> None:
        """A node starts, so the one before it ended now; None: the last node ended."""
        if self._finished:
            return
        self.started(now)
        node = None if node is None else str(node)
        if node == self._current:
            return
        self._close(now, learn=True)
        if node is not None:
            self._current, self._since = node, now
            self._share, self._next_share, self._tick = None, None, now
            if node in self._cached:
                self._cached.discard(node)
                self._seconds_for = None

    def progress(self, node: str | None, value: float, maximum: float, now: float) -> None:
        """A progress tick of `node` (None: the current one): `value` of `maximum`."""
        if self._finished:
            return
        if node is not None and str(node) != self._current:
            self.executing(node, now)
        done, total = _number(value), _number(maximum)
        if self._current is None or done is None or total is None or total <= 0:
            return
        share = min(max(done / total, 0.0), 1.0)
        if self._share is None or share > self._share:
            self._share, self._tick = share, now
            self._next_share = min(max((done + 1) / total, share), 1.0)

    def finished(self, now: float, success: bool) -> None:
        """The job ended; the node running is learned only if it succeeded."""
        if self._finished:
            return
        self.started(now)
        self._close(now, learn=success)
        self._finished, self._success = True, success
        if success and self.started_at is not None and now >= self.started_at:
            self.times.observe(self.gpu, JOB_OVERHEAD, 1.0,
                               max(0.0, now - self.started_at - self._observed))

    def fraction(self) -> float:
        """How far the job is, in [0, 1): the nodes done weighted by their expected
        seconds, and the share of the current one that its progress ticks tell. It never
        goes back, and is 1.0 only once the job succeeded."""
        if self._finished and self._success:
            self._shown = 1.0
            return 1.0
        seconds, _ = self._expected()
        if sum(seconds.values()) <= 0:
            # Nothing learned takes any time (a very quick job): count nodes instead.
            seconds = dict.fromkeys(seconds, 1.0)
        total = sum(seconds.values())
        done = sum(seconds[node] for node in self._done if node in seconds)
        if self._current in seconds and self._share is not None:
            done += seconds[self._current] * self._share
        value = min(done / total, _CAP) if total > 0 else 0.0
        if math.isfinite(value):
            self._shown = max(self._shown, value)
        return self._shown

    def remaining(self, now: float) -> float | None:
        """Expected seconds until the job ends: the nodes still to run, and what is left
        of the current one. None until enough is known (see RunTimes.node_seconds)."""
        if self._finished:
            return 0.0
        seconds, sure = self._expected()
        if not sure:
            return None
        left = sum(s for node, s in seconds.items()
                   if node not in self._done and node != self._current)
        if self._current in seconds:
            left += self._rest(seconds[self._current], now)
        return left

    def _rest(self, expected: float, now: float) -> float:
        """What is left of the current node: its expectation less the time spent, counted
        from its last progress tick and held where its next tick would put it."""
        next_share = self._next_share
        if next_share is None:
            cost = self.costs.get(self._current or "")
            if cost is not None and cost.steps:
                next_share = min(1.0 / cost.steps, 1.0)
        share = self._share or 0.0
        floor = expected * (1.0 - next_share) if next_share is not None else 0.0
        return max(expected * (1.0 - share) - (now - self._tick), floor, 0.0)

    def _close(self, now: float, learn: bool) -> None:
        node = self._current
        if node is None:
            return
        cost = self.costs.get(node)
        if learn and cost is not None and now >= self._since:
            self.times.observe(self.gpu, cost.key, cost.units, now - self._since)
            self._observed += now - self._since
        self._done.add(node)
        self._current = self._share = self._next_share = None

    def _expected(self) -> tuple[dict[str, float], bool]:
        """node_seconds of the nodes not cached, kept until something new is learned."""
        if self._seconds_for != self.times.version:
            costs = {node: cost for node, cost in self.costs.items()
                     if node not in self._cached}
            self._seconds = self.times.node_seconds(self.gpu, costs)
            self._seconds_for = self.times.version
        return self._seconds
