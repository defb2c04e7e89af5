"""``python -m kiln_snapshot`` as the process supervisor runs it: env vars in, SIGTERM out."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aioboto3
import pytest
from nats.aio.client import Client

from kiln_contracts import subjects
from kiln_contracts.rpc import RestorePlanReply, RestorePlanRequest

pytestmark = pytest.mark.integration


async def test_python_m_kiln_snapshot_creates_its_bucket_serves_and_stops_cleanly(infra, uid):
    bucket = f"kiln-entry-{uid}"
    env = {
        **os.environ,
        "NATS_URL": infra["NATS_URL"],
        "S3_ENDPOINT_URL": infra["S3_ENDPOINT_URL"],
        "KILN_S3_BUCKET": bucket,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kiln_snapshot",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    nc = Client()
    await nc.connect(infra["NATS_URL"])
    plan = None
    err = b""
    try:
        request = RestorePlanRequest(build_id=f"b{uid}").model_dump_json().encode()
        for _ in range(300):  # up to 30 s for start-up
            if proc.returncode is not None:
                break
            try:
                reply = await nc.request(subjects.SNAPSHOT_RESTORE_PLAN, request, timeout=1)
            except Exception:
                await asyncio.sleep(0.1)
                continue
            plan = RestorePlanReply.model_validate_json(reply.data)
            break
    finally:
        await nc.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert plan is not None, err.decode()[-3000:]
    assert (plan.ok, plan.error) == (False, "no snapshot")
    async with aioboto3.Session().client(
        "s3", endpoint_url=infra["S3_ENDPOINT_URL"], region_name="us-east-1"
    ) as s3:
        await s3.head_bucket(Bucket=bucket)  # created at start
    assert proc.returncode == 0, err.decode()[-3000:]
