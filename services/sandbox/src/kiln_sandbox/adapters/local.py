"""The ``local`` sandbox provider: a directory per build and plain subprocesses.

THIS IS NO SECURITY BOUNDARY. Commands run as the service's own user on the service's host, with
its network and whatever it can reach; the path checks only keep the *file tools* inside the
workspace, a ``bash`` command can read and write anything the service can. Use it for
development, tests and the offline demo only; run untrusted agents with the ``e2b`` provider.

Layout: ``<root>/<build_id>`` is the workspace (sandbox id = build id). Each command runs with
``bash -c`` in the workspace, in its own process group (``start_new_session``), with a small
environment (no service secrets); at its timeout the whole group is killed. Stopping a sandbox
kills every process group it started but keeps the directory (users download files from it).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import os
import signal
import stat
from pathlib import Path

import httpx

from kiln_contracts.manifest import ManifestEntry

from ..ports import CommandResult, FileInfo, PathOutsideWorkspace, SandboxError, SandboxGone

_ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "SHELL")
_DRAIN_AFTER_EXIT_S = 0.5
_CHUNK = 64 * 1024


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


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

    # ------------------------------------------------------------------ paths

    def resolve(self, rel: str) -> Path:
        """The real path of ``rel``; refuses '..', absolute paths and symlinks leading outside."""
        if "\x00" in rel:
            raise PathOutsideWorkspace("path contains a NUL byte")
        if rel.startswith("/") or ".." in rel.split("/"):
            raise PathOutsideWorkspace(f"{rel!r} is outside the workspace")
        full = self._root / rel if rel not in ("", ".") else self._root
        real = os.path.realpath(full)
        if not _is_within(real, self._real_root):
            raise PathOutsideWorkspace(f"{rel!r} resolves outside the workspace")
        return Path(real)

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self._real_root).replace(os.sep, "/")

    # ------------------------------------------------------------------ files

    async def read(self, path: str) -> bytes:
        real = self.resolve(path)
        try:
            return await asyncio.to_thread(real.read_bytes)
        except FileNotFoundError as err:
            raise SandboxError(f"file not found: {path}") from err
        except IsADirectoryError as err:
            raise SandboxError(f"{path} is a directory") from err
        except OSError as err:
            raise SandboxError(f"cannot read {path}: {err.strerror or err}") from err

    async def write(self, path: str, data: bytes) -> None:
        real = self.resolve(path)
        if real == Path(self._real_root):
            raise SandboxError("cannot write to the workspace root")

        def _write() -> None:
            real.parent.mkdir(parents=True, exist_ok=True)
            # A symlinked parent created after resolve() must not lead outside either.
            if not _is_within(os.path.realpath(real.parent), self._real_root):
                raise PathOutsideWorkspace(f"{path!r} resolves outside the workspace")
            real.write_bytes(data)

        try:
            await asyncio.to_thread(_write)
        except IsADirectoryError as err:
            raise SandboxError(f"{path} is a directory") from err
        except (NotADirectoryError, FileExistsError) as err:
            raise SandboxError(f"cannot write {path}: a parent is not a directory") from err
        except OSError as err:
            if isinstance(err, SandboxError):
                raise
            raise SandboxError(f"cannot write {path}: {err.strerror or err}") from err

    async def stat(self, path: str) -> FileInfo | None:
        real = self.resolve(path)
        try:  # one stat, inline like resolve()'s: a thread hop would cost more than the call
            st = os.stat(real)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return FileInfo(
            path=self._rel(str(real)),
            is_dir=stat.S_ISDIR(st.st_mode),
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            mode=st.st_mode & 0o7777,
        )

    async def list_entries(
        self,
        path: str = "",
        *,
        depth: int = 1,
        skip_dirs: frozenset[str] = frozenset(),
        limit: int = 10_000,
    ) -> list[FileInfo]:
        top = self.resolve(path)
        if not top.is_dir():
            raise SandboxError(f"not a directory: {path or '.'}")
        return await asyncio.to_thread(self._walk, str(top), depth, skip_dirs, limit)

    def _walk(self, top: str, depth: int, skip_dirs: frozenset[str], limit: int) -> list[FileInfo]:
        out: list[FileInfo] = []
        stack: list[tuple[str, int]] = [(top, 1)]
        while stack and len(out) < limit:
            current, level = stack.pop()
            try:
                entries = sorted(os.scandir(current), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                out.append(
                    FileInfo(
                        path=self._rel(entry.path),
                        is_dir=is_dir,
                        size=st.st_size,
                        mtime_ns=st.st_mtime_ns,
                        mode=st.st_mode & 0o7777,
                    )
                )
                if len(out) >= limit:
                    break
                if is_dir and level < depth and entry.name not in skip_dirs:
                    stack.append((entry.path, level + 1))
        return out

    async def manifest(
        self, excludes: list[str], *, dirs_and_symlinks: bool = False
    ) -> list[ManifestEntry]:
        return await asyncio.to_thread(self._manifest, excludes, dirs_and_symlinks)

    def _manifest(self, excludes: list[str], dirs_and_symlinks: bool) -> list[ManifestEntry]:
        def excluded(rel: str) -> bool:
            parts = rel.split("/")
            return any(
                fnmatch.fnmatchcase(rel, pat) or any(fnmatch.fnmatchcase(p, pat) for p in parts)
                for pat in excludes
            )

        out: list[ManifestEntry] = []
        for dirpath, dirnames, filenames in os.walk(self._real_root):
            walk_into: list[str] = []
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                rel = self._rel(full)
                if excluded(rel):
                    continue
                try:
                    st = os.lstat(full)
                    if stat.S_ISDIR(st.st_mode):
                        walk_into.append(name)
                        if dirs_and_symlinks:
                            out.append(ManifestEntry.directory(rel, st.st_mode))
                    elif stat.S_ISLNK(st.st_mode):
                        if dirs_and_symlinks:
                            out.append(ManifestEntry.symlink(rel, os.readlink(full)))
                    elif stat.S_ISREG(st.st_mode):
                        digest = _sha256_file(full)
                        out.append(
                            ManifestEntry(
                                path=rel, sha256=digest, size=st.st_size, mode=st.st_mode & 0o7777
                            )
                        )
                except OSError:
                    continue  # vanished or unreadable while walking
            dirnames[:] = walk_into  # symlinked directories are recorded, never followed
        out.sort(key=lambda e: e.path)
        return out

    async def upload(self, path: str, sha256: str, url: str) -> int:
        real = self.resolve(path)
        try:
            data = await asyncio.to_thread(real.read_bytes)
        except OSError as err:
            raise SandboxError(f"cannot read {path}: {err.strerror or err}") from err
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise SandboxError(f"{path} changed since the manifest (sha256 {actual}, not {sha256})")
        response = await self._provider.http.put(url, content=data)
        if response.status_code // 100 != 2:
            raise SandboxError(f"upload of {path} failed: HTTP {response.status_code}")
        return len(data)

    async def download(self, path: str, sha256: str, mode: int, url: str) -> int:
        real = self.resolve(path)
        response = await self._provider.http.get(url)
        if response.status_code // 100 != 2:
            raise SandboxError(f"download of {path} failed: HTTP {response.status_code}")
        data = response.content
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise SandboxError(f"download of {path} has sha256 {actual}, not {sha256}")
        await self.write(path, data)
        await asyncio.to_thread(os.chmod, real, mode & 0o7777)
        return len(data)

    async def restore_tree(
        self, dirs: list[ManifestEntry], symlinks: list[ManifestEntry]
    ) -> list[str]:
        return await asyncio.to_thread(self._restore_tree, dirs, symlinks)

    def _restore_tree(self, dirs: list[ManifestEntry], symlinks: list[ManifestEntry]) -> list[str]:
        for d in dirs:
            self.resolve(d.path).mkdir(parents=True, exist_ok=True)
        made: list[str] = []
        for link in symlinks:
            if link.target is None:
                continue
            name = link.path.rsplit("/", 1)[-1]
            parent = self.resolve(link.path.rsplit("/", 1)[0] if "/" in link.path else "")
            if name in ("", ".", ".."):
                raise PathOutsideWorkspace(f"bad symlink path {link.path!r}")
            parent.mkdir(parents=True, exist_ok=True)
            full = parent / name
            if full.is_symlink() or full.is_file():
                full.unlink()
            elif full.exists():
                raise SandboxError(f"cannot restore symlink {link.path}: a directory is there")
            os.symlink(link.target, full)
            made.append(link.path)
        # Checked once every link exists (a link may lead through another one).
        skipped = []
        for rel in made:
            full = Path(self._real_root) / rel
            if not _is_within(os.path.realpath(full), self._real_root):
                full.unlink()
                skipped.append(rel)
        for d in sorted(dirs, key=lambda e: e.path.count("/"), reverse=True):
            os.chmod(self.resolve(d.path), d.mode & 0o7777)
        return skipped

    # ------------------------------------------------------------------ commands

    async def run(self, command: str, *, timeout_s: float, max_output: int) -> CommandResult:
        if not self._root.is_dir():
            raise SandboxGone(f"workspace {self._root} is gone")
        env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP}
        env.update(TERM="dumb", PWD=str(self._root), PYTHONUNBUFFERED="1")
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            command,
            cwd=self._root,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        self._provider.track(self.build_id, proc.pid)
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
                    _killpg(proc.pid)
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
                _killpg(proc.pid)
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


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


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

    async def connect(self, build_id: str, sandbox_id: str) -> LocalSandbox:
        path = self._workspace(sandbox_id)
        if not path.is_dir():
            raise SandboxGone(f"workspace {path} does not exist")
        return LocalSandbox(build_id, path, self)

    async def pause(self, build_id: str, sandbox_id: str) -> None:
        """Nothing to pause locally but the build's processes: they are killed, files stay."""
        self._kill_all(build_id)

    async def stop(self, build_id: str, sandbox_id: str) -> None:
        self._kill_all(build_id)

    def _kill_all(self, build_id: str) -> None:
        for pgid in self._groups.pop(build_id, set()):
            _killpg(pgid)

    async def close(self) -> None:
        for build_id in list(self._groups):
            self._kill_all(build_id)
        if self._http is not None:
            await self._http.aclose()
            self._http = None
