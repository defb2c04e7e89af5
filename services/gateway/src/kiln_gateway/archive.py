"""A snapshot as a gzip-compressed tar stream, built as it is sent (nothing buffered whole).

Every entry of the manifest, in path order (a directory before what it holds): directories with
their modes (empty ones included), symlinks with their targets, regular files with their modes
and then their bytes from the object store. Symlinks that lead outside the workspace are left
out, as a restore leaves them out (``Manifest.escaping_symlinks``)."""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import AsyncIterator, Callable

from kiln_contracts.manifest import DirEntry, FileEntry, Manifest, SymlinkEntry

BLOCK = tarfile.BLOCKSIZE

Member = FileEntry | DirEntry | SymlinkEntry


class ArchiveError(Exception):
    pass


def _header(entry: Member, mtime: int, root: str) -> bytes:
    info = tarfile.TarInfo(f"{root}/{entry.path}" if root else entry.path)
    info.mtime = mtime
    if isinstance(entry, DirEntry):
        info.type, info.mode = tarfile.DIRTYPE, entry.mode & 0o7777 or 0o755
    elif isinstance(entry, SymlinkEntry):
        info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, entry.target
    else:
        info.type, info.size = tarfile.REGTYPE, entry.size
        info.mode = entry.mode & 0o7777 or 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _safe(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and ".." not in parts and "" not in parts


def members(manifest: Manifest) -> list[Member]:
    """What the archive holds, in order."""
    outside = set(manifest.escaping_symlinks())
    links = [s for s in manifest.symlinks if s.path not in outside]
    every: list[Member] = [*manifest.dirs, *links, *manifest.entries]
    return sorted((e for e in every if _safe(e.path)), key=lambda e: e.path)


async def tar_gz(
    manifest: Manifest,
    blob: Callable[[str], AsyncIterator[bytes]],
    *,
    root: str = "",
    mtime: int = 0,
) -> AsyncIterator[bytes]:
    """The tar.gz of ``manifest``; raises ArchiveError mid-stream if a blob's size is wrong
    (the client then sees a truncated archive, never a silently wrong one)."""
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: gzip container

    def out(raw: bytes) -> bytes:
        return gz.compress(raw)

    for entry in members(manifest):
        if chunk := out(_header(entry, mtime, root)):
            yield chunk
        if not isinstance(entry, FileEntry):
            continue  # no content in the archive
        written = 0
        async for data in blob(entry.sha256):
            written += len(data)
            if written > entry.size:
                raise ArchiveError(f"{entry.path}: blob larger than its manifest entry")
            if chunk := out(data):
                yield chunk
        if written != entry.size:
            raise ArchiveError(f"{entry.path}: blob has {written} bytes, expected {entry.size}")
        if pad := -entry.size % BLOCK:
            if chunk := out(b"\0" * pad):
                yield chunk
    yield out(b"\0" * (2 * BLOCK)) + gz.flush()
