"""The snapshot service's bucket, read only, through ``kiln_runtime.s3`` (every call has timeouts).

Keys from ``kiln_contracts.bucket`` (``latest`` names the newest snapshot, its manifest lists the
files, directories and symlinks, the blobs hold the bytes), manifests read as
``kiln_contracts.manifest.Manifest``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError

from kiln_contracts.bucket import (
    blob_key,
    latest_key,
    manifest_key,
    manifests_prefix,
    parse_manifest_key,
    pruned_key,
)
from kiln_contracts.manifest import Manifest
from kiln_runtime.s3 import S3Connection, get_object, is_not_found

from ..ports import BlobTooLarge, StoredSnapshot

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
READ_CONCURRENCY = 8


class S3Files:
    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None,
        region: str,
        timeout_s: float,
        cached_manifests: int = 64,
    ) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self.timeout_s = timeout_s
        # A manifest never changes once written (a new snapshot is a new key): the parsed ones
        # are kept, least recently used dropped past ``cached_manifests``.
        self._manifests: OrderedDict[tuple[str, str], Manifest] = OrderedDict()
        self._cached_manifests = cached_manifests
        self._s3 = S3Connection(
            endpoint_url=endpoint_url,
            region=region,
            connect_timeout_s=min(5.0, timeout_s),
            read_timeout_s=timeout_s,
            max_attempts=3,
        )
        self._client: Any = None

    async def open(self) -> None:
        """Create the client (no network call yet)."""
        self._client = await self._s3.open()

    async def close(self) -> None:
        await self._s3.close()
        self._client = None

    async def _get(self, key: str) -> bytes | None:
        return await get_object(self._client, self.bucket, key)

    async def latest_id(self, build_id: str) -> str | None:
        raw = await self._get(latest_key(build_id))
        snapshot_id = raw.decode().strip() if raw else ""
        return snapshot_id or None

    async def latest(self, build_id: str) -> Manifest | None:
        snapshot_id = await self.latest_id(build_id)
        return None if snapshot_id is None else await self.manifest(build_id, snapshot_id)

    async def manifest(self, build_id: str, snapshot_id: str) -> Manifest | None:
        cached = self._manifests.get((build_id, snapshot_id))
        if cached is not None:
            self._manifests.move_to_end((build_id, snapshot_id))
            return cached
        doc = await self._get(manifest_key(build_id, snapshot_id))
        if doc is None:
            return None
        manifest = Manifest.parse(doc)
        self._manifests[(build_id, snapshot_id)] = manifest
        while len(self._manifests) > self._cached_manifests:
            self._manifests.popitem(last=False)
        return manifest

    async def snapshots(self, build_id: str) -> list[StoredSnapshot]:
        keys: list[tuple[str, datetime]] = []
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=manifests_prefix(build_id))
        try:
            async for page in pages:
                for obj in page.get("Contents", []):
                    parsed = parse_manifest_key(str(obj["Key"]))
                    if parsed is not None and parsed[0] == build_id:
                        keys.append((parsed[1], obj["LastModified"]))
        except ClientError as err:
            if is_not_found(err):  # no bucket yet: no snapshot has been taken
                return []
            raise
        limit = asyncio.Semaphore(READ_CONCURRENCY)

        async def read(snapshot_id: str) -> Manifest | None:
            async with limit:
                try:
                    return await self.manifest(build_id, snapshot_id)
                except ValueError as err:  # not a manifest: the others are still listed
                    log.warning("unreadable manifest %s: %s", snapshot_id, err)
                    return None

        manifests = await asyncio.gather(*(read(sid) for sid, _ in keys))
        # A manifest deleted between the listing and the read (retention) is left out.
        return [
            StoredSnapshot(m, written) for m, (_, written) in zip(manifests, keys, strict=True) if m
        ]

    async def read_blob(self, sha256: str, max_bytes: int) -> bytes:
        data = bytearray()
        async for chunk in self.blob(sha256):
            data += chunk
            if len(data) > max_bytes:
                raise BlobTooLarge(sha256)
        return bytes(data)

    async def pruned(self, build_id: str) -> int | None:
        raw = await self._get(pruned_key(build_id))
        text = raw.decode().strip() if raw else ""
        return int(text) if text.isdigit() else None

    async def blob(self, sha256: str) -> AsyncIterator[bytes]:
        response = await self._client.get_object(Bucket=self.bucket, Key=blob_key(sha256))
        body = response["Body"]
        try:
            async for chunk in body.iter_chunks(CHUNK):
                yield chunk
        finally:
            body.close()
