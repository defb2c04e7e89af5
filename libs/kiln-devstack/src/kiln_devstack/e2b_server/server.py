"""The server: one aiohttp port for the control plane (``control``) and envd (``process``,
``files``, ``/health``), the reaper that ends sandboxes at their timeouts, and the faults and
inspection tests use."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aiohttp import web

from .box import Box
from .control import ControlPlane
from .files import Files
from .namespaces import namespaces_work
from .process import Processes
from .wire import envd_box


class E2BServer:
    """The server; ``await start()`` binds it, ``url`` is both E2B_API_URL and E2B_SANDBOX_URL."""

    def __init__(
        self,
        base: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        namespaces: bool | None = None,
        page_size: int = 100,
        max_timeout_s: int = 86_400,
    ) -> None:
        self.base = Path(base)
        self.host, self.port = host, port
        self.namespaces = namespaces_work() if namespaces is None else namespaces
        self.page_size = page_size
        self.max_timeout_s = max_timeout_s
        self.stalled: set[str] = set()  # REST operations that never answer ("connect", ...)
        self.sandboxes: dict[str, Box] = {}
        self.api_keys: set[str] = set()
        self.create_faults: list[int] = []  # statuses the next creates answer with
        self._health_hangs: set[str] = set()
        self._processes = Processes(self.sandboxes)
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.url = ""

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> str:
        self.base.mkdir(parents=True, exist_ok=True)
        app = web.Application(client_max_size=1 << 30)
        app.add_routes(ControlPlane(self).routes())
        app.router.add_get("/health", self._health)
        app.add_routes(Files(self.sandboxes).routes())
        app.add_routes(self._processes.routes())
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://{self.host}:{self.port}"
        self._reaper = asyncio.create_task(self._reap())
        return self.url

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for box in list(self.sandboxes.values()):
            if box.state != "killed":
                await self.kill(box.sandbox_id)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            now = time.time()
            for box in list(self.sandboxes.values()):
                if box.state == "running" and box.end_at <= now:
                    box.calls.append("expired")
                    await self.kill(box.sandbox_id)

    async def _health(self, request: web.Request) -> web.StreamResponse:
        sandbox_id = request.headers.get("E2b-Sandbox-Id", "")
        if sandbox_id in self._health_hangs:
            await asyncio.sleep(3600)
        box = envd_box(self.sandboxes, request)
        if isinstance(box, web.Response):
            return box
        return web.Response(status=204)

    # ---- faults and inspection ----------------------------------------------------------
    def home(self, sandbox_id: str) -> Path:
        """The host directory that is the sandbox's /home/user."""
        return self.sandboxes[sandbox_id].dir

    async def kill(self, sandbox_id: str) -> None:
        """The sandbox, every process in it and its files are gone (a crash, a kill)."""
        await self.sandboxes[sandbox_id].kill()

    async def expire(self, sandbox_id: str) -> None:
        """What E2B does at a sandbox's timeout."""
        box = self.sandboxes[sandbox_id]
        box.end_at = 0
        box.calls.append("expired")
        await self.kill(sandbox_id)

    async def pause(self, sandbox_id: str) -> None:
        """Pause from outside (the console, another client, auto-pause)."""
        await self.sandboxes[sandbox_id].pause()

    def hang_health(self, sandbox_id: str, hang: bool = True) -> None:
        (self._health_hangs.add if hang else self._health_hangs.discard)(sandbox_id)

    def drop_streams(self, sandbox_id: str) -> None:
        """The sandbox's open process streams end cleanly but without their end events."""
        box = self.sandboxes[sandbox_id]
        self._processes.dropped.add(sandbox_id)
        for p in box.procs.values():
            for q in p.subscribers:
                q.put_nowait(None)

    def refuse_creates(self, *statuses: int) -> None:
        self.create_faults.extend(statuses)

    def guest_unresponsive(self, sandbox_id: str) -> None:
        """Its envd stopped answering before it was paused: a resume with memory fails."""
        self.sandboxes[sandbox_id].guest_unresponsive = True

    def cut_deadlines(self, sandbox_id: str, seconds: float | None) -> None:
        """envd kills the sandbox's commands after ``seconds`` whatever their deadline (what
        arrives when a client's own timeout is not enforced)."""
        self.sandboxes[sandbox_id].deadline_cap_s = seconds

    def host_pid(self, sandbox_id: str, pid: int) -> int | None:
        """The host's pid of the process that is ``pid`` inside the sandbox (alive), or None."""
        return self.sandboxes[sandbox_id].host_pid(pid)

    def running(self) -> list[str]:
        return [i for i, b in self.sandboxes.items() if b.state == "running"]
