"""The snapshot service's bucket, read only, through ``kiln_runtime.s3`` (every call has timeouts).

Keys from ``kiln_contracts.bucket`` (``latest`` names the newest snapshot, its manifest lists the
files, directories and symlinks, the blobs hold the bytes), manifests read as
``kiln_contracts.manifest.Manifest``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
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
from kiln_runtime.s3 import is_not_found, s3_client

CHUNK = 256 * 1024


class S3Files:
    def __init__(
        self, bucket: str, *, endpoint_url: str | None, region: str, timeout_s: float
    ) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self.timeout_s = timeout_s
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    async def open(self) -> None:
        """Create the client (no network call yet)."""
        stack = contextlib.AsyncExitStack()
        self._client = await stack.enter_async_context(
            s3_client(
                endpoint_url=self.endpoint_url,
                region=self.region,
                connect_timeout_s=min(5.0, self.timeout_s),
                read_timeout_s=self.timeout_s,
                max_attempts=3,
            )
        )
        self._stack = stack

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack, self._client = None, None

    async def _get(self, key: str) -> bytes | None:
        try:
            response = await self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as err:
            if is_not_found(err):
                return None
            raise
        async with response["Body"] as body:
            data: bytes = await body.read()
        return data

    async def latest(self, build_id: str) -> Manifest | None:
        snapshot_id = await self._get(latest_key(build_id))
        if not snapshot_id:
            return None
        doc = await self._get(manifest_key(build_id, snapshot_id.decode().strip()))
        return None if doc is None else Manifest.parse(doc)

    async def manifest(self, build_id: str, snapshot_id: str) -> Manifest | None:
        doc = await self._get(manifest_key(build_id, snapshot_id))
        return None if doc is None else Manifest.parse(doc)

    async def manifests(self, build_id: str) -> list[Manifest]:
        out = []
        paginator = self._client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=manifests_prefix(build_id)):
            for obj in page.get("Contents", []):
                names = parse_manifest_key(str(obj["Key"]))
                if names is not None and (doc := await self.manifest(*names)) is not None:
                    out.append(doc)
        return out

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
