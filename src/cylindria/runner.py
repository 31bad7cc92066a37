"""`cylindria run | status | wait | cancel`: the API from a terminal, through the client."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .client import FINAL_STATES, AsyncClient, CylindriaError

# Exit statuses, as README's table gives them.
(COMPLETED, FAILED, BAD_INPUT, CANCELLED, REJECTED, LOST, UNREACHABLE, REFUSED_KEY,
 STILL_GOING) = range(9)
LEFT_RUNNING = 130
# What a shell reports for a program its pipe ended: whoever read the output left.
PIPE_CLOSED = 128 + signal.SIGPIPE
STATE_CODES = {"completed": COMPLETED, "failed": FAILED, "cancelled": CANCELLED,
               "rejected": REJECTED}
# While the event stream carries the job, a poll now and then is only a safety net;
# without it, polls are how the job is followed.
SAFETY_POLL = 2.0
POLL = 0.5
# How long the service may be out of reach (a restart) before following gives up.
OUT_OF_REACH = 30.0


class BadInput(Exception):
    """What the command was given cannot be sent (a file, a UI-format workflow)."""


def main(ns: argparse.Namespace) -> int:
    url = ns.url or os.environ.get("CYLINDRIA_URL") or "http://127.0.0.1:8000"
    key = ns.key or os.environ.get("CYLINDRIA_API_KEY") or None
    commands: dict[str, Callable[..., Any]] = {"run": run, "status": status, "wait": wait,
                                               "cancel": cancel}
    try:
        return asyncio.run(commands[ns.command](ns, AsyncClient(url, key)))
    except BadInput as exc:
        return fail(str(exc), BAD_INPUT)
    except CylindriaError as exc:
        return fail(exc.message, error_code(exc))
    except KeyboardInterrupt:
        return fail("Interrupted.", LEFT_RUNNING)
    except BrokenPipeError:
        # Whoever read the output stopped reading (`| head`): nothing more to say. The
        # rest goes nowhere, so the interpreter's own flush at exit fails quietly too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return PIPE_CLOSED


def fail(message: str, code: int) -> int:
    print(f"cylindria: {message}", file=sys.stderr)
    return code


def error_code(exc: CylindriaError) -> int:
    if exc.code == "timeout":
        return STILL_GOING
    if exc.status == 0:
        return BAD_INPUT if exc.code.startswith("bad_") else UNREACHABLE
    if exc.status in (401, 429):
        return REFUSED_KEY
    if exc.status in (400, 404, 409) and exc.code != "gpu_drained":
        return BAD_INPUT
    return REJECTED


def state_code(status: Mapping[str, Any]) -> int:
    error = status.get("error")
    if status.get("state") == "failed" and isinstance(error, Mapping) \
            and error.get("type") == "lost":
        return LOST
    return STATE_CODES.get(str(status.get("state")), FAILED)


# -- the commands --------------------------------------------------------------------

async def run(ns: argparse.Namespace, cy: AsyncClient) -> int:
    workflow = load_workflow(Path(ns.workflow))
    inputs = parse_inputs(ns.input)
    job_id = ns.job_id or new_job_id(Path(ns.workflow))
    async with cy:
        try:
            reply = await cy.submit(job_id, workflow, gpu=ns.gpu, priority=ns.priority,
                                    inputs=inputs)
        except CylindriaError as exc:
            if exc.code == "job_id_conflict":
                raise BadInput(f"{exc.message} Choose another --job-id.") from None
            raise
        if not ns.json:
            print(f"Job {job_id}: {reply.get('detail', '')}", file=sys.stderr)
        final = await follow_or_ask(cy, job_id, ns.json)
        if final is None:
            print(f"Job {job_id} goes on; follow it with: cylindria wait {job_id}",
                  file=sys.stderr)
            return LEFT_RUNNING
        files = await cy.download(job_id, ns.out, final) \
            if final.get("state") == "completed" else []
    if ns.json:
        print(json.dumps({**final, "downloaded": [str(f) for f in files]}, indent=2))
    else:
        for path in files:
            print(path)
        report(final)
    return state_code(final)


async def status(ns: argparse.Namespace, cy: AsyncClient) -> int:
    async with cy:
        body = await cy.status(ns.job_id)
    print(json.dumps(body, indent=2))
    return COMPLETED


async def wait(ns: argparse.Namespace, cy: AsyncClient) -> int:
    async with cy:
        body = await cy.wait(ns.job_id, ns.timeout)
    print(json.dumps(body, indent=2))
    return state_code(body)


async def cancel(ns: argparse.Namespace, cy: AsyncClient) -> int:
    async with cy:
        body = await cy.cancel(ns.job_id)
    print(json.dumps(body, indent=2))
    return COMPLETED


def report(final: Mapping[str, Any]) -> None:
    """One line on stderr for a job that did not complete."""
    state = final.get("state")
    if state == "completed":
        return
    error = final.get("error")
    why = final.get("detail") or ""
    if isinstance(error, Mapping) and error.get("message"):
        why = f"{error.get('type', 'error')}: {error['message']}"
    print(f"cylindria: job {final.get('job_id')} {state}: {why}".rstrip(": "),
          file=sys.stderr)


# -- following a job, and Ctrl-C ----------------------------------------------------

async def follow_or_ask(cy: AsyncClient, job_id: str, quiet: bool) -> dict[str, Any] | None:
    """The job's final status, shown on a bar as it goes (unless `quiet`). Ctrl-C asks
    whether to cancel it: yes cancels and goes on to its end, no answers None."""
    from .runner_view import Bar, Console

    bar = None if quiet else Bar(job_id, Console(stderr=True))
    show = bar.update if bar else (lambda status: None)
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    try:
        while True:
            if bar:
                bar.start()
            following = asyncio.create_task(follow(cy, job_id, show))
            asked = asyncio.create_task(interrupted.wait())
            await asyncio.wait({following, asked}, return_when=asyncio.FIRST_COMPLETED)
            if bar:
                bar.stop()
            asked.cancel()
            if following.done():
                return following.result()
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
            interrupted.clear()
            if await ask("Cancel the job? [y/N] ", interrupted) != "y":
                return None
            try:
                show(await cy.cancel(job_id))
            except CylindriaError as exc:
                if exc.code != "job_finished":
                    raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def follow(cy: AsyncClient, job_id: str,
                 show: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The job's final status: from its event stream, with polls of /jobstatus as a
    safety net, and in its place when the stream cannot be had."""
    done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def seen(body: dict[str, Any]) -> None:
        if body.get("job_id") != job_id or done.done():
            return
        show(body)
        if body.get("state") in FINAL_STATES:
            done.set_result(body)

    async def from_events() -> None:
        async for event in cy.events(job_id=job_id):
            if event.event == "job" and isinstance(event.data, dict):
                seen(event.data)
            elif event.event == "resync":
                seen(await cy.status(job_id))

    async def from_polls(stream: asyncio.Task[None]) -> None:
        loop = asyncio.get_running_loop()
        lost_since = None
        while True:
            try:
                seen(await cy.status(job_id))
                lost_since = None
            except CylindriaError as exc:
                lost_since = lost_since or loop.time()
                if exc.code != "unreachable" or loop.time() - lost_since > OUT_OF_REACH:
                    if not done.done():
                        done.set_exception(exc)
                    return
            await asyncio.sleep(POLL if stream.done() or lost_since else SAFETY_POLL)

    stream = asyncio.create_task(from_events())
    polls = asyncio.create_task(from_polls(stream))
    try:
        return await done
    finally:
        for task in (stream, polls):
            task.cancel()
        await asyncio.gather(stream, polls, return_exceptions=True)


