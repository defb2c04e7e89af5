"""What the snapshot domain needs from the outside world."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from kiln_contracts import Envelope
from kiln_contracts.rpc import ManifestReply, ManifestRequest, UploadReply, UploadRequest


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    last_modified: datetime  # timezone-aware, as the store reports it


class ObjectStore(Protocol):
    """An S3 bucket: plain objects plus presigned URLs for bytes that never pass through us."""

    async def get(self, key: str) -> bytes | None:
        """The object's bytes, None when there is no such object."""
        ...

    async def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/json",
        metadata: dict[str, str] | None = None,
    ) -> None: ...

    async def metadata(self, key: str) -> dict[str, str] | None:
        """The object's user metadata (x-amz-meta-*), None when there is no such object."""
        ...

    async def missing(self, keys: Iterable[str]) -> set[str]:
        """Those of ``keys`` that do not exist."""
        ...

    async def sizes(self, keys: Iterable[str]) -> dict[str, int | None]:
        """Each key's size in bytes, None for a key with no object."""
        ...

    async def delete(self, key: str) -> None: ...

    async def list(self, prefix: str) -> list[StoredObject]:
        """Every object whose key starts with ``prefix`` (all pages)."""
        ...

    async def presign_put(self, key: str) -> str: ...

    async def presign_get(self, key: str) -> str: ...


class Sandbox(Protocol):
    """The sandbox's file exchange (request/reply). Unreachable: raise RetryLater."""

    async def manifest(self, request: ManifestRequest) -> ManifestReply: ...

    async def upload(self, request: UploadRequest) -> UploadReply: ...


class Publisher(Protocol):
    async def publish(self, msg: Envelope) -> None: ...
