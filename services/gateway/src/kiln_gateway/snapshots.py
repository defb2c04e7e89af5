"""A build's snapshots as users read them (plain functions over ``ports.SnapshotFiles``): which
snapshot holds an iteration's files, a snapshot's tree, one file's bytes and the content type to
serve them with, and what changed between two snapshots.

An iteration's files are those of the newest snapshot taken at or before it: snapshots are taken
when files change (and at sleeps and ends), and a backlog of checkpoints is coalesced into its
newest, so most iterations have no snapshot of their own.
"""

from __future__ import annotations

import asyncio
import difflib
import mimetypes
from dataclasses import dataclass, replace
from typing import Literal

from kiln_contracts.manifest import FileEntry, Manifest

from .ports import BlobTooLarge, SnapshotFiles, StoredSnapshot

READ_CONCURRENCY = 8

# Served as they are: text formats a browser does not run, and binary media.
TEXT_TYPES = frozenset({"application/json", "text/css", "text/csv", "text/markdown"})
BINARY_KINDS = frozenset({"image", "audio", "video", "font"})
BINARY_TYPES = frozenset({"application/pdf", "application/zip", "application/gzip"})
# Never served as they are: a browser would run them on the gateway's origin.
ACTIVE_TYPES = frozenset({"image/svg+xml"})


class SnapshotMissing(Exception):
    """No such snapshot, or none at or before the iteration asked for (the message says which)."""


class NotAFile(Exception):
    """The path is not a regular file of the snapshot (the message says what it is)."""


class FileTooLarge(Exception):
    def __init__(self, path: str, size: int, limit: int) -> None:
        super().__init__(
            f"{path} is {size} bytes, more than the {limit} this endpoint serves; "
            "download the build's files instead"
        )
        self.path, self.size, self.limit = path, size, limit


class InvalidPath(ValueError):
    pass


def ordered(snapshots: list[StoredSnapshot]) -> list[StoredSnapshot]:
    """Oldest first: by iteration, then by when the manifest was written."""
    return sorted(
        snapshots, key=lambda s: (s.manifest.iteration, s.manifest.created_at, s.written_at)
    )


def at_iteration(snapshots: list[StoredSnapshot], iteration: int) -> StoredSnapshot:
    """The newest snapshot taken at or before ``iteration``."""
    earlier = [s for s in ordered(snapshots) if s.manifest.iteration <= iteration]
    if not earlier:
        kept = sorted({s.manifest.iteration for s in snapshots})
        raise SnapshotMissing(
            f"no snapshot of iteration {iteration} or earlier is kept"
            + (f" (snapshots kept: iterations {', '.join(map(str, kept))})" if kept else "")
        )
    return earlier[-1]


