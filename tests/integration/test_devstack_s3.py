"""The embedded S3 keeps its objects across a restart on the same data directory."""

from __future__ import annotations

from pathlib import Path

import boto3
import httpx
import pytest

from kiln_devstack.infra import Infra
from kiln_devstack.s3_server import Journal

pytestmark = pytest.mark.integration


def client(url: str):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="kiln-local",
        aws_secret_access_key="kiln-local",
        region_name="us-east-1",
    )


def test_objects_survive_a_restart_of_the_s3_server(tmp_path: Path) -> None:
    first = Infra(tmp_path)
    try:
        s3 = client(first.start_s3())
        s3.create_bucket(Bucket="kept")
        s3.put_object(Bucket="kept", Key="snap/1/manifest.json", Body=b'{"v": 1}')
        s3.put_object(Bucket="kept", Key="snap/1/manifest.json", Body=b'{"v": 2}')
        s3.put_object(Bucket="kept", Key="gone", Body=b"x")
        s3.delete_object(Bucket="kept", Key="gone")
        # A presigned PUT, as a sandbox uploads an archive.
        url = s3.generate_presigned_url(
            "put_object", Params={"Bucket": "kept", "Key": "snap/1/files.tar"}, ExpiresIn=60
        )
        assert httpx.put(url, content=b"tar bytes").status_code == 200
    finally:
        first.stop()

    second = Infra(tmp_path)
    try:
        s3 = client(second.start_s3())
        body = s3.get_object(Bucket="kept", Key="snap/1/manifest.json")["Body"].read()
        assert body == b'{"v": 2}'
        assert s3.get_object(Bucket="kept", Key="snap/1/files.tar")["Body"].read() == b"tar bytes"
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="kept").get("Contents", [])]
        assert sorted(keys) == ["snap/1/files.tar", "snap/1/manifest.json"]
    finally:
        second.stop()
    # The replay compacted the journal: the first manifest and the deleted object are gone.
    journal = Journal(tmp_path / "s3")
    assert len(journal.numbers()) == 3  # the bucket, the manifest, the archive


def test_a_new_data_dir_starts_empty(tmp_path: Path) -> None:
    infra = Infra(tmp_path / "fresh")
    try:
        s3 = client(infra.start_s3())
        assert s3.list_buckets()["Buckets"] == []
    finally:
        infra.stop()
