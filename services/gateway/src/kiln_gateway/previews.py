"""A build's previews: the ports its sandbox's processes listen on (``PreviewAvailable``,
``PreviewGone``), projected onto the build row, and what the gateway's proxy may reach.

The local provider runs a build's processes on the host's loopback, beside every other service
of the machine (the gateway itself, Postgres, NATS ...). So the proxy reaches a port only when
all of these hold: the build is the caller's and running; its projection has a preview on that
port, seen last as available, from the ``local`` provider; no other build's preview has claimed
that port since (the newest claim wins: a port freed and taken again belongs to its new
process); the port is not one of the gateway's own (``refused_ports``). The host is always
127.0.0.1, never taken from the request, and the path is sent as a path only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from kiln_contracts import PreviewAvailable, PreviewGone

from . import model
from .model import Build

MAX_PREVIEWS = 20
LOOPBACK = "127.0.0.1"


def previews_after(previews: str, event: PreviewAvailable | PreviewGone, seq: int) -> str:
    """The projection's JSON list of previews (one per port, the newest event's state) after
    a preview event at stream sequence ``seq``; an older event than the port's last is ignored."""
    listed: list[dict[str, object]] = json.loads(previews or "[]")
    entry = next((p for p in listed if p.get("port") == event.port), None)
    if entry is not None and int(str(entry.get("seq", 0))) >= seq:
        return previews
    if isinstance(event, PreviewGone):
        if entry is None or entry.get("process_id") != event.process_id:
            return previews  # the port's preview is another process's now
        entry.update(status="gone", reason=event.reason, seq=seq)
    else:
        if entry is None:
            entry = {"port": event.port}
            listed.append(entry)
        entry.update(
            status="available",
            reason=None,
            seq=seq,
            process_id=event.process_id,
            provider=event.provider,
            sandbox_id=event.sandbox_id,
            url=event.url,
            traffic_access_token=event.traffic_access_token,
        )
    return json.dumps(listed[-MAX_PREVIEWS:])


@dataclass(frozen=True)
class Preview:
    port: int
    status: str  # available or gone
    url: str
    provider: str
    process_id: str
    reason: str | None = None
    traffic_access_token: str | None = None
    seq: int = 0


def previews_of(build: Build) -> list[Preview]:
    """The build's previews as a user sees them: one that is not running has none available
    (its processes are stopped: sleeping, or ended), whatever the last event said."""
    out = []
    for p in json.loads(build.state.previews or "[]"):
        status, reason = str(p.get("status", "gone")), p.get("reason")
        if status == "available" and build.state.status != model.RUNNING:
            status, reason = "gone", f"the build is {build.state.status}"
        out.append(
            Preview(
                port=int(p["port"]),
                status=status,
                url=str(p.get("url") or ""),
                provider=str(p.get("provider") or ""),
                process_id=str(p.get("process_id") or ""),
                reason=str(reason) if reason else None,
                traffic_access_token=p.get("traffic_access_token"),
                seq=int(p.get("seq") or 0),
            )
        )
    return out


class Unreachable(Exception):
    """Why the proxy does not reach a port: ``status`` and the page's text."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


def target(
    build: Build, port: int, holder: str | None, refused_ports: frozenset[int]
) -> tuple[str, int]:
    """The (host, port) the proxy may open for ``build``'s preview on ``port``, or
    ``Unreachable``. ``holder``: the running build whose available local preview claimed the
    port last (``BuildStore.preview_holder``)."""
    if port in refused_ports:
        raise Unreachable(403, "Not a preview", f"port {port} is not a preview port")
    if build.state.status == model.SLEEPING:
        raise Unreachable(
            503,
            "The build is sleeping",
            "Its processes are stopped while it sleeps; the preview comes back when the build "
            "wakes and the app is started again.",
        )
    if build.state.status != model.RUNNING:
        raise Unreachable(
            410, "No preview", f"The build is {build.state.status}: its processes are stopped."
        )
    preview = next((p for p in previews_of(build) if p.port == port), None)
    if preview is None:
        raise Unreachable(404, "No preview", f"no process of this build listens on port {port}")
    if preview.status != "available":
        raise Unreachable(
            410, "The preview is gone", f"port {port}: {preview.reason or 'no longer listening'}"
        )
    if preview.provider != "local":
        raise Unreachable(
            404, "Not proxied", f"this preview is served by its sandbox at {preview.url}"
        )
    if holder != build.build_id:
        raise Unreachable(
            404, "No preview", f"port {port} is no longer this build's (another build holds it)"
        )
    return LOOPBACK, port


def process_pid(build: Build, process_id: str) -> int | None:
    """The pid (its session's id) of one of the build's running processes, as projected."""
    for p in json.loads(build.state.processes or "[]"):
        if p.get("process_id") == process_id and p.get("status") == "running":
            pid = p.get("pid")
            return int(pid) if isinstance(pid, int) else None
    return None


def _listening_inodes(port: int, proc: Path) -> set[str]:
    inodes = set()
    for table in ("net/tcp", "net/tcp6"):
        try:
            lines = (proc / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f[9])
    return inodes


def held_by(port: int, session: int, proc: Path = Path("/proc")) -> bool:
    """Whether a process of session ``session`` holds the socket listening on TCP ``port``
    (``/proc``: the LISTEN entries' inodes against each process's fds). Blocking: run it in a
    thread."""
    wanted = {f"socket:[{i}]" for i in _listening_inodes(port, proc)}
    if not wanted:
        return False
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[3]) != session:
                continue
            for fd in os.scandir(d / "fd"):
                if os.readlink(fd.path) in wanted:
                    return True
        except (OSError, ValueError, IndexError):
            continue
    return False
