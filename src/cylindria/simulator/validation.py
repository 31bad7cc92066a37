"""Prompt validation with the rules and messages of ComfyUI's validate_prompt."""

from __future__ import annotations

import operator
import traceback
from collections.abc import Callable
from typing import Any

from .nodes import NodeSpec

# Per node: (valid, the errors found on that node itself).
Verdicts = dict[str, tuple[bool, list[dict[str, Any]]]]
# Whether a loader's file name names an existing file (it raises on a name that is not
# a string, as ComfyUI's check does).
FileCheck = Callable[[Any], bool]

_BOUNDS = (("min", "smaller", operator.lt), ("max", "bigger", operator.gt))


def prompt_error(kind: str, message: str, details: str) -> dict[str, Any]:
    """The `error` object of a refused POST /prompt."""
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


def full_type_name(exc: BaseException) -> str:
    """The exception's class as ComfyUI reports it: qualified unless it is a builtin."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _types_match(received: str, expected: str) -> bool:
    if received == "*" or expected == "*" or received == expected:
        return True
    return bool({t.strip() for t in received.split(",")}
                & {t.strip() for t in expected.split(",")})


def _out_of_range(name: str, config: list[Any], extra: dict[str, Any],
                  value: Any) -> dict[str, Any] | None:
    for bound, word, beyond in _BOUNDS:
        if bound in extra and beyond(value, extra[bound]):
            return {"type": f"value_{word}_than_{bound}",
                    "message": f"Value {value} {word} than {bound} of {extra[bound]}",
                    "details": f"{name}",
                    "extra_info": {"input_name": name, "input_config": config,
                                   "received_value": value}}
    return None


def _file_error(spec: NodeSpec, inputs: dict[str, Any],
                file_exists: FileCheck | None) -> dict[str, Any] | None:
    """The loader's own validation of the input naming its file, run after the others."""
    declared = spec.input_file
    if declared is None or file_exists is None:
        return None
    name = declared.input
    if name not in inputs or isinstance(inputs[name], list) or file_exists(inputs[name]):
        return None
    return {"type": "custom_validation_failed",
            "message": "Custom validation failed for node",
            "details": f"{name} - Invalid {declared.kind} file: {inputs[name]}",
            "extra_info": {"input_name": name}}


def _validate_node(catalogue: dict[str, NodeSpec], prompt: dict[str, Any], node_id: str,
                   validated: Verdicts, visiting: set[str],
                   file_exists: FileCheck | None) -> tuple[bool, list[dict[str, Any]]]:
    """Check one node's inputs, following links upstream; coerces literal values in place.

    Lookup failures (a link to a missing node, a node without "inputs") raise, and the
    caller turns them into exception_during_(inner_)validation as ComfyUI does.
    """
    if node_id in validated:
        return validated[node_id]
    if node_id in visiting:
        # ComfyUI recurses until Python gives up on a cycle; the outcome is the same error.
        raise RecursionError("maximum recursion depth exceeded")
    visiting.add(node_id)
    inputs = prompt[node_id]["inputs"]
    spec = catalogue[prompt[node_id]["class_type"]]
    errors: list[dict[str, Any]] = []
    valid = True
    for name in (*spec.required, *spec.optional):
        config, category = spec.input_spec(name)
        assert config is not None
        input_type, extra = config[0], config[1]
        type_name = "COMBO" if isinstance(input_type, list) else input_type
        if name not in inputs:
            if category == "required":
                errors.append({"type": "required_input_missing",
                               "message": "Required input is missing",
                               "details": f"{name}", "extra_info": {"input_name": name}})
            continue
        value = inputs[name]
        if isinstance(value, list):
            if len(value) != 2:
                errors.append({
                    "type": "bad_linked_input",
                    "message": "Bad linked input, must be a length-2 list of "
                               "[node_id, slot_index]",
                    "details": f"{name}",
                    "extra_info": {"input_name": name, "input_config": config,
                                   "received_value": value}})
                continue
            source_id = value[0]
            received = catalogue[prompt[source_id]["class_type"]].outputs[value[1]]
            if not _types_match(received, type_name):
                errors.append({
                    "type": "return_type_mismatch",
                    "message": "Return type mismatch between linked nodes",
                    "details": f"{name}, received_type({received}) mismatch "
                               f"input_type({input_type})",
                    "extra_info": {"input_name": name, "input_config": config,
                                   "received_type": received, "linked_node": value}})
                continue
            try:
                upstream_ok, _ = _validate_node(catalogue, prompt, source_id, validated,
                                                visiting, file_exists)
            except Exception as exc:
                valid = False
                validated[source_id] = (False, [{
                    "type": "exception_during_inner_validation",
                    "message": "Exception when validating inner node",
                    "details": str(exc),
                    "extra_info": {"input_name": name, "input_config": config,
                                   "exception_message": str(exc),
                                   "exception_type": full_type_name(exc),
                                   "traceback": traceback.format_tb(exc.__traceback__),
                                   "linked_node": value}}])
                continue
            if not upstream_ok:
                valid = False
            continue
        try:
            if isinstance(value, dict) and "__value__" in value:
                value = value["__value__"]
                inputs[name] = value
            if type_name == "INT":
                value = int(value)
            elif type_name == "FLOAT":
                value = float(value)
            elif type_name == "STRING":
                value = str(value)
            elif type_name == "BOOLEAN":
                value = bool(value)
            inputs[name] = value
        except Exception as exc:
            errors.append({
                "type": "invalid_input_type",
                "message": f"Failed to convert an input value to a {type_name} value",
                "details": f"{name}, {value}, {exc}",
                "extra_info": {"input_name": name, "input_config": config,
                               "received_value": value, "exception_message": str(exc)}})
            continue
        if spec.input_file is not None and name == spec.input_file.input:
            # Checked by the node's own validation below, in place of range and options.
            continue
        out_of_range = _out_of_range(name, config, extra, value)
        if out_of_range is not None:
            errors.append(out_of_range)
            continue
        if type_name == "COMBO" and value not in input_type:
            # Long option lists (model folders) are not echoed back.
            if len(input_type) > 20:
                listing, shown = f"(list of length {len(input_type)})", None
            else:
                listing, shown = str(input_type), config
            errors.append({
                "type": "value_not_in_list", "message": "Value not in list",
                "details": f"{name}: '{value}' not in {listing}",
                "extra_info": {"input_name": name, "input_config": shown,
                               "received_value": value}})
            continue
    file_error = _file_error(spec, inputs, file_exists)
    if file_error is not None:
        errors.append(file_error)
    visiting.discard(node_id)
    result = (valid and not errors, errors)
    validated[node_id] = result
    return result


