"""Request/reply messages between snapshot and sandbox (core NATS, not persisted).

Bytes never travel on the bus: the sandbox hashes its files and uploads the missing blobs to S3
itself, through presigned URLs the snapshot service hands it.
"""

from __future__ import annotations

from pydantic import Field

from .manifest import EMPTY_SHA256, EntryType, ManifestEntry
from .messages import Id, Model

__all__ = [
    "EMPTY_SHA256",
    "RPC_MODELS",
    "Download",
    "EntryType",
    "ManifestEntry",
    "ManifestReply",
    "ManifestRequest",
    "RestorePlanReply",
    "RestorePlanRequest",
    "Upload",
    "UploadReply",
    "UploadRequest",
]


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
)
