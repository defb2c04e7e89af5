"""A snapshot's files as a gzip-compressed tar stream, built as it is sent (nothing buffered
whole): each file's header from its manifest entry, then its bytes from the object store."""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import AsyncIterator, Callable

from .ports import FileEntry

BLOCK = tarfile.BLOCKSIZE


class ArchiveError(Exception):
    pass


def _header(entry: FileEntry, mtime: int, root: str) -> bytes:
    info = tarfile.TarInfo(f"{root}/{entry.path}" if root else entry.path)
    info.mtime = mtime
    if entry.type == "dir":
        info.type, info.mode = tarfile.DIRTYPE, entry.mode & 0o7777 or 0o755
    elif entry.type == "symlink":
        info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, entry.target or ""
    else:
        info.type, info.size = tarfile.REGTYPE, entry.size
        info.mode = entry.mode & 0o7777 or 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _safe(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and ".." not in parts and "" not in parts


async def tar_gz(
    entries: list[FileEntry],
    blob: Callable[[str], AsyncIterator[bytes]],
    *,
    root: str = "",
    mtime: int = 0,
) -> AsyncIterator[bytes]:
    """The tar.gz of ``entries``; raises ArchiveError mid-stream if a blob's size is wrong
    (the client then sees a truncated archive, never a silently wrong one)."""
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: gzip container

    def out(raw: bytes) -> bytes:
        return gz.compress(raw)

    for entry in sorted(entries, key=lambda e: e.path):
        if not _safe(entry.path):
            continue
        if chunk := out(_header(entry, mtime, root)):
            yield chunk
        if entry.type in ("dir", "symlink"):
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
