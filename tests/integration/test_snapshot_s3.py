"""The snapshot service on real NATS and an S3 API (moto), with a fake sandbox responder."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from kiln_contracts import CheckpointSaved, SnapshotSaved, stable_id, subjects
from kiln_contracts.rpc import (
    ManifestEntry,
    ManifestReply,
    ManifestRequest,
    RestorePlanReply,
    RestorePlanRequest,
    UploadReply,
    UploadRequest,
)
from kiln_runtime.errors import RetryLater
from kiln_snapshot import bootstrap
from kiln_snapshot.adapters.sandbox_rpc import NatsSandbox
from kiln_snapshot.settings import SnapshotSettings
from tests.integration.wirings import started

pytestmark = pytest.mark.integration


async def until(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


@dataclass
class FakeSandbox:
    """Answers the sandbox RPCs for one build from a local directory, as the real sandbox would."""

    build_id: str
    root: Path
    nc: Client | None = None
    manifests: int = 0
    uploaded: list[str] = field(default_factory=list)
    excludes_seen: list[str] = field(default_factory=list)

    async def start(self, url: str) -> None:
        self.nc = await nats.connect(url)
        await self.nc.subscribe(subjects.SANDBOX_MANIFEST, cb=self._manifest)
        await self.nc.subscribe(subjects.SANDBOX_UPLOAD, cb=self._upload)

    async def stop(self) -> None:
        if self.nc is not None:
            await self.nc.close()

    def _excluded(self, rel: str, excludes: list[str]) -> bool:
        parts = rel.split("/")
        return any(x in parts or rel == x or rel.startswith(x + "/") for x in excludes)

    async def _manifest(self, msg: Msg) -> None:
        request = ManifestRequest.model_validate_json(msg.data)
        if request.build_id != self.build_id:
            await msg.respond(
                ManifestReply(ok=False, error="workspace not found").model_dump_json().encode()
            )
            return
        self.manifests += 1
        self.excludes_seen = request.excludes
        entries = []
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root).as_posix()
            if path.is_file() and not self._excluded(rel, request.excludes):
                data = path.read_bytes()
                entries.append(
                    ManifestEntry(
                        path=rel,
                        sha256=hashlib.sha256(data).hexdigest(),
                        size=len(data),
                        mode=path.stat().st_mode & 0o777,
                    )
                )
        await msg.respond(ManifestReply(entries=entries).model_dump_json().encode())

    async def _upload(self, msg: Msg) -> None:
        request = UploadRequest.model_validate_json(msg.data)
        total = 0
        async with httpx.AsyncClient(timeout=10) as http:
            for up in request.uploads:
                data = (self.root / up.path).read_bytes()
                response = await http.put(up.url, content=data)
                if response.status_code >= 300:
                    reply = UploadReply(ok=False, error=f"PUT {response.status_code}")
                    await msg.respond(reply.model_dump_json().encode())
                    return
                self.uploaded.append(up.sha256)
                total += len(data)
        reply = UploadReply(uploaded=len(request.uploads), bytes_uploaded=total)
        await msg.respond(reply.model_dump_json().encode())


@pytest.fixture
async def service(infra: dict[str, str], uid: str) -> AsyncIterator[bootstrap.Wiring]:
    settings = SnapshotSettings(
        nats_url=infra["NATS_URL"],
        s3_endpoint_url=infra["S3_ENDPOINT_URL"],
        s3_bucket=f"kiln-snap-{uid}",
        ack_wait_s=5,
        max_deliver=3,
        manifest_timeout_s=3,
        upload_timeout_s=10,
    )
    async with started(bootstrap.build(settings, service=f"snapshot-{uid}")) as wiring:
        yield wiring


@pytest.fixture
async def sandbox(infra: dict[str, str], uid: str, tmp_path: Path) -> AsyncIterator[FakeSandbox]:
    fake = FakeSandbox(f"b{uid}", tmp_path)
    await fake.start(infra["NATS_URL"])
    try:
        yield fake
    finally:
        await fake.stop()


async def watch_saved(wiring: bootstrap.Wiring, build_id: str) -> list[SnapshotSaved]:
    """Every SnapshotSaved of a build on the stream, appended as they arrive."""
    seen: list[SnapshotSaved] = []

    async def on(msg: Msg) -> None:
        seen.append(SnapshotSaved.model_validate_json(msg.data))

    await wiring.bus.nc.jetstream().subscribe(
        subjects.subject(build_id, SnapshotSaved.kind),
        cb=on,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    return seen


async def caught_up(wiring: bootstrap.Wiring, seq: int) -> bool:
    durable = f"{wiring.bus.service}-checkpoint-saved"
    info = await wiring.bus.nc.jetstream().consumer_info(subjects.STREAM, durable)
    return info.ack_floor.stream_seq >= seq and not info.num_ack_pending


async def test_incremental_snapshots_dedup_and_restore(
    service: bootstrap.Wiring, sandbox: FakeSandbox, uid: str
) -> None:
    build = f"b{uid}"
    root = sandbox.root
    (root / "src").mkdir()
    (root / "README.md").write_text("# app\n")
    (root / "src" / "app.py").write_text("print('v1')\n")
    (root / "src" / "copy.md").write_text("# app\n")  # same content as README.md
    os.chmod(root / "src" / "app.py", 0o755)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0junk")
    saved = await watch_saved(service, build)

    # 1. the first snapshot uploads every distinct blob
    first = CheckpointSaved(build_id=build, user_id=f"u{uid}", iteration=1, reason="files_changed")
    await service.bus.publish(first)
    await until(lambda: len(saved) == 1)
    one = saved[0]
    assert one.event_id == stable_id(build, "snapshot_saved", str(first.event_id))
    assert one.snapshot_id == str(first.event_id) and one.causation_id == first.event_id
    assert (one.files, one.bytes_total, one.bytes_uploaded) == (3, 6 + 12 + 6, 6 + 12)
    assert len(sandbox.uploaded) == 2
    assert "__pycache__" in sandbox.excludes_seen

    # 2. after one file changed, one blob is uploaded
    (root / "src" / "app.py").write_text("print('v2!')\n")
    second = CheckpointSaved(build_id=build, user_id=f"u{uid}", iteration=2, reason="files_changed")
    ack = await service.bus.nc.jetstream().publish(
        subjects.subject_of(second),
        second.model_dump_json().encode(),
        headers={"Nats-Msg-Id": str(second.event_id)},
    )
    await until(lambda: len(saved) == 2)
    assert len(sandbox.uploaded) == 3
    assert (saved[1].files, saved[1].bytes_uploaded) == (3, 13)

    # every manifest references only blobs that exist, and latest points at the newest
    store = service.store
    for event in (first, second):
        raw = await store.get(f"builds/{build}/manifests/{event.event_id}.json")
        assert raw is not None
        doc = json.loads(raw)
        assert (doc["iteration"], doc["reason"]) == (event.iteration, event.reason)
        assert doc["created_at"]
        keys = [f"blobs/{e['sha256']}" for e in doc["entries"]]
        assert len(keys) == 3 and await store.missing(keys) == set()
    assert await store.get(f"builds/{build}/latest") == str(second.event_id).encode()

    # 3. the same CheckpointSaved again (another Nats-Msg-Id, so the server keeps it): one effect
    manifests_before = sandbox.manifests
    again = await service.bus.nc.jetstream().publish(
        subjects.subject_of(second),
        second.model_dump_json().encode(),
        headers={"Nats-Msg-Id": f"again-{second.event_id}"},
    )
    assert again.seq > ack.seq
    await until_async(lambda: caught_up(service, again.seq))
    await asyncio.sleep(0.3)  # let a (wrongly) new SnapshotSaved arrive if there were one
    assert len(saved) == 2
    assert sandbox.manifests == manifests_before
    assert len(sandbox.uploaded) == 3

    # 4. the restore plan serves the latest files through presigned GETs
    reply = await service.bus.nc.request(
        subjects.SNAPSHOT_RESTORE_PLAN,
        RestorePlanRequest(build_id=build).model_dump_json().encode(),
        timeout=10,
    )
    plan = RestorePlanReply.model_validate_json(reply.data)
    assert plan.ok and plan.snapshot_id == str(second.event_id)
    assert sorted(f.path for f in plan.files) == ["README.md", "src/app.py", "src/copy.md"]
    async with httpx.AsyncClient(timeout=10) as http:
        for f in plan.files:
            response = await http.get(f.url)
            assert response.status_code == 200
            assert response.content == (root / f.path).read_bytes()
            assert hashlib.sha256(response.content).hexdigest() == f.sha256
    modes = {f.path: f.mode for f in plan.files}
    assert modes["src/app.py"] == 0o755

    none = await service.bus.nc.request(
        subjects.SNAPSHOT_RESTORE_PLAN,
        RestorePlanRequest(build_id=f"none{uid}").model_dump_json().encode(),
        timeout=10,
    )
    assert RestorePlanReply.model_validate_json(none.data).error == "no snapshot"


async def test_an_unknown_workspace_is_retried_then_dead_lettered_with_the_reason(
    service: bootstrap.Wiring, sandbox: FakeSandbox, uid: str
) -> None:
    event = CheckpointSaved(build_id=f"gone{uid}", user_id=f"u{uid}", iteration=1, reason="final")
    await service.bus.publish(event)
    js = service.bus.nc.jetstream()
    reasons: list[str] = []

    async def on(msg: Msg) -> None:
        if json.loads(msg.data).get("event_id") == str(event.event_id) and msg.headers:
            reasons.append(msg.headers.get("Kiln-Dlq-Reason", ""))

    sub = await js.subscribe(
        subjects.dlq_subject(service.bus.service, CheckpointSaved.kind),
        cb=on,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    try:
        await until(lambda: reasons)
    finally:
        await sub.unsubscribe()
    assert "workspace not found" in reasons[0]


async def test_no_sandbox_answering_means_retry_later(infra: dict[str, str], uid: str) -> None:
    nc = await nats.connect(infra["NATS_URL"])
    try:
        rpc = NatsSandbox(lambda: nc, manifest_timeout_s=1)
        with pytest.raises(RetryLater, match="no sandbox answers"):
            await rpc.manifest(ManifestRequest(build_id=f"b{uid}"))
        # a responder that never answers: a timeout, also transient
        await nc.subscribe(subjects.SANDBOX_UPLOAD, queue=f"mute{uid}", cb=_ignore)
        slow = NatsSandbox(lambda: nc, upload_timeout_s=0.3)
        with pytest.raises(RetryLater, match="did not answer"):
            await slow.upload(UploadRequest(build_id=f"b{uid}", uploads=[]))
    finally:
        await nc.close()


async def _ignore(msg: Msg) -> None:
    return None


async def until_async(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():  # type: ignore[misc]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.05)
