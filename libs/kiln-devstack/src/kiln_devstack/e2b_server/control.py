"""E2B's control-plane REST API (``X-API-KEY``; errors ``{"code", "message"}``): sandboxes
created (``Idempotency-Key``), listed, described, connected to (a paused one resumes), their
timeouts set, paused and killed."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .box import ENVD_VERSION, Box
from .namespaces import start_namespace
from .wire import Route, error

if TYPE_CHECKING:
    from .server import E2BServer


class ControlPlane:
    """The REST API over the server's sandboxes, its settings and its faults."""

    def __init__(self, server: E2BServer) -> None:
        self.server = server

    def routes(self) -> list[web.RouteDef]:
        one = self._one_sandbox
        return [
            web.post("/v2/sandboxes", self._keyed(self._create)),
            web.get("/v2/sandboxes", self._keyed(self._list)),
            web.post("/v2/sandboxes/{id}/connect", one(self._connect)),
            web.post("/sandboxes/{id}/timeout", one(self._timeout)),
            web.post("/sandboxes/{id}/pause", one(self._pause)),
            web.delete("/sandboxes/{id}", one(self._delete)),
            web.get("/sandboxes/{id}", one(self._get)),
        ]

    def _keyed(self, handler: Route) -> Route:
        """``handler`` for requests with an API key (each key seen is noted); 401 without."""

        async def route(request: web.Request) -> web.StreamResponse:
            key = request.headers.get("X-API-KEY", "")
            if not key:
                return error(401, "Invalid API key")
            self.server.api_keys.add(key)
            return await handler(request)

        return route

    def _one_sandbox(self, handler: Callable[[web.Request, Box], Awaitable[web.Response]]) -> Route:
        """``handler`` for a request about the sandbox ``{id}`` (not killed); 404 without."""

        async def route(request: web.Request) -> web.StreamResponse:
            box = self.server.sandboxes.get(request.match_info["id"])
            if box is None or box.state == "killed":
                return error(404, f"sandbox {request.match_info['id']} not found")
            return await handler(request, box)

        return self._keyed(route)

    def _described(self, box: Box, *, detail: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "templateID": box.template,
            "sandboxID": box.sandbox_id,
            "clientID": "local",
            "envdVersion": ENVD_VERSION,
        }
        if detail:
            out.update(
                startedAt=box.started_at.isoformat(),
                endAt=datetime.fromtimestamp(box.end_at, tz=UTC).isoformat(),
                cpuCount=2,
                memoryMB=512,
                diskSizeMB=1024,
                state=box.state,
                metadata=box.metadata,
                envdUnresponsiveAtPause=box.guest_unresponsive,
            )
        else:
            out.update(envdAccessToken=box.token, domain=None)
        return out

    def _too_long(self, timeout: int) -> web.Response | None:
        if timeout > self.server.max_timeout_s:
            hours = self.server.max_timeout_s // 3600
            return error(400, f"Timeout cannot be greater than {hours} hours")
        return None

    async def _create(self, request: web.Request) -> web.Response:
        server = self.server
        if server.create_faults:
            status = server.create_faults.pop(0)
            return error(status, "no capacity" if status == 503 else "rate limited")
        body = await request.json()
        if (refused := self._too_long(int(body.get("timeout", 300)))) is not None:
            return refused
        key = request.headers.get("Idempotency-Key")
        if key:
            for box in server.sandboxes.values():
                if box.idempotency_key == key and box.state != "killed":
                    box.calls.append("create (idempotent)")
                    return web.json_response(self._described(box), status=201)
        sandbox_id = "i" + uuid.uuid4().hex[:19]
        home = server.base / sandbox_id / "home-user"
        await asyncio.to_thread(home.mkdir, parents=True)
        box = Box(
            sandbox_id=sandbox_id,
            dir=home,
            template=body.get("templateID") or "base",
            metadata=dict(body.get("metadata") or {}),
            env=dict(body.get("envVars") or {}),
            started_at=datetime.now(UTC),
            end_at=time.time() + int(body.get("timeout", 300)),
            token=uuid.uuid4().hex,
            idempotency_key=key,
        )
        if server.namespaces:
            box.init_pid = await start_namespace(home)
        server.sandboxes[sandbox_id] = box
        box.calls.append(f"create timeout={int(body.get('timeout', 300))}")
        return web.json_response(self._described(box), status=201)

    async def _list(self, request: web.Request) -> web.Response:
        q = request.query
        wanted = {
            urllib.parse.unquote(k): urllib.parse.unquote(v)
            for k, v in urllib.parse.parse_qsl(q.get("metadata", ""))
        }
        states = set(q.get("state", "running,paused").split(","))
        boxes = [
            b
            for b in self.server.sandboxes.values()
            if b.state in states and all(b.metadata.get(k) == v for k, v in wanted.items())
        ]
        start = int(q.get("nextToken") or 0)
        limit = int(q.get("limit") or self.server.page_size)
        page = boxes[start : start + limit]
        headers = {"x-next-token": str(start + limit)} if start + limit < len(boxes) else {}
        return web.json_response([self._described(b, detail=True) for b in page], headers=headers)

    async def _get(self, request: web.Request, box: Box) -> web.Response:
        return web.json_response(self._described(box, detail=True))

    async def _connect(self, request: web.Request, box: Box) -> web.Response:
        if "connect" in self.server.stalled:
            await asyncio.sleep(3600)
        body = await request.json() if request.can_read_body else {}
        timeout = int(body.get("timeout", 300))
        if (refused := self._too_long(timeout)) is not None:
            return refused
        if box.state == "paused":
            if box.guest_unresponsive and body.get("memory", True) is not False:
                box.calls.append("resume refused (guest unresponsive)")
                return web.json_response(
                    {
                        "code": 409,
                        "message": "the sandbox's guest agent was unresponsive when it was paused",
                        "error_code": "sandbox_snapshot_guest_agent_unresponsive",
                    },
                    status=409,
                )
            box.signal_all(signal.SIGCONT)
            box.state = "running"
            box.end_at = time.time() + timeout
            box.calls.append(f"resume timeout={timeout}")
            return web.json_response(self._described(box), status=201)
        box.end_at = max(box.end_at, time.time() + timeout)
        box.calls.append(f"connect timeout={timeout}")
        return web.json_response(self._described(box), status=200)

    async def _timeout(self, request: web.Request, box: Box) -> web.Response:
        timeout = int((await request.json())["timeout"])
        if (refused := self._too_long(timeout)) is not None:
            return refused
        box.end_at = time.time() + timeout
        box.calls.append(f"set_timeout {timeout}")
        return web.Response(status=204)

    async def _pause(self, request: web.Request, box: Box) -> web.Response:
        if box.state == "paused":
            return error(409, f"sandbox {box.sandbox_id} is already paused")
        await box.pause()
        return web.Response(status=204)

    async def _delete(self, request: web.Request, box: Box) -> web.Response:
        box.calls.append("kill")
        await box.kill()
        return web.Response(status=204)
