"""SIGKILL of ``python -m kiln_snapshot`` in the middle of a snapshot's uploads: no manifest names
a missing blob, a collection meanwhile keeps the half-uploaded blobs (the pending marker), and a
restarted process completes the snapshot from the redelivered CheckpointSaved."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
from typing import Any

import httpx
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from kiln_contracts import CheckpointSaved, SnapshotSaved, subjects
from kiln_contracts.rpc import (
    ManifestEntry,
    ManifestReply,
    ManifestRequest,
    UploadReply,
    UploadRequest,
)
from kiln_runtime.streams import ensure_streams
from kiln_snapshot import gc
from kiln_snapshot.adapters.s3 import S3Store
from tests.integration.service_process import set_ack_wait, start_service, wait_for

pytestmark = pytest.mark.integration

ACK_WAIT_S = 2.0
DEFAULT_ACK_WAIT_S = 30.0  # CommonSettings' default
DURABLE = "snapshot-checkpoint-saved"
SERVICE = "kiln_snapshot"
FILES = {f"f{i:02d}.txt": f"content {i}\n".encode() * 50 for i in range(12)}


class SlowSandbox:
    """Answers the sandbox RPCs for one build; while ``stall`` is set, an upload request PUTs
    its first blob and then never answers (the snapshot service is killed meanwhile)."""

    def __init__(self, build_id: str) -> None:
        self.build_id = build_id
        self.stall = True
        self.put_while_stalled = asyncio.Event()
        self.uploads = 0

    async def manifest(self, msg: Msg) -> None:
        request = ManifestRequest.model_validate_json(msg.data)
        if request.build_id != self.build_id:
            reply = ManifestReply(ok=False, error="not this test's build")
        else:
            reply = ManifestReply(
                entries=[
                    ManifestEntry(
                        path=p, sha256=hashlib.sha256(b).hexdigest(), size=len(b), mode=0o644
                    )
                    for p, b in FILES.items()
                ]
            )
        await msg.respond(reply.model_dump_json().encode())

    async def upload(self, msg: Msg) -> None:
        request = UploadRequest.model_validate_json(msg.data)
        if request.build_id != self.build_id:
            return
        self.uploads += 1
        async with httpx.AsyncClient(timeout=10) as http:
            for n, up in enumerate(request.uploads):
                response = await http.put(up.url, content=FILES[up.path])
                assert response.status_code == 200
                if self.stall and n == 0:
                    self.put_while_stalled.set()
                    await asyncio.sleep(3600)  # never answers; cancelled when nc closes
        reply = UploadReply(uploaded=len(request.uploads))
        await msg.respond(reply.model_dump_json().encode())


def service_env(infra: dict[str, str], bucket: str) -> dict[str, str]:
    return {
        "NATS_URL": infra["NATS_URL"],
        "S3_ENDPOINT_URL": infra["S3_ENDPOINT_URL"],
        "KILN_S3_BUCKET": bucket,
        "KILN_ACK_WAIT_S": str(ACK_WAIT_S),
        "KILN_UPLOAD_BATCH": "4",
        "KILN_UPLOAD_TIMEOUT_S": "60",
    }


async def every_manifest_is_complete(store: S3Store) -> int:
    """Check each manifest in the bucket names only blobs that exist; how many there are."""
    count = 0
    for obj in await store.list("builds/"):
        if "/manifests/" in obj.key:
            count += 1
            doc = json.loads(await store.get(obj.key) or b"{}")
            keys = [f"blobs/{e['sha256']}" for e in doc["entries"]]
            assert await store.missing(keys) == set(), obj.key
    return count


async def test_sigkill_mid_upload_leaves_no_dangling_manifest_and_a_restart_completes(
    infra: dict[str, str], uid: str
) -> None:
    build_id = f"b{uid}"
    bucket = f"kiln-kill-{uid}"
    nc = Client()
    await nc.connect(infra["NATS_URL"])
    await ensure_streams(nc)
    fake = SlowSandbox(build_id)
    tasks: set[asyncio.Task[None]] = set()

    def concurrently(handler: Any) -> Any:
        # nats-py runs a subscription's callbacks one at a time: a stalled one would block all.
        async def cb(msg: Msg) -> None:
            task = asyncio.create_task(handler(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        return cb

    await nc.subscribe(subjects.SANDBOX_MANIFEST, cb=concurrently(fake.manifest))
    await nc.subscribe(subjects.SANDBOX_UPLOAD, cb=concurrently(fake.upload))
    saved: list[SnapshotSaved] = []

    async def on_saved(msg: Msg) -> None:
        saved.append(SnapshotSaved.model_validate_json(msg.data))

    await nc.subscribe(subjects.subject(build_id, SnapshotSaved.kind), cb=on_saved)
    # The durable is shared with the other entrypoint tests: a short ack_wait for a quick
    # redelivery, the original put back afterwards.
    restore_ack_wait = await set_ack_wait(nc, DURABLE, ACK_WAIT_S)
    store = S3Store(bucket, endpoint_url=infra["S3_ENDPOINT_URL"])
    await store.open()  # creates the bucket
    first = await start_service(SERVICE, service_env(infra, bucket))
    second: asyncio.subprocess.Process | None = None
    try:
        event = CheckpointSaved(build_id=build_id, user_id=f"u{uid}", iteration=1, reason="final")
        await nc.jetstream().publish(
            subjects.subject_of(event),
            event.model_dump_json().encode(),
            headers={"Nats-Msg-Id": str(event.event_id)},
        )
        await asyncio.wait_for(fake.put_while_stalled.wait(), timeout=60)
        first.send_signal(signal.SIGKILL)
        await first.wait()

        # killed mid-upload: some blobs, no manifest, no latest, the pending marker
        blobs = await store.list("blobs/")
        assert 0 < len(blobs) < len(FILES)
        assert await every_manifest_is_complete(store) == 0
        assert await store.get(f"builds/{build_id}/latest") is None
        marker = f"pending/{build_id}/{event.event_id}.json"
        assert await store.get(marker) is not None
        # a collection now (no grace period) keeps the blobs the pending snapshot names
        report = await gc.collect(store, keep=5, grace_s=0, max_snapshot_s=600, sweep_s=60)
        assert report.blobs_deleted == 0 and report.blobs_pending == len(FILES)

        # a fresh process gets the redelivered checkpoint and completes the snapshot
        fake.stall = False
        second = await start_service(SERVICE, service_env(infra, bucket))

        async def done() -> bool:
            return bool(saved)

        await wait_for(done)
        assert saved[0].snapshot_id == str(event.event_id)
        assert saved[0].files == len(FILES)
        assert saved[0].bytes_uploaded < saved[0].bytes_total  # the first run's blobs reused
        assert await every_manifest_is_complete(store) == 1
        assert await store.get(f"builds/{build_id}/latest") == str(event.event_id).encode()
        assert await store.get(marker) is None
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=20)
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        await set_ack_wait(nc, DURABLE, restore_ack_wait or DEFAULT_ACK_WAIT_S)
        for task in list(tasks):
            task.cancel()
        await store.close()
        await nc.close()
