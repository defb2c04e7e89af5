"""A build's workspace, written once over any provider's ``Machine``.

Path confinement (a path is taken relative to the workspace; '..', absolute paths outside it and
symlinks leading outside are refused), the file operations the tools use, and the snapshot side:
the manifest (a sha256 per file, computed inside the sandbox), uploads of blobs to presigned
URLs, and restores from a restore plan (files, then directories and symlinks). A ``Machine``
only offers primitives; what they mean for a workspace is decided here.
"""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

from kiln_contracts import RestorePlanReply, Upload
from kiln_contracts.manifest import ManifestEntry

from .ports import (
    CommandResult,
    DigestMismatch,
    FileInfo,
    FsOp,
    Located,
    Machine,
    PathOutsideWorkspace,
    SandboxError,
    TransferFailed,
)

TRANSFER_CONCURRENCY = 8


def leads_outside(real: str) -> bool:
    """Whether a real path as ``Machine.locate`` reports it lies outside the workspace."""
    return real.startswith("/") or real == ".." or real.startswith("../")


@dataclass(frozen=True)
class Restored:
    files: int
    bytes: int
    skipped: list[str]  # symlinks not restored: they would lead outside the workspace


class Workspace:
    """The workspace of one build's sandbox (``machine``)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    @property
    def sandbox_id(self) -> str:
        return self.machine.sandbox_id

    @property
    def root(self) -> str:
        return self.machine.root

    # ------------------------------------------------------------------ paths

    def relative(self, path: str) -> str:
        """``path`` relative to the workspace, normalised ('' the workspace itself); refuses a
        NUL byte, '..' and absolute paths outside the workspace (symlinks: see ``locate``)."""
        path = path.strip()
        if "\x00" in path:
            raise PathOutsideWorkspace("path contains a NUL byte")
        root = self.root.rstrip("/")
        if path.startswith("/"):
            if path == root or path.startswith(root + "/"):
                path = path[len(root) :].lstrip("/")
            else:
                raise PathOutsideWorkspace(
                    f"{path!r} is outside the workspace; use paths relative to it"
                )
        if ".." in path.split("/"):
            raise PathOutsideWorkspace(
                f"{path!r} leads outside the workspace ('..' is not allowed)"
            )
        rel = posixpath.normpath(path) if path else "."
        return "" if rel == "." else rel

    async def locate(self, path: str) -> Located:
        """Where ``path`` leads and what is there; PathOutsideWorkspace if that is outside."""
        rel = self.relative(path)
        (found,) = await self.machine.locate([rel])
        if leads_outside(found.real):
            raise PathOutsideWorkspace(f"{rel!r} resolves outside the workspace")
        return found

    async def resolve(self, path: str) -> str:
        """The real path of ``path`` inside the workspace (see ``locate``)."""
        rel = self.relative(path)
        return "" if not rel else (await self.locate(rel)).real

    async def _confine(self, paths: Sequence[str]) -> None:
        """``locate`` for many paths at once (one round trip)."""
        rels = [self.relative(p) for p in paths]
        for rel, found in zip(rels, await self.machine.locate(rels) if rels else [], strict=True):
            if leads_outside(found.real):
                raise PathOutsideWorkspace(f"{rel!r} resolves outside the workspace")

    async def _at(self, path: str | Located) -> Located:
        return path if isinstance(path, Located) else await self.locate(path)

    # ------------------------------------------------------------------ files

    async def stat(self, path: str) -> FileInfo | None:
        return (await self.locate(path)).info

    async def read(self, path: str | Located) -> bytes:
        """A file's bytes; ``path`` may be what ``locate`` said of it."""
        found = await self._at(path)
        name = path if isinstance(path, str) else found.real
        if found.info is None:
            raise SandboxError(f"file not found: {name}")
        if found.info.is_dir:
            raise SandboxError(f"{name} is a directory")
        return await self.machine.read(found.real)

    async def fetch(self, path: str, max_bytes: int) -> tuple[Located, bytes | None]:
        """What ``locate`` says of ``path`` and, if it is a file of at most ``max_bytes``, its
        bytes: one round trip where the machine can (a large file is read apart)."""
        rel = self.relative(path)
        found, data = await self.machine.fetch(rel, max_bytes)
        if leads_outside(found.real):
            raise PathOutsideWorkspace(f"{rel!r} resolves outside the workspace")
        info = found.info
        if data is None and info is not None and info.kind == "file" and info.size <= max_bytes:
            data = await self.machine.read(found.real)
        return found, data

    async def store(self, path: str, data: bytes) -> Located:
        """Write a file where ``path`` leads, in one round trip where the machine can: what
        ``locate`` said of it before (a directory is left as it is, for the caller to refuse)."""
        rel = self.relative(path)
        if not rel:
            raise SandboxError("cannot write to the workspace directory itself")
        found = await self.machine.store(rel, data)
        if leads_outside(found.real):  # nothing was written
            raise PathOutsideWorkspace(f"{rel!r} resolves outside the workspace")
        return found

    async def write(self, path: str | Located, data: bytes) -> None:
        """Write a file, creating its parent directories."""
        found = await self._at(path)
        if not found.real:
            raise SandboxError("cannot write to the workspace directory itself")
        await self.machine.write(found.real, data)

    async def list_entries(
        self,
        path: str | Located = "",
        *,
        depth: int = 1,
        skip_dirs: frozenset[str] = frozenset(),
        limit: int,
    ) -> list[FileInfo]:
        """Entries under a directory up to ``depth`` levels (at most ``limit``; symlinks not
        followed; ``skip_dirs`` listed, not entered), paths relative to the workspace."""
        if path == "":
            top = ""  # the workspace itself: nothing to resolve
        else:
            found = await self._at(path)
            if found.info is None or not found.info.is_dir:
                raise SandboxError(f"not a directory: {found.real or '.'}")
            top = found.real
        return await self.machine.walk(top, depth=depth, skip_dirs=skip_dirs, limit=limit)

    async def run(self, command: str, *, timeout_s: float, max_output: int) -> CommandResult:
        return await self.machine.run(command, timeout_s=timeout_s, max_output=max_output)

    # ------------------------------------------------------------------ snapshots

    async def manifest(
        self, excludes: Sequence[str], *, dirs_and_symlinks: bool = False
    ) -> list[ManifestEntry]:
        """Every regular file minus ``excludes``, hashed inside the sandbox; with
        ``dirs_and_symlinks`` also every directory and symlink (not followed), sorted by path."""
        out: list[ManifestEntry] = []
        for e in await self.machine.walk("", depth=None, exclude=excludes, content=True):
            if e.kind == "file" and e.sha256 is not None:
                out.append(
                    ManifestEntry(path=e.path, sha256=e.sha256, size=e.size, mode=e.mode & 0o7777)
                )
            elif dirs_and_symlinks and e.kind == "dir":
                out.append(ManifestEntry.directory(e.path, e.mode))
            elif dirs_and_symlinks and e.kind == "symlink" and e.target is not None:
                out.append(ManifestEntry.symlink(e.path, e.target))
        out.sort(key=lambda e: e.path)
        return out

    async def upload(self, path: str, sha256: str, url: str) -> int:
        """PUT the file's bytes to a presigned URL after checking its sha256; the bytes sent.
        One round trip where the machine's ``put`` confines the path itself (the script's)."""
        if getattr(self.machine, "put_confines", False):
            real = self.relative(path)
        else:
            real = await self.resolve(path)
        try:
            return await self.machine.put(real, url, sha256=sha256)
        except DigestMismatch as err:
            raise SandboxError(
                f"{path} changed since the manifest (sha256 {err.actual}, not {sha256})"
            ) from err
        except TransferFailed as err:
            raise SandboxError(f"upload of {path} failed: {err}") from err

    async def upload_all(self, uploads: Sequence[Upload]) -> list[int | BaseException]:
        """``upload`` for each, a few at once; the bytes sent or the error, in order."""
        gate = asyncio.Semaphore(TRANSFER_CONCURRENCY)

        async def one(u: Upload) -> int:
            async with gate:
                return await self.upload(u.path, u.sha256, u.url)

        return await asyncio.gather(*(one(u) for u in uploads), return_exceptions=True)

    async def download(self, path: str, sha256: str, mode: int, url: str) -> int:
        """GET a file from a presigned URL into the workspace, checking its sha256; its size."""
        real = await self.resolve(path)
        if not real:
            raise SandboxError("cannot download onto the workspace directory")
        try:
            return await self.machine.get(url, real, sha256=sha256, mode=mode & 0o7777)
        except DigestMismatch as err:
            raise SandboxError(f"download of {path} has sha256 {err.actual}, not {sha256}") from err
        except TransferFailed as err:
            raise SandboxError(f"download of {path} failed: {err}") from err

    async def restore_tree(
        self, dirs: Sequence[ManifestEntry], symlinks: Sequence[ManifestEntry]
    ) -> list[str]:
        """After the files: create ``dirs`` and ``symlinks``, then set the directories' modes
        (deepest first). A symlink that resolves outside the workspace once created is removed
        (as is one that would be made through another symlink); the paths of those are returned."""
        dir_paths = [self.relative(d.path) for d in dirs]
        links = {self.relative(s.path): s.target for s in symlinks if s.target is not None}
        for path in links:
            if posixpath.basename(path) in ("", ".", ".."):
                raise PathOutsideWorkspace(f"bad symlink path {path!r}")
        through = [p for p in links if _under_any(posixpath.dirname(p), set(links))]
        for path in through:
            del links[path]
        parents = sorted({p for path in links if (p := posixpath.dirname(path))})
        await self._confine(dir_paths + parents)
        ops = [FsOp("mkdir", p) for p in dir_paths + parents]
        ops += [FsOp("symlink", path, target or "") for path, target in links.items()]
        if ops:
            await self.machine.apply(ops)
        # Checked once every link exists (a link may lead through another one).
        found = await self.machine.locate(list(links)) if links else []
        escaping = [p for p, f in zip(links, found, strict=True) if leads_outside(f.real)]
        ops = [FsOp("unlink", p) for p in escaping]
        modes = sorted(zip(dir_paths, dirs, strict=True), key=lambda e: e[0].count("/"))
        ops += [FsOp("chmod", p, f"{d.mode & 0o7777:o}") for p, d in reversed(modes)]
        if ops:
            await self.machine.apply(ops)
        return through + escaping

    async def restore(self, plan: RestorePlanReply) -> Restored:
        """Download a restore plan's files (a few at once), then make its directories and
        symlinks; the first failure raises."""
        gate = asyncio.Semaphore(TRANSFER_CONCURRENCY)

        async def one(path: str, sha256: str, mode: int, url: str) -> int:
            async with gate:
                return await self.download(path, sha256, mode, url)

        sizes = await asyncio.gather(*(one(f.path, f.sha256, f.mode, f.url) for f in plan.files))
        skipped = await self.restore_tree(plan.dirs, plan.symlinks)
        return Restored(files=len(sizes), bytes=sum(sizes), skipped=skipped + plan.skipped)


def _under_any(path: str, prefixes: set[str]) -> bool:
    """Whether ``path`` is one of ``prefixes`` or lies under one."""
    while path:
        if path in prefixes:
            return True
        path = posixpath.dirname(path)
    return False
