"""A local E2B-compatible server: E2B's control-plane REST API and envd, on one aiohttp port, for
the unmodified ``e2b`` SDK pointed here by its own settings (``E2B_API_URL`` and
``E2B_SANDBOX_URL``, or ``api_url=`` / ``sandbox_url=``).

What it speaks (as read from the pinned SDK's source):

- REST, ``X-API-KEY``, errors ``{"code", "message"}``: ``POST /v2/sandboxes`` (201; an
  ``Idempotency-Key`` returns the sandbox first made with it), ``POST /v2/sandboxes/{id}/connect``
  (resumes a paused one; 404 when gone), ``POST /sandboxes/{id}/timeout``,
  ``POST /sandboxes/{id}/pause`` (409 when already paused), ``DELETE /sandboxes/{id}``,
  ``GET /sandboxes/{id}``, ``GET /v2/sandboxes`` (``metadata`` / ``state`` filters, paged by
  ``x-next-token``).
- envd, Connect RPC with JSON codecs, told apart by ``E2b-Sandbox-Id``: unary calls
  ``application/json``; server streams ``application/connect+json`` in 5-byte envelopes closed
  by an end-of-stream frame. ``process.Process/Start|Connect|SendSignal|List``,
  ``filesystem.Filesystem/Stat|MakeDir|Move|ListDir|Remove``, ``GET /files``, multipart and
  octet-stream ``POST /files``, ``/health``. Messages are the SDK's own generated classes.

What E2B's side does, reproduced: a command is ``/bin/bash -l -c`` as the SDK sends it, with
``HOME=/home/user``; at its ``Connect-Timeout-Ms`` deadline it is killed and its stream ends with
exit -1, "signal: killed"; a paused or killed sandbox's envd requests get 502 "... was not
found"; a sandbox ends at its timeout; ``MakeDir`` of an existing directory is ALREADY_EXISTS.

Each sandbox is a directory and, where the host allows unprivileged namespaces (``unshare -r -m
-p``), a user, mount and PID namespace in which that directory is mounted at the real
``/home/user`` (so its paths are E2B's; the user inside is the namespace's uid 0, named ``user``
only by ``USER``). Killing the namespace's first process ends every process in it, as a VM that
stops. Where namespaces are refused (``namespaces=False``), commands run on the host with
``HOME`` and ``cwd`` translated to the directory: a command that spells ``/home/user`` then
misses it.

Faults for tests (methods of :class:`E2BServer`): ``kill`` (mid-command too), ``pause`` from
outside, ``expire``, ``hang_health``, ``refuse_creates`` (429 or 503), ``guest_unresponsive``
(the next resume fails as needing a reboot), ``drop_streams`` (streams end without an end
event). A development and test tool, not a security boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from e2b.envd.filesystem import filesystem_pb as fs_pb
from e2b.envd.process import process_pb
from protobuf import Oneof
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

HOME = "/home/user"
ENVD_VERSION = "0.6.4"
_CONNECT_STATUS = {
    "canceled": 499, "unknown": 500, "invalid_argument": 400, "deadline_exceeded": 504,
    "not_found": 404, "already_exists": 409, "permission_denied": 403,
    "resource_exhausted": 429, "failed_precondition": 400, "aborted": 409, "unavailable": 503,
    "internal": 500, "unauthenticated": 401,
}  # fmt: skip
# The namespace's first process: mounts the sandbox's directory at /home/user, says so, then
# stays as its init (bash reaps the orphans reparented to it, as a VM's init does).
_NS_SETUP = (
    'mount -t tmpfs tmpfs /home && mkdir -p /home/user && mount --bind "$1" /home/user'
    ' && : >"$2" && exec bash -c "trap : CHLD; while :; do sleep 3600 & wait \\$!; done"'
)
_ENTER = 'cd -- "$1" || exit 1; shift; exec "$@"'


class RpcError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Proc:
    pid: int
    proc: asyncio.subprocess.Process
    config: process_pb.ProcessConfig
    tag: str | None
    subscribers: list[asyncio.Queue[Any]] = field(default_factory=list)
    killed_at_deadline: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    end: process_pb.ProcessEvent.EndEvent | None = None
    pump: asyncio.Task[None] | None = None


@dataclass
class Box:
    sandbox_id: str
    dir: Path  # what is /home/user inside
    template: str
    metadata: dict[str, str]
    env: dict[str, str]
    started_at: datetime
    end_at: float  # time.time()
    token: str
    state: str = "running"  # running | paused | killed
    init_pid: int | None = None  # the namespace's first process
    procs: dict[int, Proc] = field(default_factory=dict)
    streams: set[web.StreamResponse] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)
    guest_unresponsive: bool = False
    idempotency_key: str | None = None
    deadline_cap_s: float | None = None


def namespaces_work() -> bool:
    """Whether this host lets an unprivileged user make the namespaces a sandbox lives in."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return False
    try:
        done = subprocess.run(
            ["unshare", "-r", "-m", "-p", "--fork", "sh", "-c", "mount -t tmpfs tmpfs /home"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


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
        self._drop: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.url = ""

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> str:
        self.base.mkdir(parents=True, exist_ok=True)
        app = web.Application(client_max_size=1 << 30)
        r = app.router
        r.add_post("/v2/sandboxes", self._create)
        r.add_get("/v2/sandboxes", self._list)
        r.add_post("/v2/sandboxes/{id}/connect", self._connect)
        r.add_post("/sandboxes/{id}/timeout", self._timeout)
        r.add_post("/sandboxes/{id}/pause", self._pause)
        r.add_delete("/sandboxes/{id}", self._delete)
        r.add_get("/sandboxes/{id}", self._get)
        r.add_get("/health", self._health)
        r.add_get("/files", self._files_get)
        r.add_post("/files", self._files_post)
        r.add_post("/process.Process/{method}", self._process_rpc)
        r.add_post("/filesystem.Filesystem/{method}", self._fs_rpc)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1]
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

    # ---- faults and inspection ----------------------------------------------------------
    def home(self, sandbox_id: str) -> Path:
        """The host directory that is the sandbox's /home/user."""
        return self.sandboxes[sandbox_id].dir

    async def kill(self, sandbox_id: str) -> None:
        """The sandbox, every process in it and its files are gone (a crash, a kill)."""
        box = self.sandboxes[sandbox_id]
        was = box.state
        box.state = "killed"
        if was == "paused":
            self._signal_all(box, signal.SIGCONT)
        self._signal_all(box, signal.SIGKILL)
        for stream in list(box.streams):  # the connections to it drop
            if stream.task is not None:
                stream.task.cancel()
        box.streams.clear()
        for p in box.procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.proc.kill()
        await asyncio.to_thread(shutil.rmtree, box.dir.parent, True)

    async def expire(self, sandbox_id: str) -> None:
        """What E2B does at a sandbox's timeout."""
        box = self.sandboxes[sandbox_id]
        box.end_at = 0
        box.calls.append("expired")
        await self.kill(sandbox_id)

    async def pause(self, sandbox_id: str) -> None:
        """Pause from outside (the console, another client, auto-pause)."""
        await self._do_pause(self.sandboxes[sandbox_id])

    def hang_health(self, sandbox_id: str, hang: bool = True) -> None:
        (self._health_hangs.add if hang else self._health_hangs.discard)(sandbox_id)

    def drop_streams(self, sandbox_id: str) -> None:
        """The sandbox's open process streams end cleanly but without their end events."""
        box = self.sandboxes[sandbox_id]
        self._drop.add(sandbox_id)
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
        box = self.sandboxes[sandbox_id]
        if box.init_pid is None:
            return pid if Path(f"/proc/{pid}").exists() else None
        ns = _ns(box.init_pid)
        for host in _pids():
            if _ns(host) != ns:
                continue
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{host}/status").read_text().splitlines():
                    if line.startswith("NSpid:") and int(line.split()[-1]) == pid:
                        return host
        return None

    def running(self) -> list[str]:
        return [i for i, b in self.sandboxes.items() if b.state == "running"]

    # ---- REST ---------------------------------------------------------------------------
    def _authorised(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("X-API-KEY", "")
        if not key:
            return _error(401, "Invalid API key")
        self.api_keys.add(key)
        return None

    def _box(self, request: web.Request) -> Box | None:
        box = self.sandboxes.get(request.match_info["id"])
        return box if box is not None and box.state != "killed" else None

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
        if timeout > self.max_timeout_s:
            hours = self.max_timeout_s // 3600
            return _error(400, f"Timeout cannot be greater than {hours} hours")
        return None

    async def _create(self, request: web.Request) -> web.Response:
        if (denied := self._authorised(request)) is not None:
            return denied
        if self.create_faults:
            status = self.create_faults.pop(0)
            return _error(status, "no capacity" if status == 503 else "rate limited")
        body = await request.json()
        if (refused := self._too_long(int(body.get("timeout", 300)))) is not None:
            return refused
        key = request.headers.get("Idempotency-Key")
        if key:
            for box in self.sandboxes.values():
                if box.idempotency_key == key and box.state != "killed":
                    box.calls.append("create (idempotent)")
                    return web.json_response(self._described(box), status=201)
        sandbox_id = "i" + uuid.uuid4().hex[:19]
        home = self.base / sandbox_id / "home-user"
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
        if self.namespaces:
            box.init_pid = await _start_namespace(home)
        self.sandboxes[sandbox_id] = box
        box.calls.append(f"create timeout={int(body.get('timeout', 300))}")
        return web.json_response(self._described(box), status=201)

    async def _list(self, request: web.Request) -> web.Response:
        if (denied := self._authorised(request)) is not None:
            return denied
        q = request.query
        wanted = {
            urllib.parse.unquote(k): urllib.parse.unquote(v)
            for k, v in urllib.parse.parse_qsl(q.get("metadata", ""))
        }
        states = set(q.get("state", "running,paused").split(","))
        boxes = [
            b
            for b in self.sandboxes.values()
            if b.state in states and all(b.metadata.get(k) == v for k, v in wanted.items())
        ]
        start = int(q.get("nextToken") or 0)
        limit = int(q.get("limit") or self.page_size)
        page = boxes[start : start + limit]
        headers = {"x-next-token": str(start + limit)} if start + limit < len(boxes) else {}
        return web.json_response([self._described(b, detail=True) for b in page], headers=headers)

    async def _get(self, request: web.Request) -> web.Response:
        if (denied := self._authorised(request)) is not None:
            return denied
        if (box := self._box(request)) is None:
            return _error(404, f"sandbox {request.match_info['id']} not found")
        return web.json_response(self._described(box, detail=True))

    async def _connect(self, request: web.Request) -> web.Response:
        if (denied := self._authorised(request)) is not None:
            return denied
        if (box := self._box(request)) is None:
            return _error(404, f"sandbox {request.match_info['id']} not found")
        if "connect" in self.stalled:
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
            self._signal_all(box, signal.SIGCONT)
            box.state = "running"
            box.end_at = time.time() + timeout
            box.calls.append(f"resume timeout={timeout}")
            return web.json_response(self._described(box), status=201)
        box.end_at = max(box.end_at, time.time() + timeout)
        box.calls.append(f"connect timeout={timeout}")
        return web.json_response(self._described(box), status=200)

    async def _timeout(self, request: web.Request) -> web.Response:
        if (denied := self._authorised(request)) is not None:
            return denied
        if (box := self._box(request)) is None:
            return _error(404, f"sandbox {request.match_info['id']} not found")
        timeout = int((await request.json())["timeout"])
        if (refused := self._too_long(timeout)) is not None:
            return refused
        box.end_at = time.time() + timeout
        box.calls.append(f"set_timeout {timeout}")
        return web.Response(status=204)

    async def _pause(self, request: web.Request) -> web.Response:
        if (denied := self._authorised(request)) is not None:
            return denied
        if (box := self._box(request)) is None:
            return _error(404, f"sandbox {request.match_info['id']} not found")
        if box.state == "paused":
            return _error(409, f"sandbox {box.sandbox_id} is already paused")
        await self._do_pause(box)
        return web.Response(status=204)

    async def _do_pause(self, box: Box) -> None:
        box.state = "paused"
        box.calls.append("pause")
        for stream in list(box.streams):  # E2B cancels the requests in flight
            if stream.task is not None:
                stream.task.cancel()
        self._signal_all(box, signal.SIGSTOP)

    async def _delete(self, request: web.Request) -> web.Response:
        if (denied := self._authorised(request)) is not None:
            return denied
        if (box := self._box(request)) is None:
            return _error(404, f"sandbox {request.match_info['id']} not found")
        box.calls.append("kill")
        await self.kill(box.sandbox_id)
        return web.Response(status=204)

    # ---- envd ---------------------------------------------------------------------------
    def _envd_box(self, request: web.Request) -> Box | web.Response:
        sandbox_id = request.headers.get("E2b-Sandbox-Id", "")
        box = self.sandboxes.get(sandbox_id)
        if box is None or box.state != "running":
            return web.json_response(
                {
                    "code": 502,
                    "message": f"The sandbox {sandbox_id} was not found",
                    "sandboxId": sandbox_id,
                },
                status=502,
            )
        if request.headers.get("X-Access-Token") != box.token:
            return _error(401, "invalid access token")
        return box

    async def _health(self, request: web.Request) -> web.StreamResponse:
        sandbox_id = request.headers.get("E2b-Sandbox-Id", "")
        if sandbox_id in self._health_hangs:
            await asyncio.sleep(3600)
        box = self._envd_box(request)
        if isinstance(box, web.Response):
            return box
        return web.Response(status=204)

    def _path(self, box: Box, path: str) -> Path:
        if not path.startswith("/"):
            path = f"{HOME}/{path}"
        path = os.path.normpath(path)
        if path != HOME and not path.startswith(HOME + "/"):
            raise RpcError("permission_denied", f"this server maps only {HOME}, not {path!r}")
        return box.dir / path[len(HOME) :].lstrip("/")

    async def _files_get(self, request: web.Request) -> web.StreamResponse:
        box = self._envd_box(request)
        if isinstance(box, web.Response):
            return box
        box.calls.append("files.read")
        try:
            host = self._path(box, request.query.get("path", ""))
            data = await asyncio.to_thread(host.read_bytes)
        except RpcError as err:
            return _error(403, err.message)
        except FileNotFoundError:
            return _error(404, f"path '{request.query.get('path')}' does not exist")
        except IsADirectoryError:
            return _error(400, f"path '{request.query.get('path')}' is a directory")
        return web.Response(body=data, content_type="application/octet-stream")

    async def _files_post(self, request: web.Request) -> web.StreamResponse:
        box = self._envd_box(request)
        if isinstance(box, web.Response):
            return box
        box.calls.append("files.write")
        uploads: list[tuple[str, bytes]] = []
        if request.content_type == "multipart/form-data":
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if isinstance(part, BodyPartReader):  # one file: ?path=; more: each part's name
                    name = request.query.get("path") or part.filename or ""
                    uploads.append((name, bytes(await part.read())))
        else:
            uploads.append((request.query.get("path", ""), await request.read()))
        written = []
        for path, data in uploads:
            try:
                host = self._path(box, path)
                await asyncio.to_thread(_write, host, data)
            except RpcError as err:
                return _error(403, err.message)
            except OSError as err:
                return _error(400, f"cannot write '{path}': {err.strerror}")
            written.append({"name": host.name, "type": "file", "path": path})
        return web.json_response(written)

    async def _fs_rpc(self, request: web.Request) -> web.StreamResponse:
        box = self._envd_box(request)
        if isinstance(box, web.Response):
            return box
        method = request.match_info["method"]
        box.calls.append(f"fs.{method}")
        handlers: dict[str, tuple[Any, Callable[[Box, Any], Awaitable[Any]]]] = {
            "Stat": (fs_pb.StatRequest, self._stat),
            "MakeDir": (fs_pb.MakeDirRequest, self._make_dir),
            "Move": (fs_pb.MoveRequest, self._move),
            "ListDir": (fs_pb.ListDirRequest, self._list_dir),
            "Remove": (fs_pb.RemoveRequest, self._remove),
        }
        if method not in handlers:
            return _rpc_error(RpcError("unimplemented", f"{method} is not served here"))
        cls, handler = handlers[method]
        try:
            reply = await handler(box, cls.from_json(await request.read()))
        except RpcError as err:
            return _rpc_error(err)
        return web.Response(body=reply.to_json(), content_type="application/json")

    def _entry(self, box: Box, host: Path) -> fs_pb.EntryInfo:
        try:
            st = host.lstat()
        except FileNotFoundError as err:
            raise RpcError("not_found", f"path '{host}' does not exist") from err
        link = host.is_symlink()
        kind = (
            fs_pb.FileType.DIRECTORY
            if host.is_dir() and not link
            else fs_pb.FileType.SYMLINK
            if link
            else fs_pb.FileType.FILE
        )
        inside = HOME + str(host)[len(str(box.dir)) :]
        ts = Timestamp(seconds=int(st.st_mtime), nanos=st.st_mtime_ns % 1_000_000_000)
        return fs_pb.EntryInfo(
            name=host.name, type=kind, path=inside, size=st.st_size, mode=st.st_mode & 0o7777,
            permissions="", owner="user", group="user", modified_time=ts,
            symlink_target=os.readlink(host) if link else None, is_symlink=link,
        )  # fmt: skip

    async def _stat(self, box: Box, req: fs_pb.StatRequest) -> fs_pb.StatResponse:
        return fs_pb.StatResponse(entry=self._entry(box, self._path(box, req.path)))

    async def _make_dir(self, box: Box, req: fs_pb.MakeDirRequest) -> fs_pb.MakeDirResponse:
        host = self._path(box, req.path)
        if host.is_dir():
            raise RpcError("already_exists", f"directory '{req.path}' already exists")
        try:
            host.mkdir(parents=True)
        except OSError as err:
            raise RpcError("invalid_argument", f"cannot make '{req.path}': {err}") from err
        return fs_pb.MakeDirResponse(entry=self._entry(box, host))

    async def _move(self, box: Box, req: fs_pb.MoveRequest) -> fs_pb.MoveResponse:
        src, dst = self._path(box, req.source), self._path(box, req.destination)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dst)
        except FileNotFoundError as err:
            raise RpcError("not_found", f"path '{req.source}' does not exist") from err
        return fs_pb.MoveResponse(entry=self._entry(box, dst))

    async def _list_dir(self, box: Box, req: fs_pb.ListDirRequest) -> fs_pb.ListDirResponse:
        host = self._path(box, req.path)
        if not host.is_dir():
            raise RpcError("not_found", f"directory '{req.path}' does not exist")
        depth = max(1, req.depth)
        entries = []
        for child in sorted(host.rglob("*")):
            if len(child.relative_to(host).parts) <= depth:
                entries.append(self._entry(box, child))
        return fs_pb.ListDirResponse(entries=entries)

    async def _remove(self, box: Box, req: fs_pb.RemoveRequest) -> fs_pb.RemoveResponse:
        host = self._path(box, req.path)
        if host.is_dir() and not host.is_symlink():
            await asyncio.to_thread(shutil.rmtree, host)
        else:
            try:
                host.unlink()
            except FileNotFoundError as err:
                raise RpcError("not_found", f"path '{req.path}' does not exist") from err
        return fs_pb.RemoveResponse()

    async def _process_rpc(self, request: web.Request) -> web.StreamResponse:
        box = self._envd_box(request)
        if isinstance(box, web.Response):
            return box
        method = request.match_info["method"]
        box.calls.append(f"process.{method}")
        try:
            if method in ("Start", "Connect"):
                return await self._stream(box, method, request)
            if method == "SendSignal":
                req = process_pb.SendSignalRequest.from_json(await request.read())
                proc = self._selected(box, req.process)
                sig = signal.SIGKILL if req.signal == process_pb.Signal.SIGKILL else signal.SIGTERM
                _killpg(proc.pid, sig)
                reply: Any = process_pb.SendSignalResponse()
            elif method == "List":
                reply = process_pb.ListResponse(
                    processes=[
                        process_pb.ProcessInfo(config=p.config, pid=p.pid, tag=p.tag)
                        for p in box.procs.values()
                        if not p.done.is_set()
                    ]
                )
            else:
                raise RpcError("unimplemented", f"{method} is not served here")
        except RpcError as err:
            return _rpc_error(err)
        return web.Response(body=reply.to_json(), content_type="application/json")

    def _selected(self, box: Box, selector: Any) -> Proc:
        chosen = selector.selector if selector is not None else None
        for p in box.procs.values():
            if chosen is not None and (
                (chosen.field == "pid" and p.pid == chosen.value)
                or (chosen.field == "tag" and p.tag == chosen.value)
            ):
                if p.done.is_set():
                    break
                return p
        raise RpcError("not_found", f"process {chosen.value if chosen else '?'} not found")

    async def _stream(self, box: Box, method: str, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if len(raw) < 5:
            raise RpcError("invalid_argument", "an enveloped request was expected")
        (size,) = struct.unpack(">I", raw[1:5])
        payload = raw[5 : 5 + size]
        deadline_ms = request.headers.get("Connect-Timeout-Ms")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        reply_cls: Any
        if method == "Start":
            req = process_pb.StartRequest.from_json(payload)
            proc = await self._spawn(box, req)
            reply_cls = process_pb.StartResponse
        else:
            creq = process_pb.ConnectRequest.from_json(payload)
            proc = self._selected(box, creq.process)
            reply_cls = process_pb.ConnectResponse
        proc.subscribers.append(queue)
        if method == "Start":
            deadline = int(deadline_ms) / 1000 if deadline_ms and int(deadline_ms) > 0 else None
            if box.deadline_cap_s is not None:
                deadline = min(deadline or box.deadline_cap_s, box.deadline_cap_s)
            if deadline is not None:
                asyncio.get_running_loop().call_later(deadline, self._deadline, proc)
        resp = web.StreamResponse(headers={"Content-Type": "application/connect+json"})
        box.streams.add(resp)
        try:
            await resp.prepare(request)
            start = process_pb.ProcessEvent.StartEvent(pid=proc.pid)
            await _frame(
                resp,
                reply_cls(event=process_pb.ProcessEvent(event=Oneof[Any, Any]("start", start))),
            )
            while True:
                item = await queue.get()
                if item is None:  # the stream is dropped without its end event
                    await _end_frame(resp, None)
                    return resp
                await _frame(resp, reply_cls(event=process_pb.ProcessEvent(event=item)))
                if item.field == "end":
                    break
            await _end_frame(resp, None)
            return resp
        except asyncio.CancelledError:
            if box.state == "paused":  # E2B cancels the request: the client sees CANCELED
                with contextlib.suppress(Exception):
                    await asyncio.shield(_end_frame(resp, RpcError("canceled", "request canceled")))
                    return resp
            if request.transport is not None:  # killed: the connection drops
                request.transport.abort()
            raise
        finally:
            box.streams.discard(resp)
            with contextlib.suppress(ValueError):
                proc.subscribers.remove(queue)

    def _deadline(self, proc: Proc) -> None:
        if not proc.done.is_set():
            proc.killed_at_deadline = True
            _killpg(proc.pid, signal.SIGKILL)

    async def _spawn(self, box: Box, req: process_pb.StartRequest) -> Proc:
        cfg = req.process
        if cfg is None:
            raise RpcError("invalid_argument", "no process")
        cwd = cfg.cwd or HOME
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": HOME,
            "USER": "user",
            "LOGNAME": "user",
            "LANG": "C.UTF-8",
            "E2B_SANDBOX": "true",
            "E2B_SANDBOX_ID": box.sandbox_id,
            **box.env,
            **dict(cfg.envs),
        }
        argv = [cfg.cmd, *cfg.args]
        if box.init_pid is not None:
            host_cmd = [
                "nsenter", "-t", str(box.init_pid), "-U", "-m", "-p", "--preserve-credentials",
                "--", "/bin/sh", "-c", _ENTER, "kiln", cwd, *argv,
            ]  # fmt: skip
            host_cwd: str | Path = box.dir
        else:
            env["HOME"] = str(box.dir)
            host_cmd = argv
            try:
                host_cwd = self._path(box, cwd)
            except RpcError:
                host_cwd = cwd
        try:
            child = await asyncio.create_subprocess_exec(
                *host_cmd, cwd=host_cwd, env=env, start_new_session=True,
                stdin=asyncio.subprocess.PIPE if req.stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
        except OSError as err:
            raise RpcError("invalid_argument", f"cannot start {cfg.cmd}: {err}") from err
        proc = Proc(pid=child.pid, proc=child, config=cfg, tag=req.tag or None)
        box.procs[child.pid] = proc
        proc.pump = asyncio.create_task(self._pump(box, proc))
        return proc

    async def _pump(self, box: Box, proc: Proc) -> None:
        def send(ev: Any) -> None:
            for q in list(proc.subscribers):
                q.put_nowait(ev)

        async def read(stream: asyncio.StreamReader | None, name: str) -> None:
            assert stream is not None
            while chunk := await stream.read(32768):
                send(
                    Oneof(
                        "data",
                        process_pb.ProcessEvent.DataEvent(output=Oneof[Any, Any](name, chunk)),
                    )
                )

        await asyncio.gather(read(proc.proc.stdout, "stdout"), read(proc.proc.stderr, "stderr"))
        rc = await proc.proc.wait()
        if proc.killed_at_deadline or rc < 0:
            name = signal.Signals(-rc).name.removeprefix("SIG").lower() if rc < 0 else "killed"
            status = "signal: killed" if proc.killed_at_deadline else f"signal: {name}"
            end = process_pb.ProcessEvent.EndEvent(
                exit_code=-1, exited=False, status=status, error=status
            )
        else:
            end = process_pb.ProcessEvent.EndEvent(
                exit_code=rc, exited=True, status=f"exit status {rc}",
                error=None if rc == 0 else f"exit status {rc}",
            )  # fmt: skip
        proc.end = end
        proc.done.set()
        if box.state != "killed" and box.sandbox_id not in self._drop:
            send(Oneof("end", end))

    def _signal_all(self, box: Box, sig: signal.Signals) -> None:
        if box.init_pid is not None:
            ns = _ns(box.init_pid)
            for pid in _pids():
                if pid != box.init_pid and ns is not None and _ns(pid) == ns:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
            if sig == signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(box.init_pid, sig)
        for p in box.procs.values():
            if not p.done.is_set():
                _killpg(p.pid, sig)


async def _start_namespace(home: Path) -> int:
    """A user, mount and PID namespace whose /home/user is ``home``; its first process's pid."""
    ready = home.parent / "ready"
    outer = await asyncio.create_subprocess_exec(  # dies with this server (PDEATHSIG)
        "unshare", "-r", "-m", "-p", "--fork", "--kill-child", "--mount-proc",
        "sh", "-c", _NS_SETUP, "kiln", str(home), str(ready), start_new_session=True,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent,
    )  # fmt: skip
    for _ in range(1000):
        children = _children(outer.pid)
        if children and ready.exists():
            return children[0]
        await asyncio.sleep(0.01)
    outer.kill()
    raise RuntimeError("the sandbox's namespace did not start")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the server dies, however it dies."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _killpg(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _write(host: Path, data: bytes) -> None:
    host.parent.mkdir(parents=True, exist_ok=True)
    host.write_bytes(data)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status)


def _rpc_error(err: RpcError) -> web.Response:
    return web.json_response(
        {"code": err.code, "message": err.message}, status=_CONNECT_STATUS.get(err.code, 500)
    )


async def _frame(resp: web.StreamResponse, message: Any) -> None:
    data = message.to_json().encode()
    await resp.write(struct.pack(">BI", 0, len(data)) + data)


async def _end_frame(resp: web.StreamResponse, err: RpcError | None) -> None:
    body = {} if err is None else {"error": {"code": err.code, "message": err.message}}
    data = json.dumps(body).encode()
    await resp.write(struct.pack(">BI", 2, len(data)) + data)
    await resp.write_eof()


def main() -> None:  # pragma: no cover - the process the local stack runs
    import argparse

    parser = argparse.ArgumentParser(description="A local E2B-compatible server")
    parser.add_argument("--base", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    async def run() -> None:
        server = E2BServer(args.base, host=args.host, port=args.port)
        url = await server.start()
        print(url, "namespaces" if server.namespaces else "no namespaces", flush=True)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        try:
            await stopping.wait()
        finally:
            await server.stop()  # every sandbox (and its namespace) ends with the server

    asyncio.run(run())


if __name__ == "__main__":  # pragma: no cover - run as a process by the local stack, like main()
    main()
