"""Fault injection: hang and fail rules, pause points, and the /_sim control routes."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler

from ..jsonio import json_response

if TYPE_CHECKING:
    from .server import ComfySimulator

log = logging.getLogger(__name__)

INTERNAL_ERROR_TEXT = "500 Internal Server Error\n\nServer got itself in trouble"
PAUSE_POINTS = ("dequeue", "node", "tick")


@dataclass(slots=True)
class FaultRule:
    count: int
    path: str | None

    def matches(self, path: str) -> bool:
        if self.path is None:
            return True
        # Either spelling of a route counts: "/prompt" also catches "/api/prompt".
        return path.startswith(self.path) or (
            path.startswith("/api/") and path[4:].startswith(self.path))


def _take(rules: list[FaultRule], path: str) -> bool:
    for rule in rules:
        if rule.matches(path):
            rule.count -= 1
            if rule.count <= 0:
                rules.remove(rule)
            return True
    return False


class Faults:
    """Requests to hold or to fail, and whether websocket upgrades are refused."""

    def __init__(self) -> None:
        self.refuse_websockets = False
        self._hang_rules: list[FaultRule] = []
        self._fail_rules: list[FaultRule] = []
        self._hang_gate = asyncio.Event()
        self.held = 0

    def hang_next(self, count: int, path: str | None) -> None:
        self._hang_rules.append(FaultRule(count, path))

    def fail_next(self, count: int, path: str | None) -> None:
        self._fail_rules.append(FaultRule(count, path))

    def release(self) -> None:
        """Answer every hung request, and forget hang rules not used up yet."""
        self._hang_rules.clear()
        self._hang_gate.set()
        # Later hangs wait on a fresh gate; the released requests already hold the old one.
        self._hang_gate = asyncio.Event()

    def shutdown(self) -> None:
        """Let every held request through, and any request hung from now on."""
        self._hang_gate.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_sim/"):
            return await handler(request)
        if _take(self._hang_rules, request.path):
            log.debug("holding %s %s until released", request.method, request.path)
            self.held += 1
            try:
                await self._hang_gate.wait()
            finally:
                self.held -= 1
        if _take(self._fail_rules, request.path):
            return web.Response(status=500, text=INTERNAL_ERROR_TEXT, content_type="text/plain")
        return await handler(request)


class Pauses:
    """Where the worker holds until resumed, and where a running job is held right now."""

    def __init__(self) -> None:
        self.at: str | None = None
        # How many jobs may still start while paused at "tick" or "node".
        self._start_budget = 0
        self._resume_gate = asyncio.Event()
        self._resume_gate.set()
        self._blocked = asyncio.Event()
        self.blocked_at: str | None = None

    def pause(self, at: str, idle: bool) -> None:
        """Hold the worker until resume(); `idle` says no job is running now."""
        if at not in PAUSE_POINTS:
            raise ValueError(f"pause point must be one of {PAUSE_POINTS}, not {at!r}")
        self.at = at
        self._start_budget = 1 if at != "dequeue" and idle else 0
        if self._resume_gate.is_set():
            self._resume_gate = asyncio.Event()

    def resume(self) -> None:
        self.at = None
        self._resume_gate.set()
        self.unblock()

    def unblock(self) -> None:
        self._blocked.clear()
        self.blocked_at = None

    def may_start(self) -> bool:
        return self.at is None or self._start_budget > 0

    def started(self) -> None:
        if self.at is not None:
            self._start_budget -= 1

    async def until_blocked(self) -> str:
        await self._blocked.wait()
        assert self.blocked_at is not None
        return self.blocked_at

    async def point(self, at: str, node_id: str) -> None:
        """Block here while paused at `at`."""
        if self.at != at:
            return
        gate = self._resume_gate
        self.blocked_at = f"{at}:{node_id}"
        self._blocked.set()
        try:
            await gate.wait()
        finally:
            if self.blocked_at == f"{at}:{node_id}":
                self.unblock()


async def _control_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    text = await request.text()
    if not text.strip():
        return {}
    body = json.loads(text)
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected a JSON object")
    return body


class Controls:
    """The /_sim/* routes: the simulator's own controls, over HTTP."""

    def __init__(self, sim: ComfySimulator) -> None:
        self._sim = sim

    def add_routes(self, router: web.UrlDispatcher) -> None:
        controls: list[tuple[str, Handler]] = [
            ("drop_sockets", self.sim_drop_sockets),
            ("restart", self.sim_restart),
            ("refuse_websockets", self.sim_refuse_websockets),
            ("hang", self.sim_hang),
            ("fail", self.sim_fail),
            ("release", self.sim_release),
            ("pause", self.sim_pause),
            ("resume", self.sim_resume),
        ]
        for name, handler in controls:
            router.add_post(f"/_sim/{name}", handler, name=f"sim_{name}")
        router.add_get("/_sim/state", self.sim_state, name="sim_state")
        router.add_get("/_sim/ledger", self.sim_ledger, name="sim_ledger")
        router.add_get("/_sim/models", self.sim_models, name="sim_models")
        router.add_get("/_sim/inputs", self.sim_inputs, name="sim_inputs")

    async def sim_ledger(self, request: web.Request) -> web.Response:
        """Every prompt this GPU began to run: {prompt_id: {runs, outcome, ...}}."""
        return json_response(self._sim.ledger)

    async def sim_models(self, request: web.Request) -> web.Response:
        """Model files in VRAM, least recently used first, and the loads so far."""
        return json_response(self._sim.models)

    async def sim_drop_sockets(self, request: web.Request) -> web.Response:
        await self._sim.drop_sockets()
        return json_response({"ok": True})

    async def sim_restart(self, request: web.Request) -> web.Response:
        body = await _control_body(request)
        await self._sim.restart(wipe_inputs=bool(body.get("wipe_inputs", False)))
        return json_response({"ok": True})

    async def sim_inputs(self, request: web.Request) -> web.Response:
        """The upload count and every file in the input folder, with size and digest."""
        return json_response({"uploads": self._sim.uploads,
                              "files": await self._sim.input_files()})

    async def sim_refuse_websockets(self, request: web.Request) -> web.Response:
        body = await _control_body(request)
        self._sim.refuse_websockets(bool(body.get("refuse", True)))
        return json_response({"ok": True})

    async def sim_hang(self, request: web.Request) -> web.Response:
        body = await _control_body(request)
        self._sim.hang_next(int(body.get("count", 1)), body.get("path"))
        return json_response({"ok": True})

    async def sim_fail(self, request: web.Request) -> web.Response:
        body = await _control_body(request)
        self._sim.fail_next(int(body.get("count", 1)), body.get("path"))
        return json_response({"ok": True})

    async def sim_release(self, request: web.Request) -> web.Response:
        self._sim.release_hangs()
        return json_response({"ok": True})

    async def sim_pause(self, request: web.Request) -> web.Response:
        body = await _control_body(request)
        try:
            self._sim.pause(str(body.get("at", "dequeue")))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        return json_response({"ok": True})

    async def sim_resume(self, request: web.Request) -> web.Response:
        self._sim.resume()
        return json_response({"ok": True})

    async def sim_state(self, request: web.Request) -> web.Response:
        sim = self._sim
        return json_response({
            "queue_remaining": sim.queue_remaining,
            "running": sim.running_prompt_id,
            "pending": sim.pending_prompt_ids,
            "history": len(sim.history),
            "open_sockets": sim.open_sockets,
            "registered_clients": sim.registered_clients,
            "paused": sim.paused_at,
            "blocked_at": sim.blocked_at,
            "loading_model": sim.loading_model,
            "held_requests": sim.held_requests,
        })