async def ask(question: str, interrupted: asyncio.Event) -> str:
    """A line from the terminal, lower-cased; empty on end of input or a second Ctrl-C."""
    sys.stderr.write(question)
    sys.stderr.flush()
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()
    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, 1024)
        except OSError:
            data = b""
        if not answer.done():
            answer.set_result(data.decode("utf-8", "replace"))

    loop.add_reader(fd, readable)
    again = asyncio.create_task(interrupted.wait())
    try:
        await asyncio.wait({answer, again}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(fd)
        again.cancel()
    if not answer.done():
        sys.stderr.write("\n")
        return ""
    return answer.result().strip().lower()


# -- what the command was given ----------------------------------------------------

def load_workflow(path: Path) -> dict[str, Any]:
    """The workflow file as an API-format graph, or a BadInput saying what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise BadInput(f"cannot read the workflow {str(path)!r}: {why}") from None
    try:
        workflow = json.loads(text)
    except ValueError as exc:
        raise BadInput(f"{str(path)!r} is not JSON ({exc}).") from None
    if not isinstance(workflow, dict):
        raise BadInput(f"{str(path)!r} is not a workflow: it holds a JSON "
                       f"{type(workflow).__name__}, not an object of nodes.")
    if "nodes" in workflow and "links" in workflow:
        raise BadInput(f"{str(path)!r} is a workflow saved in ComfyUI's UI format; "
                       "export it in API format instead: Workflow > Export (API) (in "
                       "older ComfyUIs, enable the dev mode options in the settings and "
                       "use Save (API Format)).")
    return workflow


def parse_inputs(given: list[str]) -> dict[str, Path]:
    inputs: dict[str, Path] = {}
    for item in given:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise BadInput(f"--input takes NAME=FILE (the name the workflow uses, and "
                           f"the file to send), got {item!r}.")
        path = Path(file)
        if not path.is_file():
            raise BadInput(f"--input {name}: no file {file!r}.")
        inputs[name] = path
    return inputs


def new_job_id(workflow: Path) -> str:
    """The workflow file's name and a random suffix, as a job id may be spelled."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", workflow.stem).strip(".-")[:80] or "job"
    return f"{stem}-{secrets.token_hex(4)}"
