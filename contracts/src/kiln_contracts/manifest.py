"""A snapshot of a build's workspace: the entries the sandbox lists, the manifest S3 keeps.

The sandbox lists its workspace as ``ManifestEntry`` items (in a ``ManifestReply``); the snapshot
service stores them as one ``Manifest`` per snapshot, at ``bucket.manifest_key``, and reads it back
for restore plans; the gateway reads it for the files archive. Every reader and writer goes
through ``Manifest`` (its JSON Schema: ``contracts/schemas/s3/Manifest.json``).

A manifest holds three lists: ``entries``, the regular files (path, sha256, size, mode; the
bytes are the blob ``bucket.blob_key(sha256)``); ``dirs``, every directory with its mode (so that
empty ones and modes come back); ``symlinks``, each with its target as it is, never followed.
``dirs`` and ``symlinks`` may be absent from a stored document (the oldest manifests have only
``entries``): they read as empty.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Final, Literal, Self

from pydantic import Field, model_validator

from .messages import CheckpointReason, CheckpointSaved, Id, Model, utcnow

MANIFEST_FORMAT: Final = 1

EntryType = Literal["file", "dir", "symlink"]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

RelPath = Annotated[str, Field(description="Relative to the workspace root, '/'-separated.")]
Mode = Annotated[int, Field(ge=0, description="Permission bits, e.g. 0o644.")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


# ---------------------------------------------------------------------------- as the sandbox lists it


class ManifestEntry(Model):
    """One entry of a workspace as the sandbox lists it: a regular file (the default), a
    directory or a symlink.

    ``sha256``/``size`` are the file's bytes; for a symlink those of its target string; for a
    directory those of empty content. ``mode`` holds the permission bits (a symlink's are not
    restored). Symlinks are recorded as they are (``target`` is what readlink returns).
    """

    path: RelPath
    sha256: Sha256
    size: int = Field(ge=0)
    mode: Mode
    type: EntryType = "file"
    target: str | None = Field(default=None, description="A symlink's target, as readlink says.")

    @classmethod
    def directory(cls, path: str, mode: int) -> ManifestEntry:
        return cls(path=path, sha256=EMPTY_SHA256, size=0, mode=mode & 0o7777, type="dir")

    @classmethod
    def symlink(cls, path: str, target: str) -> ManifestEntry:
        raw = target.encode("utf-8", "surrogateescape")
        return cls(
            path=path,
            sha256=hashlib.sha256(raw).hexdigest(),
            size=len(raw),
            mode=0o777,
            type="symlink",
            target=target,
        )

    @model_validator(mode="after")
    def _target_only_for_symlinks(self) -> Self:
        if (self.type == "symlink") != (self.target is not None):
            raise ValueError("target is required for a symlink and only for a symlink")
        return self


# ---------------------------------------------------------------------------- as S3 keeps it


class FileEntry(Model):
    """A regular file; its bytes are the blob named by its sha256."""

    path: RelPath
    sha256: Sha256
    size: int = Field(ge=0)
    mode: Mode


class DirEntry(Model):
    path: RelPath
    mode: Mode


class SymlinkEntry(Model):
    path: RelPath
    target: str = Field(description="As readlink says; never followed.")


class ForkedFrom(Model):
    build_id: Id
    snapshot_id: str


class Manifest(Model):
    """One snapshot of a build's workspace, ``builds/<build_id>/manifests/<snapshot_id>.json``."""

    format: Literal[1] = MANIFEST_FORMAT
    snapshot_id: str = Field(description="The event_id of the CheckpointSaved it was taken for.")
    build_id: Id
    user_id: Id
    iteration: int = Field(ge=0)
    reason: CheckpointReason
    checkpoint_at: datetime = Field(description="The checkpoint's occurred_at.")
    created_at: datetime = Field(description="When the manifest was written.")
    files: int = Field(ge=0, description="How many regular files (``entries``).")
    bytes_total: int = Field(ge=0, description="The regular files' bytes.")
    bytes_uploaded: int = Field(ge=0, description="The bytes of the blobs this snapshot uploaded.")
    entries: list[FileEntry] = Field(description="The regular files.")
    dirs: list[DirEntry] = Field(default_factory=list, description="Every directory.")
    symlinks: list[SymlinkEntry] = Field(default_factory=list)
    forked_from: ForkedFrom | None = Field(
        default=None,
        description="A fork's first snapshot: the source's snapshot it copies (the same blobs).",
    )

    @classmethod
    def of(
        cls,
        checkpoint: CheckpointSaved,
        listing: Iterable[ManifestEntry],
        *,
        bytes_uploaded: int,
        created_at: datetime | None = None,
    ) -> Self:
        """The manifest of the sandbox's ``listing`` for ``checkpoint`` (entries in its order)."""
        files: list[FileEntry] = []
        dirs: list[DirEntry] = []
        symlinks: list[SymlinkEntry] = []
        for e in listing:
            if e.type == "file":
                files.append(FileEntry(path=e.path, sha256=e.sha256, size=e.size, mode=e.mode))
            elif e.type == "dir":
                dirs.append(DirEntry(path=e.path, mode=e.mode))
            elif e.target is not None:  # a symlink always has one
                symlinks.append(SymlinkEntry(path=e.path, target=e.target))
        return cls(
            snapshot_id=str(checkpoint.event_id),
            build_id=checkpoint.build_id,
            user_id=checkpoint.user_id,
            iteration=checkpoint.iteration,
            reason=checkpoint.reason,
            checkpoint_at=checkpoint.occurred_at,
            created_at=created_at or utcnow(),
            files=len(files),
            bytes_total=sum(f.size for f in files),
            bytes_uploaded=bytes_uploaded,
            entries=files,
            dirs=dirs,
            symlinks=symlinks,
        )

    @classmethod
    def parse(cls, raw: bytes | str) -> Self:
        """A stored manifest; ValidationError (a ValueError) when it is not one."""
        return cls.model_validate_json(raw)

    def dump(self) -> bytes:
        """The stored document (no ``forked_from`` but in a fork's first: as manifests were)."""
        leave_out = {"forked_from"} if self.forked_from is None else None
        return self.model_dump_json(exclude=leave_out).encode()

    def blobs(self) -> set[str]:
        """The sha256 of every blob the manifest names."""
        return {f.sha256 for f in self.entries}

    def escaping_symlinks(self) -> list[str]:
        """The paths of the symlinks that lead outside the workspace (see ``escapes``), sorted."""
        links = {s.path: s.target for s in self.symlinks}
        return sorted(path for path in links if escapes(path, links))


def escapes(path: str, links: dict[str, str], max_hops: int = 40) -> bool:
    """Whether ``path`` leads outside the workspace when the snapshot's ``links`` are followed
    (as ``realpath -m`` would in the restored tree). Absolute targets always count as outside:
    the workspace's absolute path differs from one sandbox to the next."""
    todo = list(reversed(path.split("/")))
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not done:
                return True
            done.pop()
            continue
        candidate = "/".join([*done, part])
        target = links.get(candidate)
        if target is None:
            done.append(part)
            continue
        hops += 1
        if hops > max_hops or target.startswith("/"):
            return True  # a loop, or absolute
        todo.extend(reversed(target.split("/")))
    return False
