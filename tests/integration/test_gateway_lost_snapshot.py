"""A build whose snapshot the store lost (an S3 emptied by a restart): the download says so."""

from __future__ import annotations

import boto3
import pytest

from kiln_contracts import BuildRequested, SnapshotSaved
from tests.integration.gateway_fixtures import running_gateway, until

pytestmark = pytest.mark.integration


async def test_download_of_a_lost_snapshot_says_what_happened(infra, uid: str) -> None:
    bucket = f"kiln-lost-{uid}".lower()
    boto3.client(
        "s3",
        endpoint_url=infra["S3_ENDPOINT_URL"],
        aws_access_key_id=infra.get("AWS_ACCESS_KEY_ID", "kiln-local"),
        aws_secret_access_key=infra.get("AWS_SECRET_ACCESS_KEY", "kiln-local"),
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    user, saved, never = f"lost{uid}", f"b{uid}", f"n{uid}"
    async with running_gateway(
        infra,
        f"gwlost{uid}",
        s3_endpoint_url=infra["S3_ENDPOINT_URL"],
        s3_bucket=bucket,
        gateway_projection_durable=f"gw-lost-{uid}",
    ) as gw:
        key = await gw.key(user)
        for build_id in (saved, never):
            await gw.bus.publish(
                BuildRequested(build_id=build_id, user_id=user, tier="pro", idea_brief="x")
            )
        await gw.bus.publish(
            SnapshotSaved(
                build_id=saved,
                user_id=user,
                snapshot_id="snap-gone",
                iteration=1,
                reason="files_changed",
                files=1,
                bytes_total=1,
                bytes_uploaded=1,
            )
        )
        async with gw.client(key) as c:

            async def projected() -> bool:
                r = await c.get(f"/v1/builds/{saved}")
                other = await c.get(f"/v1/builds/{never}")
                return (
                    r.status_code == 200
                    and r.json()["last_snapshot_id"] == "snap-gone"
                    and other.status_code == 200
                )

            await until(projected)
            gone = await c.get(f"/v1/builds/{saved}/files")
            assert gone.status_code == 410, gone.text
            assert "snap-gone" in gone.json()["detail"]
            assert "no longer has it" in gone.json()["detail"]
            assert "no snapshot yet" not in gone.text
            tree = await c.get(f"/v1/builds/{saved}/snapshots/latest/tree")
            assert tree.status_code == 410, tree.text
            nothing = await c.get(f"/v1/builds/{never}/files")
            assert nothing.status_code == 404
            assert "no snapshot yet" in nothing.json()["detail"]
