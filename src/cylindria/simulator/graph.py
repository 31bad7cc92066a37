"""The prompt as a graph: links between nodes, cache signatures and execution order."""

from __future__ import annotations

import json
from collections.abc import Hashable
from typing import Any

from .nodes import NodeSpec


def is_link(value: Any) -> bool:
    """Whether an input value is a [node_id, output_slot] link to another node."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int))


def signatures(catalogue: dict[str, NodeSpec], prompt: dict[str, Any], job_token: object,
               fingerprints: dict[str, Hashable] | None = None) -> dict[str, Hashable]:
    """Cache keys: class, literal inputs and the ancestors' keys. Nodes that always
    run get this job's token, which also makes everything downstream of them miss.
    A node's fingerprint (a loader's file version, ComfyUI's IS_CHANGED) joins its key."""
    memo: dict[str, Hashable] = {}

    def signature(node_id: str, visiting: set[str]) -> Hashable:
        if node_id in memo:
            return memo[node_id]
        node = prompt.get(node_id)
        if not isinstance(node, dict) or node_id in visiting:
            return ("unresolved", node_id, job_token)
        visiting.add(node_id)
        class_type = node.get("class_type")
        spec = catalogue.get(class_type) if isinstance(class_type, str) else None
        inputs = node.get("inputs")
        parts: list[Hashable] = []
        if isinstance(inputs, dict):
            for name in sorted(inputs):
                value = inputs[name]
                if is_link(value):
                    parts.append((name, signature(value[0], visiting), value[1]))
                else:
                    parts.append((name, json.dumps(value, sort_keys=True, default=repr)))
        token = job_token if spec is not None and spec.always_run else None
        if fingerprints is not None and node_id in fingerprints:
            parts.append(("#fingerprint", fingerprints[node_id]))
        result = (str(class_type), tuple(parts), token)
        visiting.discard(node_id)
        memo[node_id] = result
        return result

    return {node_id: signature(node_id, set()) for node_id in prompt}


def plan(catalogue: dict[str, NodeSpec], prompt: dict[str, Any], outputs: list[str],
         cached: set[str]) -> list[str]:
    """Execution order: dependencies first; among ready nodes, output nodes and the
    nodes closest to them go first, so results show up early."""
    deps: dict[str, set[str]] = {}

    def add(node_id: str) -> None:
        if node_id in deps:
            return
        needs: set[str] = set()
        deps[node_id] = needs
        for value in prompt[node_id]["inputs"].values():
            if is_link(value) and value[0] not in cached:
                needs.add(value[0])
                add(value[0])

    for output_id in outputs:
        add(output_id)
    dependents: dict[str, set[str]] = {node_id: set() for node_id in deps}
    for node_id, needs in deps.items():
        for need in needs:
            dependents[need].add(node_id)

    def is_output(node_id: str) -> bool:
        return catalogue[prompt[node_id]["class_type"]].output_node

    def feeds_output(node_id: str, depth: int) -> bool:
        return any(is_output(d) or (depth > 1 and feeds_output(d, depth - 1))
                   for d in dependents[node_id])

    order: list[str] = []
    done: set[str] = set()
    while len(done) < len(deps):
        ready = [n for n, needs in deps.items() if n not in done and needs <= done]
        if not ready:
            raise RuntimeError("dependency cycle in prompt")
        pick = next((n for n in ready if is_output(n)), None)
        if pick is None:
            pick = next((n for n in ready if feeds_output(n, 1)), None)
        if pick is None:
            pick = next((n for n in ready if feeds_output(n, 2)), ready[0])
        order.append(pick)
        done.add(pick)
    return order
