"""A sandbox as the server keeps it (``Box``), its processes (``Proc``), and what happens to it:
killed, paused, signalled, its paths mapped to the host."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from e2b.envd.process import process_pb

from .namespaces import killpg, pid_namespace, pids

HOME = "/home/user"
ENVD_VERSION = "0.6.4"


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

    async def kill(self) -> None:
        """The sandbox, every process in it and its files are gone (a crash, a kill)."""
        was = self.state
        self.state = "killed"
        if was == "paused":
            self.signal_all(signal.SIGCONT)
        self.signal_all(signal.SIGKILL)
        self._cancel_streams()  # the connections to it drop
        self.streams.clear()
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.proc.kill()
        await asyncio.to_thread(shutil.rmtree, self.dir.parent, True)

    async def pause(self) -> None:
        self.state = "paused"
        self.calls.append("pause")
        self._cancel_streams()  # E2B cancels the requests in flight
        self.signal_all(signal.SIGSTOP)

    def _cancel_streams(self) -> None:
        for stream in list(self.streams):
            if stream.task is not None:
                stream.task.cancel()

    def signal_all(self, sig: signal.Signals) -> None:
        if self.init_pid is not None:
            ns = pid_namespace(self.init_pid)
            for pid in pids():
                if pid != self.init_pid and ns is not None and pid_namespace(pid) == ns:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
            if sig == signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, sig)
        for p in self.procs.values():
            if not p.done.is_set():
                killpg(p.pid, sig)

    def host_path(self, path: str) -> Path:
        """The host's path of ``path`` inside the sandbox (relative: to /home/user)."""
        if not path.startswith("/"):
            path = f"{HOME}/{path}"
        path = os.path.normpath(path)
        if path != HOME and not path.startswith(HOME + "/"):
            raise RpcError("permission_denied", f"this server maps only {HOME}, not {path!r}")
        return self.dir / path[len(HOME) :].lstrip("/")

    def host_pid(self, pid: int) -> int | None:
        """The host's pid of the process that is ``pid`` inside the sandbox (alive), or None."""
        if self.init_pid is None:
            return pid if Path(f"/proc/{pid}").exists() else None
        ns = pid_namespace(self.init_pid)
        for host in pids():
            if pid_namespace(host) != ns:
                continue
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{host}/status").read_text().splitlines():
                    if line.startswith("NSpid:") and int(line.split()[-1]) == pid:
                        return host
        return None
