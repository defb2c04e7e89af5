"""The snapshot service's settings (environment variables)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from kiln_runtime.settings import CommonSettings, env

DEFAULT_EXCLUDES = ["__pycache__", ".cache", ".pytest_cache", "node_modules/.cache"]


class SnapshotSettings(CommonSettings):
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=env("S3_ENDPOINT_URL", "KILN_S3_ENDPOINT_URL"),
        description="None: AWS S3.",
    )
    bucket: str = Field(default="kiln-snapshots", validation_alias=env("KILN_S3_BUCKET"))
    region: str = Field(
        default="us-east-1", validation_alias=env("AWS_REGION", "AWS_DEFAULT_REGION")
    )
    excludes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDES),
        validation_alias=env("KILN_SNAPSHOT_EXCLUDES"),
        description="Comma-separated names or relative paths the sandbox leaves out.",
    )
    s3_connect_timeout_s: float = Field(
        default=5.0, gt=0, validation_alias=env("KILN_S3_CONNECT_TIMEOUT_S")
    )
    s3_read_timeout_s: float = Field(
        default=30.0, gt=0, validation_alias=env("KILN_S3_READ_TIMEOUT_S")
    )
    s3_max_attempts: int = Field(default=5, ge=1, validation_alias=env("KILN_S3_MAX_ATTEMPTS"))
    presign_expiry_s: int = Field(
        default=3600, ge=60, validation_alias=env("KILN_PRESIGN_EXPIRY_S")
    )
    manifest_timeout_s: float = Field(
        default=60.0, gt=0, validation_alias=env("KILN_MANIFEST_TIMEOUT_S")
    )
    upload_timeout_s: float = Field(
        default=300.0, gt=0, validation_alias=env("KILN_UPLOAD_TIMEOUT_S")
    )
    upload_batch: int = Field(default=200, ge=1, validation_alias=env("KILN_UPLOAD_BATCH"))
    workers: int = Field(default=8, ge=1, le=64, validation_alias=env("KILN_SNAPSHOT_WORKERS"))
    keep: int = Field(
        default=5,
        ge=1,
        validation_alias=env("KILN_SNAPSHOT_KEEP"),
        description="Manifests kept per build (the newest; latest's always).",
    )
    max_snapshot_s: float = Field(
        default=1800.0,
        gt=0,
        validation_alias=env("KILN_SNAPSHOT_MAX_S"),
        description="A snapshot still unwritten after this long starts again (GC safety).",
    )
    gc_grace_s: float = Field(
        default=3600.0,
        ge=0,
        validation_alias=env("KILN_SNAPSHOT_GC_GRACE_S"),
        description="An unreferenced blob is deleted only once it is this old.",
    )
    gc_sweep_s: float = Field(
        default=600.0,
        gt=0,
        validation_alias=env("KILN_SNAPSHOT_GC_SWEEP_S"),
        description="How long one collection may sweep; snapshots wait while it does.",
    )
    gc_interval_s: float = Field(
        default=0.0,
        ge=0,
        validation_alias=env("KILN_SNAPSHOT_GC_INTERVAL_S"),
        description="Run the collection in the service every this many seconds; 0: never "
        "(run `python -m kiln_snapshot.gc` from a CronJob instead).",
    )

    @field_validator("excludes", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
