"""Input files: the part of the jobs service that binds a workflow's references to
stored files when a job is accepted, and puts them on a GPU right before it runs there."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import ujson

from ..errors import InputGone
from .inputs import bind, bound_fingerprint, check_references, ref_of
from .ports import GpuPort, InputFile, Inputs
from .reading import WorkflowReader
from .records import Job
from .registry import Registry
from .workflow import Workflow


class Carrying:
    registry: Registry
    reader: WorkflowReader
    inputs: Inputs

    async def _bind_inputs(self, workflow: Workflow, attached: Mapping[str, InputFile]
                           ) -> tuple[Workflow, list[dict[str, Any]]]:
        """The files the workflow's references stand for, each in the store (inline
        ones are stored, URLs fetched, before the answer): the job's inputs, and its
        fingerprint over them. While a reference is unknown, nothing of the JSON form is
        stored or fetched."""
        if not workflow.references and not workflow.inline and not attached:
            return workflow, []
        inline = [*attached, *(item.name for item in workflow.inline)]
        targets = [target for ref in workflow.references
                   if (target := ref_of(ref.value)) is not None]
        # This node's files, and with nodes sharing a database, the others' there.
        known = await self.inputs.lookup(targets) if targets else {}
        elsewhere = {t: entry for t, entry in known.items() if self.inputs.get(t) is None}
        check_references(workflow.references, inline, known)
        files: dict[str, InputFile] = dict(attached)
        sent = workflow.inline
        stored = await asyncio.gather(*(
            self.inputs.add_bytes(item.data, item.name) if item.data is not None
            else self.inputs.fetch(item.url or "", item.name) for item in sent))
        files.update((item.name, entry) for item, entry in zip(sent, stored, strict=True))
        inputs: list[dict[str, Any]] = []
        for ref in workflow.references:
            if any(item["ref"] == ref.value for item in inputs):
                continue
            target = ref_of(ref.value)
            entry = ((self.inputs.get(target) or elsewhere.get(target)) if target is not None
                     else files[ref.value])
            if entry is None:  # deleted while the others were stored
                raise InputGone(f"The input {target} was deleted just now; upload it again.",
                                extra={"input_id": target})
            inputs.append({"ref": ref.value, "id": entry.id,
                           "name": entry.name if target is not None else ref.value,
                           "size": entry.size, "media_type": entry.media_type})
        self.inputs.touch([item["id"] for item in inputs])
        fingerprint = bound_fingerprint(workflow.fingerprint,
                                        {item["ref"]: item["id"] for item in inputs})
        return dataclasses.replace(workflow, fingerprint=fingerprint, inline=()), inputs

    async def _with_inputs(self, job: Job, gpu: GpuPort, workflow: Workflow
                           ) -> tuple[bytes, dict[str, str]]:
        """The workflow as this GPU runs it: its inputs uploaded there (what it holds
        already is not sent again) and every reference replaced by the file's name."""
        if not job.inputs:
            return workflow.data, {}
        before = self.registry.uploading(job, len(job.inputs), gpu.index)
        started = time.perf_counter()
        placed = await self.inputs.place(gpu, [item["id"] for item in job.inputs])
        self.registry.uploaded(job, time.perf_counter() - started, before)
        names = {item["ref"]: placed[item["id"]] for item in job.inputs}
        return await self.reader.decode(bind, workflow.data, names), names


def names_missing(body: dict[str, Any], names: Mapping[str, str]) -> bool:
    """Whether ComfyUI refused a workflow for lacking a file Cylindria gave it."""
    if not names:
        return False
    text = ujson.dumps(body.get("node_errors") or {}, escape_forward_slashes=False)
    return any(name in text for name in names.values())
