"""Request/reply messages (core NATS, not persisted): between snapshot and sandbox, and the
gateway's top-up to the budget service.

Bytes never travel on the bus: the sandbox hashes its files and uploads the missing blobs to S3
itself, through presigned URLs the snapshot service hands it.
"""

from __future__ import annotations

import hashlib
from typing import Literal, Self

from pydantic import Field, model_validator

from .messages import Id, Model

EntryType = Literal["file", "dir", "symlink"]


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class ManifestEntry(Model):
    """One entry of a workspace: a regular file (the default), a directory or a symlink.

    ``sha256``/``size`` are the file's bytes; for a symlink those of its target string; for a
    directory those of empty content. ``mode`` holds the permission bits (a symlink's are not
    restored). Symlinks are recorded as they are (``target`` is what readlink returns).
    """

    path: str = Field(description="Relative to the workspace root, '/'-separated.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    mode: int = Field(ge=0, description="Permission bits, e.g. 0o644.")
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


class ManifestRequest(Model):
    build_id: Id
    excludes: list[str] = Field(default_factory=list)
    include_dirs_and_symlinks: bool = Field(
        default=False,
        description="Also list directories and symlinks (type 'dir' / 'symlink'); without it "
        "only regular files, as an older snapshot service expects.",
    )


class ManifestReply(Model):
    ok: bool = True
    error: str = ""
    entries: list[ManifestEntry] = Field(default_factory=list)


class Upload(Model):
    path: str
    sha256: str
    url: str = Field(description="A presigned PUT URL.")


class UploadRequest(Model):
    build_id: Id
    uploads: list[Upload]


class UploadReply(Model):
    ok: bool = True
    error: str = ""
    uploaded: int = 0
    bytes_uploaded: int = 0


class RestorePlanRequest(Model):
    build_id: Id


class Download(Model):
    path: str
    sha256: str
    mode: int
    url: str = Field(description="A presigned GET URL.")


class RestorePlanReply(Model):
    """The latest snapshot: ``files`` to download, then ``dirs`` to create (and chmod, deepest
    first, after the files) and ``symlinks`` to create. ``skipped``: symlinks the snapshot
    recorded but that are not restored because they would lead outside the workspace."""

    ok: bool = True
    error: str = ""
    snapshot_id: str | None = None
    files: list[Download] = Field(default_factory=list)
    dirs: list[ManifestEntry] = Field(default_factory=list)
    symlinks: list[ManifestEntry] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)


class TopUpRequest(Model):
    """Credit a user (the same ``topup_id`` again is the same top-up): the budget service adds it
    to the allowance, opens the user's gate if that leaves allowance, then wakes the builds it put
    to sleep."""

    user_id: Id
    topup_id: Id
    amount_micro_usd: int = Field(gt=0)


class TopUpReply(Model):
    ok: bool = True
    error: str = ""
    woken: list[str] = Field(default_factory=list, description="The builds sent a WakeRequested.")


RPC_MODELS = (
    ManifestEntry,
    ManifestRequest,
    ManifestReply,
    Upload,
    UploadRequest,
    UploadReply,
    RestorePlanRequest,
    Download,
    RestorePlanReply,
    TopUpRequest,
    TopUpReply,
)
