"""The ObjectStore on S3 (or any S3 API: moto, MinIO) through ``kiln_runtime.s3`` (every call
has timeouts and bounded retries)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from botocore.exceptions import ClientError

from kiln_runtime.s3 import S3Connection, error_code, get_object, head_object, is_not_found

from ..ports import StoredObject

log = logging.getLogger(__name__)


class S3Store:
    """One bucket. ``open()`` creates the client and the bucket if missing; nothing before."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        max_attempts: int = 5,
        presign_expiry_s: int = 3600,
        head_concurrency: int = 16,
    ) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self.presign_expiry_s = presign_expiry_s
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_attempts = max_attempts
        self._head = asyncio.Semaphore(head_concurrency)
        self._s3 = S3Connection(
            endpoint_url=endpoint_url,
            region=region,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            max_attempts=max_attempts,
        )
        self._client: Any = None

    async def open(self) -> None:
        self._client = await self._s3.open()
        await self.ensure_bucket()

    async def close(self) -> None:
        await self._s3.close()
        self._client = None

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("S3Store used before open()")
        return self._client

    async def ensure_bucket(self) -> None:
        try:
            await self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as err:
            if not is_not_found(err):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            await self.client.create_bucket(**kwargs)
            log.info("created bucket %s", self.bucket)
        except ClientError as err:
            if error_code(err) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise

    async def get(self, key: str) -> bytes | None:
        return await get_object(self.client, self.bucket, key)

    async def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/json",
        metadata: dict[str, str] | None = None,
    ) -> None:
        await self.client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
            Metadata=metadata or {},
        )

    async def _head_object(self, key: str) -> dict[str, Any] | None:
        async with self._head:
            return await head_object(self.client, self.bucket, key)

    async def metadata(self, key: str) -> dict[str, str] | None:
        head = await self._head_object(key)
        if head is None:
            return None
        return {str(k): str(v) for k, v in head.get("Metadata", {}).items()}

    async def size(self, key: str) -> int | None:
        head = await self._head_object(key)
        return None if head is None else int(head["ContentLength"])

    async def sizes(self, keys: Iterable[str]) -> dict[str, int | None]:
        keys = list(keys)
        found = await asyncio.gather(*(self.size(k) for k in keys))
        return dict(zip(keys, found, strict=True))

    async def missing(self, keys: Iterable[str]) -> set[str]:
        return {k for k, size in (await self.sizes(keys)).items() if size is None}

    async def delete(self, key: str) -> None:
        await self.client.delete_object(Bucket=self.bucket, Key=key)

    async def list(self, prefix: str) -> list[StoredObject]:
        out: list[StoredObject] = []
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out.append(
                    StoredObject(
                        key=str(obj["Key"]),
                        size=int(obj["Size"]),
                        last_modified=obj["LastModified"],
                    )
                )
        return out

    async def presign_put(self, key: str) -> str:
        return await self._presign("put_object", key)

    async def presign_get(self, key: str) -> str:
        return await self._presign("get_object", key)

    async def _presign(self, method: str, key: str) -> str:
        url: str = await self.client.generate_presigned_url(
            method, Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.presign_expiry_s
        )
        return url
