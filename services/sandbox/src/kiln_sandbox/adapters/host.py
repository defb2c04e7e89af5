"""The local provider's work on this host: a command in a process group of its own (killed whole
at its timeout, only the head and tail of its output kept) and a listing of a directory tree."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import os
import signal
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from ..ports import CommandResult, EntryKind, FileInfo

_DRAIN_AFTER_EXIT_S = 0.5
_CHUNK = 64 * 1024


def is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


async def run_command(
    command: str,
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout_s: float,
    max_output: int,
    started: Callable[[int], None],
) -> CommandResult:
    """``bash -c command`` in a new session; ``started`` is told its process group."""
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        cwd=cwd,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    started(proc.pid)
    half = max(1, max_output // 2)
    head = bytearray()
    tail = bytearray()
    total = 0

    async def pump() -> None:
        nonlocal total, tail
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(_CHUNK):
            total += len(chunk)
            room = half - len(head)
            if room > 0:
                head.extend(chunk[:room])
                chunk = chunk[room:]
            if chunk:
                tail.extend(chunk)
                if len(tail) > half:
                    del tail[: len(tail) - half]

    reader = asyncio.create_task(pump())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    timed_out = False
    try:
        # proc.wait() would also wait for the pipe, which a background child may hold open.
        while proc.returncode is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                timed_out = True
                killpg(proc.pid)
                break
            await asyncio.wait({reader}, timeout=min(0.05, remaining))
            if reader.done() and proc.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=max(0.0, remaining))
        drain = _DRAIN_AFTER_EXIT_S if not timed_out else 2.0
        await asyncio.wait({reader}, timeout=drain)
        if timed_out and proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=5)
    finally:
        if proc.returncode is None:
            killpg(proc.pid)
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        transport = getattr(proc, "_transport", None)
        if transport is not None:
            transport.close()  # our end of a pipe a leftover background process still holds
    return CommandResult(
        exit_code=None if timed_out else proc.returncode,
        head=bytes(head),
        tail=bytes(tail),
        total_bytes=total,
        timed_out=timed_out,
    )


def killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def file_info(rel: str, st: os.stat_result) -> FileInfo:
    mode = st.st_mode
    kind: EntryKind = (
        "file" if stat.S_ISREG(mode)
        else "dir" if stat.S_ISDIR(mode)
        else "symlink" if stat.S_ISLNK(mode)
        else "other"
    )  # fmt: skip
    return FileInfo(rel, kind, st.st_size, st.st_mtime_ns, mode & 0o7777)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


class Walk:
    """``Machine.walk`` on this host: a stack of ``os.scandir``, symlinks not followed."""

    def __init__(
        self,
        root: str,
        skip_dirs: frozenset[str],
        exclude: Sequence[str],
        content: bool,
        limit: int | None,
    ) -> None:
        self.cut = len(root.rstrip(os.sep)) + 1  # host path -> workspace-relative
        self.skip_dirs, self.exclude, self.content, self.limit = skip_dirs, exclude, content, limit

    def _excluded(self, name: str, rel: str) -> bool:
        return any(
            fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(rel, pat) for pat in self.exclude
        )

    def run(self, top: str, depth: int | None) -> list[FileInfo]:
        out: list[FileInfo] = []
        limit = self.limit if self.limit is not None else -1
        stack: list[tuple[str, int]] = [(top, 1)]
        while stack and len(out) != limit:
            current, level = stack.pop()
            try:
                entries = list(os.scandir(current))
            except OSError:
                continue
            for entry in entries:
                rel = entry.path[self.cut :].replace(os.sep, "/")
                if self.exclude and self._excluded(entry.name, rel):
                    continue
                try:
                    info = file_info(rel, entry.stat(follow_symlinks=False))
                    if self.content and info.kind == "file":
                        info = replace(info, sha256=_sha256_file(entry.path))
                    elif self.content and info.kind == "symlink":
                        info = replace(info, target=os.readlink(entry.path))
                except OSError:
                    continue  # vanished or unreadable while walking
                out.append(info)
                if len(out) == limit:
                    break
                if (
                    info.kind == "dir"
                    and (depth is None or level < depth)
                    and entry.name not in self.skip_dirs
                ):
                    stack.append((entry.path, level + 1))
        return out
