"""The snapshot service's settings (environment variables: ``KILN_`` + the field's name, or its
alias)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import NoDecode

from kiln_runtime.settings import CommonSettings

DEFAULT_EXCLUDES = ["__pycache__", ".cache", ".pytest_cache", "node_modules/.cache"]


class SnapshotSettings(CommonSettings):
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("S3_ENDPOINT_URL", "KILN_S3_ENDPOINT_URL"),
        description="None: AWS S3.",
    )
    s3_bucket: str = "kiln-snapshots"
    region: str = Field(
        default="us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION")
    )
    snapshot_excludes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDES),
        description="Comma-separated names or relative paths the sandbox leaves out.",
    )
    s3_connect_timeout_s: float = Field(default=5.0, gt=0)
    s3_read_timeout_s: float = Field(default=30.0, gt=0)
    s3_max_attempts: int = Field(default=5, ge=1)
    presign_expiry_s: int = Field(default=3600, ge=60)
    manifest_timeout_s: float = Field(default=60.0, gt=0)
    upload_timeout_s: float = Field(default=300.0, gt=0)
    upload_batch: int = Field(default=200, ge=1)
    snapshot_workers: int = Field(default=8, ge=1, le=64)
    snapshot_keep: int = Field(
        default=5, ge=1, description="Manifests kept per build (the newest; latest's always)."
    )
    snapshot_max_s: float = Field(
        default=1800.0,
        gt=0,
        description="A snapshot still unwritten after this long starts again (GC safety).",
    )
    snapshot_gc_grace_s: float = Field(
        default=3600.0,
        ge=0,
        description="An unreferenced blob is deleted only once it is this old.",
    )
    snapshot_gc_sweep_s: float = Field(
        default=600.0,
        gt=0,
        description="How long one collection may sweep; snapshots wait while it does.",
    )
    snapshot_gc_interval_s: float = Field(
        default=0.0,
        ge=0,
        description="Run the collection in the service every this many seconds; 0: never "
        "(run `python -m kiln_snapshot.gc` from a CronJob instead).",
    )

    @field_validator("snapshot_excludes", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
