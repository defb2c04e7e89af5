"""Request/reply messages between snapshot and sandbox (core NATS, not persisted).

Bytes never travel on the bus: the sandbox hashes its files and uploads the missing blobs to S3
itself, through presigned URLs the snapshot service hands it.
"""

from __future__ import annotations

from pydantic import Field

from .messages import Id, Model


class ManifestEntry(Model):
    path: str = Field(description="Relative to the workspace root, '/'-separated.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    mode: int = Field(ge=0, description="Permission bits, e.g. 0o644.")


class ManifestRequest(Model):
    build_id: Id
    excludes: list[str] = Field(default_factory=list)


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
    ok: bool = True
    error: str = ""
    snapshot_id: str | None = None
    files: list[Download] = Field(default_factory=list)


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
