"""The one S3 client factory: aioboto3 with timeouts and bounded retries on every call.

Needs the ``s3`` extra (``kiln-runtime[s3]``), which only the services that talk to S3 (the
gateway, the snapshot) declare, so the other images carry no aioboto3. Path-style addressing
for an S3-compatible endpoint (moto, MinIO), virtual hosts on AWS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import ClientError

NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
"""The error codes S3 and its look-alikes answer for a missing key or bucket."""


def error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def is_not_found(err: ClientError) -> bool:
    return error_code(err) in NOT_FOUND


async def get_object(client: Any, bucket: str, key: str) -> bytes | None:
    """The object's bytes, or None where the key (or the bucket) is missing."""
    try:
        response = await client.get_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if is_not_found(err):
            return None
        raise
    async with response["Body"] as body:
        data: bytes = await body.read()
    return data


async def head_object(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's HEAD answer, or None where the key (or the bucket) is missing."""
    try:
        head: dict[str, Any] = await client.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if is_not_found(err):
            return None
        raise
    return head


def client_config(
    *,
    endpoint_url: str | None,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 30.0,
    max_attempts: int = 5,
) -> Config:
    """botocore's settings for every call: timeouts, retries in botocore's standard mode."""
    return Config(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        signature_version="s3v4",
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )


@asynccontextmanager
async def s3_client(
    *,
    endpoint_url: str | None,
    region: str,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 30.0,
    max_attempts: int = 5,
) -> AsyncIterator[Any]:
    """An aioboto3 S3 client, closed on exit. Creating it makes no network call."""
    config = client_config(
        endpoint_url=endpoint_url,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=read_timeout_s,
        max_attempts=max_attempts,
    )
    async with aioboto3.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=config
    ) as client:
        yield client


class S3Connection:
    """An ``s3_client`` held open from its owner's start (``open``) to its stop (``close``)."""

    def __init__(
        self,
        *,
        endpoint_url: str | None,
        region: str,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        max_attempts: int = 5,
    ) -> None:
        self._settings: dict[str, Any] = {
            "endpoint_url": endpoint_url,
            "region": region,
            "connect_timeout_s": connect_timeout_s,
            "read_timeout_s": read_timeout_s,
            "max_attempts": max_attempts,
        }
        self._stack: AsyncExitStack | None = None

    async def open(self) -> Any:
        """The client (made now; no network call yet)."""
        stack = AsyncExitStack()
        client = await stack.enter_async_context(s3_client(**self._settings))
        self._stack = stack
        return client

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
