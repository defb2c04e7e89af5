"""Request/reply messages (core NATS, not persisted): between snapshot and sandbox, and the
budget's answer to the gateway.

Bytes never travel on the bus: the sandbox hashes its files and uploads the missing blobs to S3
itself, through presigned URLs the snapshot service hands it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field, StringConstraints

from .manifest import EMPTY_SHA256, EntryType, ManifestEntry
from .messages import ForkOrigin, Id, MicroUsd, Model

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
    fork: ForkOrigin | None = Field(
        default=None,
        description="The build is a fork: if it has no snapshot of its own yet, its first one is "
        "made from this snapshot of its source (a copy of the manifest, naming the same blobs) "
        "and that is the plan.",
    )


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


class BudgetStatusRequest(Model):
    """What the budget allows a user now (``kiln.rpc.budget.status``)."""

    user_id: Id
    tier: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")] | None = Field(
        default=None,
        description="The caller's tier, for a user whose builds the budget has not seen yet "
        "(otherwise the budget goes by the tier of the user's latest BuildRequested).",
    )


class BudgetStatus(Model):
    """A user's allowance in the current period ("today"), as the budget enforces it."""

    user_id: Id
    tier: str
    period: str = Field(description="The period's key: 2025-03-31 (or p<n> when shortened).")
    cycle: str = Field(description="The cycle's key: 2025-03 (or c<n>).")
    period_start: datetime
    period_end: datetime = Field(description="The reset: the allowance is recomputed then.")
    allowance_micro_usd: MicroUsd
    spent_period_micro_usd: MicroUsd
    remaining_micro_usd: MicroUsd
    spent_cycle_micro_usd: MicroUsd
    topups_cycle_micro_usd: MicroUsd
    monthly_budget_micro_usd: MicroUsd
    wake_at: datetime = Field(description="When a build put to sleep now would wake.")


class BudgetStatusReply(Model):
    ok: bool = True
    error: str = ""
    status: BudgetStatus | None = None


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
    BudgetStatusRequest,
    BudgetStatus,
    BudgetStatusReply,
)
