"""The ``local`` sandbox provider: a directory per build and plain subprocesses.

THIS IS NO SECURITY BOUNDARY. Commands run as the service's own user on the service's host, with
its network and whatever it can reach; the path checks only keep the *file tools* inside the
workspace, a ``bash`` command can read and write anything the service can. Use it for
development, tests and the offline demo only; run untrusted agents with the ``e2b`` provider.

Layout: ``<root>/<build_id>`` is the workspace (sandbox id = build id). Each command runs with
``bash -c`` in the workspace, in its own process group (``start_new_session``), with a small
environment (no service secrets); at its timeout the whole group is killed. Stopping a sandbox
kills every process group it started but keeps the directory (users download files from it).
Background processes keep their files in ``<root>/.processes/<build_id>`` (``process_dir``) and
are stopped by the service (``processes.py``) before it pauses or stops the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shlex
import tempfile
from collections.abc import Sequence
from pathlib import Path

import httpx

from ..ports import (
    CommandResult,
    DigestMismatch,
    FileInfo,
    FsOp,
    Located,
    PathOutsideWorkspace,
    PreviewTarget,
    SandboxError,
    SandboxGone,
    TransferFailed,
)
from .host import Walk, file_info, is_within, killpg, run_command

_ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "SHELL")


class LocalSandbox:
    def __init__(self, build_id: str, root: Path, provider: LocalProvider) -> None:
        self.build_id = build_id
        self._root = root
        self._real_root = os.path.realpath(root)
        self._provider = provider

    @property
    def sandbox_id(self) -> str:
        return self.build_id

    @property
    def root(self) -> str:
        return str(self._root)

    @property
    def process_dir(self) -> str:
        return shlex.quote(str(self._provider.root / ".processes" / self.build_id))

    def preview(self, port: int) -> PreviewTarget:
        return PreviewTarget(provider="local")  # the gateway's proxy, to the host's loopback

    def _real(self, rel: str) -> str:
        """An absolute host path for a workspace-relative real path (as ``locate`` gave it)."""
        return os.path.join(self._real_root, rel) if rel else self._real_root

    # ------------------------------------------------------------------ files

    async def locate(self, paths: Sequence[str]) -> list[Located]:
        # Inline, not in a thread: a realpath and a stat cost less than the hop would.
        return [self._locate(rel) for rel in paths]

    def _locate(self, rel: str) -> Located:
        real = os.path.realpath(os.path.join(self._root, rel) if rel else self._root)
        if not is_within(real, self._real_root):
            return Located(real, None)  # absolute: outside
        inside = os.path.relpath(real, self._real_root).replace(os.sep, "/")
        inside = "" if inside == "." else inside
        try:
            st = os.stat(real)
        except (FileNotFoundError, NotADirectoryError):
            return Located(inside, None)
        except OSError as err:  # a symlink loop ...
            raise SandboxError(f"cannot resolve {rel!r}: {err.strerror or err}") from err
        return Located(inside, file_info(inside, st))

    async def fetch(self, path: str, max_bytes: int) -> tuple[Located, bytes | None]:
        found = self._locate(path)
        info = found.info
        if info is None or info.kind != "file" or info.size > max_bytes:  # None: also outside
            return found, None
        return found, await self.read(found.real)

    async def store(self, path: str, data: bytes) -> Located:
        found = self._locate(path)
        outside = found.real.startswith("/")  # _locate's absolute real path: outside
        if not outside and found.real and not (found.info is not None and found.info.is_dir):
            await self.write(found.real, data)
        return found

    async def read(self, path: str) -> bytes:
        try:
            return await asyncio.to_thread(Path(self._real(path)).read_bytes)
        except FileNotFoundError as err:
            raise SandboxError(f"file not found: {path}") from err
        except IsADirectoryError as err:
            raise SandboxError(f"{path} is a directory") from err
        except OSError as err:
            raise SandboxError(f"cannot read {path}: {err.strerror or err}") from err

    async def write(self, path: str, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._write, path, data)
        except IsADirectoryError as err:
            raise SandboxError(f"{path} is a directory") from err
        except (NotADirectoryError, FileExistsError) as err:
            raise SandboxError(f"cannot write {path}: a parent is not a directory") from err
        except OSError as err:
            raise SandboxError(f"cannot write {path}: {err.strerror or err}") from err

    def _write(self, path: str, data: bytes) -> None:
        real = Path(self._real(path))
        real.parent.mkdir(parents=True, exist_ok=True)
        # A symlinked parent made since the path was located must not lead outside either.
        if not is_within(os.path.realpath(real.parent), self._real_root):
            raise PathOutsideWorkspace(f"{path!r} resolves outside the workspace")
        real.write_bytes(data)

    async def walk(
        self,
        path: str,
        *,
        depth: int | None,
        skip_dirs: frozenset[str] = frozenset(),
        exclude: Sequence[str] = (),
        content: bool = False,
        limit: int | None = None,
    ) -> list[FileInfo]:
        walker = Walk(self._real_root, skip_dirs, exclude, content, limit)
        return await asyncio.to_thread(walker.run, self._real(path), depth)

    async def put(self, path: str, url: str, *, sha256: str) -> int:
        try:
            data = await asyncio.to_thread(Path(self._real(path)).read_bytes)
        except OSError as err:
            raise TransferFailed(f"cannot read it: {err.strerror or err}") from err
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise DigestMismatch(actual)
        response = await self._provider.http.put(url, content=data)
        if response.status_code // 100 != 2:
            raise TransferFailed(f"HTTP {response.status_code}")
        return len(data)

    async def get(self, url: str, path: str, *, sha256: str, mode: int) -> int:
        response = await self._provider.http.get(url)
        if response.status_code // 100 != 2:
            raise TransferFailed(f"HTTP {response.status_code}")
        data = response.content
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise DigestMismatch(actual)
        await asyncio.to_thread(self._put_file, path, data, mode)
        return len(data)

    def _put_file(self, path: str, data: bytes, mode: int) -> None:
        """Write through a temporary file, so the file is whole or not there."""
        real = Path(self._real(path))
        real.parent.mkdir(parents=True, exist_ok=True)
        if not is_within(os.path.realpath(real.parent), self._real_root):
            raise PathOutsideWorkspace(f"{path!r} resolves outside the workspace")
        fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=".kiln-dl.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, mode & 0o7777)
            os.replace(tmp, real)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def apply(self, ops: Sequence[FsOp]) -> None:
        await asyncio.to_thread(self._apply, ops)

    def _apply(self, ops: Sequence[FsOp]) -> None:
        for op in ops:
            full = self._real(op.path)
            try:
                if op.op == "mkdir":
                    os.makedirs(full, exist_ok=True)
                elif op.op == "symlink":
                    if os.path.isdir(full) and not os.path.islink(full):
                        raise SandboxError(
                            f"cannot restore symlink {op.path}: a directory is there"
                        )
                    if os.path.lexists(full):
                        os.unlink(full)
                    os.symlink(op.arg, full)
                elif op.op == "chmod":
                    os.chmod(full, int(op.arg, 8))
                elif op.op == "unlink":
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(full)
            except OSError as err:
                raise SandboxError(f"cannot {op.op} {op.path}: {err.strerror or err}") from err

    # ------------------------------------------------------------------ commands

    async def run(self, command: str, *, timeout_s: float, max_output: int) -> CommandResult:
        if not self._root.is_dir():
            raise SandboxGone(f"workspace {self._root} is gone")
        env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP}
        env.update(TERM="dumb", PWD=str(self._root), PYTHONUNBUFFERED="1")
        return await run_command(
            command,
            cwd=self._root,
            env=env,
            timeout_s=timeout_s,
            max_output=max_output,
            started=lambda pgid: self._provider.track(self.build_id, pgid),
        )


class LocalProvider:
    """Workspaces under ``root``; no isolation at all (see the module docstring)."""

    name = "local"

    def __init__(
        self,
        root: str | Path,
        *,
        http_timeout_s: float = 60.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self._http: httpx.AsyncClient | None = http
        self._http_timeout_s = http_timeout_s
        self._groups: dict[str, set[int]] = {}

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._http_timeout_s)
        return self._http

    def track(self, build_id: str, pgid: int) -> None:
        groups = self._groups.setdefault(build_id, set())
        # forget groups that are gone, so the set stays small
        for old in list(groups):
            try:
                os.killpg(old, 0)
            except (ProcessLookupError, PermissionError):
                groups.discard(old)
        groups.add(pgid)

    def _workspace(self, build_id: str) -> Path:
        if not build_id or "/" in build_id or build_id in (".", ".."):
            raise ValueError(f"bad build id {build_id!r}")
        return self.root / build_id

    async def create(self, build_id: str, *, user_id: str = "") -> LocalSandbox:
        path = self._workspace(build_id)
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
        return LocalSandbox(build_id, path, self)

    async def connect(
        self, build_id: str, sandbox_id: str, *, running: bool = False
    ) -> LocalSandbox:
        path = self._workspace(sandbox_id)
        if not path.is_dir():
            raise SandboxGone(f"workspace {path} does not exist")
        return LocalSandbox(build_id, path, self)

    async def pause(self, build_id: str, sandbox_id: str) -> None:
        """Nothing to pause locally but the build's processes: they are killed, files stay."""
        self._kill_all(build_id)

    async def stop(self, build_id: str, sandbox_id: str) -> None:
        self._kill_all(build_id)

    async def stop_others(self, build_id: str, keep: str) -> list[str]:
        return []  # one directory per build: there is no other

    def _kill_all(self, build_id: str) -> None:
        for pgid in self._groups.pop(build_id, set()):
            killpg(pgid)

    async def close(self) -> None:
        for build_id in list(self._groups):
            self._kill_all(build_id)
        if self._http is not None:
            await self._http.aclose()
            self._http = None