def validate_prompt(catalogue: dict[str, NodeSpec], prompt: Any, targets: Any = None,
                    file_exists: FileCheck | None = None
                    ) -> tuple[bool, Any, list[str], dict[str, Any]]:
    """(ok, error, outputs to execute, node_errors), as POST /prompt reports them.

    `file_exists` checks the file names of loader nodes; without it they are not checked.

    Malformed prompts (a list, a node that is a number) raise TypeError, which the
    server turns into its plain-text 500, like ComfyUI.
    """
    outputs: list[str] = []
    for node_id in prompt:
        node = prompt[node_id]
        if "class_type" not in node:
            return False, prompt_error(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'"), [], {}
        class_type = node["class_type"]
        spec = catalogue.get(class_type)
        if spec is None:
            return False, prompt_error(
                "invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                f"Node ID '#{node_id}'"), [], {}
        if spec.output_node and (targets is None or node_id in targets):
            outputs.append(node_id)
    if not outputs:
        return False, prompt_error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}

    good: list[str] = []
    failed: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    validated: Verdicts = {}
    for output_id in outputs:
        try:
            ok, reasons = _validate_node(catalogue, prompt, output_id, validated, set(),
                                         file_exists)
        except Exception as exc:
            ok = False
            reasons = [{"type": "exception_during_validation",
                        "message": "Exception when validating node",
                        "details": str(exc),
                        "extra_info": {"exception_type": full_type_name(exc),
                                       "traceback": traceback.format_tb(exc.__traceback__)}}]
            validated[output_id] = (False, reasons)
        if ok:
            good.append(output_id)
            continue
        if reasons:
            failed.append((output_id, reasons))
        for node_id, (node_ok, node_reasons) in validated.items():
            if node_ok or not node_reasons:
                continue
            if node_id not in node_errors:
                node_errors[node_id] = {"errors": node_reasons, "dependent_outputs": [],
                                        "class_type": prompt[node_id]["class_type"]}
            node_errors[node_id]["dependent_outputs"].append(output_id)
    if not good:
        # Only the output nodes' own errors make it into details: an upstream fault
        # leaves it empty and shows up in node_errors alone.
        details = "\n".join(f"{reason['message']}: {reason['details']}"
                            for _, reasons in failed for reason in reasons)
        return False, prompt_error("prompt_outputs_failed_validation",
                                   "Prompt outputs failed validation", details), [], node_errors
    return True, None, good, node_errors