def check_path(path: str) -> str:
    """``path`` if it can name an entry of a manifest (relative, '/'-separated, no '..')."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise InvalidPath(f"invalid path {path!r}: give a path relative to the workspace root")
    return path


def file_of(manifest: Manifest, path: str) -> FileEntry:
    check_path(path)
    for entry in manifest.entries:
        if entry.path == path:
            return entry
    if any(d.path == path for d in manifest.dirs):
        raise NotAFile(f"{path} is a directory")
    for link in manifest.symlinks:
        if link.path == path:
            raise NotAFile(f"{path} is a symlink to {link.target}")
    raise NotAFile(f"{path} is not in this snapshot")


async def read_file(files: SnapshotFiles, entry: FileEntry, max_bytes: int) -> bytes:
    if entry.size > max_bytes:
        raise FileTooLarge(entry.path, entry.size, max_bytes)
    try:
        return await files.read_blob(entry.sha256, max_bytes)
    except BlobTooLarge as err:
        raise FileTooLarge(entry.path, entry.size, max_bytes) from err


def is_text(data: bytes) -> bool:
    """UTF-8 without NUL bytes."""
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def content_type(path: str, data: bytes) -> str:
    """What to serve a file as. Text is ``text/plain`` (or JSON, CSS, CSV, Markdown as such);
    HTML, SVG, scripts and anything else a browser would run are served as text or octets, never
    as themselves; binary media as their type; the rest ``application/octet-stream``."""
    guess = mimetypes.guess_type(path, strict=False)[0]
    if is_text(data):
        return f"{guess if guess in TEXT_TYPES else 'text/plain'}; charset=utf-8"
    if guess and guess not in ACTIVE_TYPES:
        if guess.split("/")[0] in BINARY_KINDS or guess in BINARY_TYPES:
            return guess
    return "application/octet-stream"


# ---------------------------------------------------------------------------- diff


Change = Literal["added", "removed", "modified"]


@dataclass(frozen=True)
class FileDiff:
    path: str
    change: Change
    type: Literal["file", "symlink"]
    old_size: int | None = None
    new_size: int | None = None
    old_mode: int | None = None
    new_mode: int | None = None
    binary: bool = False
    diff: str | None = None
    note: str | None = None


def _changed_entries(
    old: Manifest, new: Manifest
) -> list[tuple[str, Change, FileEntry | None, FileEntry | None]]:
    before = {e.path: e for e in old.entries}
    after = {e.path: e for e in new.entries}
    out: list[tuple[str, Change, FileEntry | None, FileEntry | None]] = []
    for path in sorted(before.keys() | after.keys()):
        a, b = before.get(path), after.get(path)
        if a is None:
            out.append((path, "added", None, b))
        elif b is None:
            out.append((path, "removed", a, None))
        elif (a.sha256, a.mode) != (b.sha256, b.mode):
            out.append((path, "modified", a, b))
    return out


def _symlink_changes(old: Manifest, new: Manifest) -> list[FileDiff]:
    before = {s.path: s.target for s in old.symlinks}
    after = {s.path: s.target for s in new.symlinks}
    out: list[FileDiff] = []
    for path in sorted(before.keys() | after.keys()):
        a, b = before.get(path), after.get(path)
        if a == b:
            continue
        change: Change = "added" if a is None else "removed" if b is None else "modified"
        note = " → ".join(f"-> {t}" for t in (a, b) if t is not None)
        out.append(FileDiff(path=path, change=change, type="symlink", note=note))
    return out


def unified(path: str, old: str, new: str, change: Change) -> str:
    lines = difflib.unified_diff(
        old.splitlines(keepends=True),
        new.splitlines(keepends=True),
        fromfile="/dev/null" if change == "added" else f"a/{path}",
        tofile="/dev/null" if change == "removed" else f"b/{path}",
    )
    marked = (
        line if line.endswith("\n") else f"{line}\n\\ No newline at end of file\n" for line in lines
    )
    return "".join(marked)


async def diff(
    files: SnapshotFiles,
    old: Manifest,
    new: Manifest,
    *,
    max_file_bytes: int,
    max_total_bytes: int,
) -> tuple[list[FileDiff], bool]:
    """What changed from ``old`` to ``new`` (files and symlinks, by path), with a unified diff of
    each changed text file; binary files are said to be binary. Files larger than
    ``max_file_bytes`` and those past ``max_total_bytes`` read in all are listed without a diff
    (``note`` says why; the flag returned is True when that happened)."""
    changed = _changed_entries(old, new)
    budget = max_total_bytes
    truncated = False
    plans: list[tuple[str, Change, FileEntry | None, FileEntry | None, str | None]] = []
    for path, change, a, b in changed:
        sizes = [e.size for e in (a, b) if e is not None]
        if a is not None and b is not None and a.sha256 == b.sha256:
            plans.append((path, change, a, b, "mode changed"))
        elif max(sizes) > max_file_bytes:
            truncated = True
            plans.append((path, change, a, b, f"larger than {max_file_bytes} bytes: no diff"))
        elif sum(sizes) > budget:
            truncated = True
            plans.append((path, change, a, b, "the diff is too large: no diff for this file"))
        else:
            budget -= sum(sizes)
            plans.append((path, change, a, b, None))
    limit = asyncio.Semaphore(READ_CONCURRENCY)

    async def content(entry: FileEntry | None) -> bytes:
        if entry is None:
            return b""
        async with limit:
            return await files.read_blob(entry.sha256, max_file_bytes)

    async def one(
        path: str, change: Change, a: FileEntry | None, b: FileEntry | None, note: str | None
    ) -> FileDiff:
        shown = FileDiff(
            path=path,
            change=change,
            type="file",
            old_size=a.size if a else None,
            new_size=b.size if b else None,
            old_mode=a.mode if a else None,
            new_mode=b.mode if b else None,
            note=note,
        )
        if note is not None:
            return shown
        try:
            before, after = await asyncio.gather(content(a), content(b))
        except BlobTooLarge:
            return replace(shown, note="the stored bytes differ from the manifest: no diff")
        if not (is_text(before) and is_text(after)):
            return replace(shown, binary=True, note="binary file")
        return replace(shown, diff=unified(path, before.decode(), after.decode(), change))

    out = list(await asyncio.gather(*(one(*plan) for plan in plans)))
    out += _symlink_changes(old, new)
    out.sort(key=lambda d: d.path)
    return out, truncated


def missing(build_id: str, recorded: str | None, asked: str | None = None) -> tuple[int, str]:
    """The status and detail for a snapshot the store does not have: 404 when the build never
    saved one (or ``asked`` is not one of its), 410 when the build recorded ``recorded`` but
    the store no longer holds it (its bucket emptied: an in-memory S3 restarted, a bucket
    deleted or its objects expired): a download cannot succeed until it is back."""
    if recorded is None and asked is None:
        return 404, "this build has no snapshot yet"
    if recorded is not None and asked in (None, recorded):
        return 410, (
            f"build {build_id} saved snapshot {recorded}, but the snapshot store no longer has "
            "it (its bucket was emptied or replaced, e.g. an S3 server that kept nothing "
            "across a restart); its files cannot be downloaded"
        )
    return 404, "snapshot not found"
