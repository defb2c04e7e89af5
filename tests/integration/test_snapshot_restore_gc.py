"""Snapshot and restore with the sandbox's real manifest/upload/restore code (local provider) on
NATS and moto S3: the restored tree is byte-identical (modes, empty directories, symlinks);
retention and garbage collection keep what is referenced; ``python -m kiln_snapshot.gc``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from kiln_contracts import CheckpointSaved, ManifestReply, UploadReply, subjects
from kiln_contracts.messages import utcnow
from kiln_contracts.rpc import ManifestRequest, UploadRequest
from kiln_devstack.sandbox import MemoryRegistry
from kiln_sandbox.adapters.local import LocalProvider
from kiln_sandbox.adapters.nats_rpc import NatsRestorer
from kiln_sandbox.handlers import SandboxService
from kiln_sandbox.records import SandboxRecord
from kiln_snapshot import bootstrap, gc, snapshots
from kiln_snapshot.adapters.s3 import S3Store
from kiln_snapshot.settings import SnapshotSettings
from tests.integration.test_snapshot_s3 import until, until_async, watch_saved
from tests.integration.wirings import restore_fresh, started

pytestmark = pytest.mark.integration


async def serve_sandbox_rpc(url: str, svc: SandboxService) -> Any:
    """The sandbox service's manifest/upload handlers answering on NATS, as its app does."""
    nc = await nats.connect(url)

    async def manifest(msg: Msg) -> None:
        reply: ManifestReply = await svc.manifest(ManifestRequest.model_validate_json(msg.data))
        await msg.respond(reply.model_dump_json().encode())

    async def upload(msg: Msg) -> None:
        reply: UploadReply = await svc.upload(UploadRequest.model_validate_json(msg.data))
        await msg.respond(reply.model_dump_json().encode())

    await nc.subscribe(subjects.SANDBOX_MANIFEST, cb=manifest)
    await nc.subscribe(subjects.SANDBOX_UPLOAD, cb=upload)
    return nc


def settings(infra: dict[str, str], uid: str, **kw: Any) -> SnapshotSettings:
    return SnapshotSettings(
        nats_url=infra["NATS_URL"],
        s3_endpoint_url=infra["S3_ENDPOINT_URL"],
        s3_bucket=f"kiln-rgc-{uid}",
        ack_wait_s=5,
        max_deliver=3,
        manifest_timeout_s=5,
        upload_timeout_s=20,
        **kw,
    )


@pytest.fixture
async def service(infra: dict[str, str], uid: str) -> AsyncIterator[bootstrap.Wiring]:
    async with started(
        bootstrap.build(settings(infra, uid, snapshot_keep=2), service=f"snapshot-{uid}")
    ) as wiring:
        yield wiring


def tree(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """Every entry under root: (kind, mode, content or link target), symlinks not followed."""
    out: dict[str, tuple[str, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode & 0o7777, b"")
            else:
                out[rel] = ("file", st.st_mode & 0o7777, Path(full).read_bytes())
    return out


async def test_restore_is_byte_identical_with_modes_empty_dirs_and_symlinks(
    service: bootstrap.Wiring, infra: dict[str, str], uid: str, tmp_path: Path
) -> None:
    build = f"b{uid}"
    provider = LocalProvider(tmp_path / "one")
    registry = MemoryRegistry()
    svc = SandboxService(provider, registry, None, None)  # type: ignore[arg-type]
    sandbox = await provider.create(build)
    await registry.put(SandboxRecord(build, "local", sandbox.sandbox_id, "running"))
    ws = Path(sandbox.root)
    (ws / "src" / "pkg").mkdir(parents=True)
    (ws / "src" / "pkg" / "mod.py").write_bytes(b"x = 1\n")
    (ws / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(ws / "run.sh", 0o755)
    (ws / "secret.txt").write_bytes(bytes(range(256)) * 10)
    os.chmod(ws / "secret.txt", 0o600)
    (ws / "empty" / "deeper").mkdir(parents=True)
    os.chmod(ws / "empty" / "deeper", 0o700)
    (ws / "readonly").mkdir()
    (ws / "readonly" / "f.txt").write_bytes(b"ro\n")
    os.chmod(ws / "readonly", 0o555)
    (ws / "__pycache__").mkdir()
    (ws / "__pycache__" / "x.pyc").write_bytes(b"junk")
    os.symlink("src/pkg/mod.py", ws / "link-to-file")
    os.symlink("src/pkg", ws / "link-to-dir")
    os.symlink("nowhere/yet", ws / "dangling-inside")
    os.symlink("/etc/passwd", ws / "absolute")
    os.symlink("../../outside", ws / "src" / "up-and-out")
    os.symlink(".", ws / "here")
    os.symlink("here/..", ws / "through-a-link")  # lexically inside, really the parent
    rpc = await serve_sandbox_rpc(infra["NATS_URL"], svc)
    try:
        saved = await watch_saved(service, build)
        event = CheckpointSaved(
            build_id=build, user_id=f"u{uid}", iteration=1, reason="files_changed"
        )
        await service.bus.publish(event)
        await until(lambda: saved)
        assert (saved[0].files, saved[0].bytes_total) == (4, 6 + 18 + 2560 + 3)

        raw = await service.store.get(f"builds/{build}/manifests/{event.event_id}.json")
        assert raw is not None
        doc = json.loads(raw)
        assert [e["path"] for e in doc["entries"]] == [
            "readonly/f.txt",
            "run.sh",
            "secret.txt",
            "src/pkg/mod.py",
        ]
        dirs = {d["path"]: d["mode"] for d in doc["dirs"]}
        assert dirs["empty/deeper"] == 0o700 and dirs["readonly"] == 0o555
        assert "__pycache__" not in dirs
        links = {x["path"]: x["target"] for x in doc["symlinks"]}
        assert links["absolute"] == "/etc/passwd" and links["src/up-and-out"] == "../../outside"

        # restore into a fresh sandbox on another "host": the sandbox's own restore path
        got, root = await restore_fresh(infra["NATS_URL"], LocalProvider(tmp_path / "two"), build)
        assert got == str(event.event_id)
        nc = await nats.connect(infra["NATS_URL"])
        try:
            plan = await NatsRestorer(nc).restore_plan(build)
        finally:
            await nc.close()
        assert plan is not None
        assert plan.skipped == ["absolute", "src/up-and-out", "through-a-link"]

        before = tree(ws)
        after = tree(root)
        del before["__pycache__"], before["__pycache__/x.pyc"]
        for escaping in plan.skipped:
            del before[escaping]
        assert after == before
    finally:
        await rpc.close()
        os.chmod(ws / "readonly", 0o755)
        await provider.close()


async def test_retention_keeps_the_newest_manifests_and_gc_keeps_what_is_referenced(
    service: bootstrap.Wiring, infra: dict[str, str], uid: str, tmp_path: Path
) -> None:
    build = f"b{uid}"
    provider = LocalProvider(tmp_path)
    registry = MemoryRegistry()
    svc = SandboxService(provider, registry, None, None)  # type: ignore[arg-type]
    sandbox = await provider.create(build)
    await registry.put(SandboxRecord(build, "local", sandbox.sandbox_id, "running"))
    ws = Path(sandbox.root)
    (ws / "same.txt").write_text("never changes\n")
    store = service.store
    rpc = await serve_sandbox_rpc(infra["NATS_URL"], svc)
    events = []
    try:
        saved = await watch_saved(service, build)
        for i in range(1, 5):  # four snapshots, keep=2
            (ws / "v.txt").write_text(f"version {i}\n")
            event = CheckpointSaved(
                build_id=build, user_id=f"u{uid}", iteration=i, reason="files_changed"
            )
            events.append(event)
            await service.bus.publish(event)
            await until(lambda n=i: len(saved) == n)  # type: ignore[misc]
    finally:
        await rpc.close()
        await provider.close()
    manifests: list[str] = []

    async def pruned() -> bool:
        manifests[:] = sorted(o.key for o in await store.list(f"builds/{build}/manifests/"))
        return len(manifests) <= 2

    await until_async(pruned)  # pruning follows the SnapshotSaved
    assert manifests == sorted(f"builds/{build}/manifests/{e.event_id}.json" for e in events[2:])
    assert await store.get(f"builds/{build}/latest") == str(events[3].event_id).encode()

    sha = hashlib.sha256
    live = {sha(f"version {i}\n".encode()).hexdigest() for i in (3, 4)}
    live.add(sha(b"never changes\n").hexdigest())
    dead = {sha(f"version {i}\n".encode()).hexdigest() for i in (1, 2)}
    pending_sha = sha(b"being written").hexdigest()
    stale_sha = sha(b"from a crashed snapshot").hexdigest()
    for blob in (pending_sha, stale_sha):
        await store.put(f"blobs/{blob}", b"x", "application/octet-stream")
    now = utcnow()
    await store.put(
        f"pending/{build}/in-flight.json",
        json.dumps({"started_at": now.isoformat(), "blobs": [pending_sha]}).encode(),
    )
    await store.put(
        f"pending/{build}/crashed.json",
        json.dumps(
            {"started_at": (now - timedelta(days=1)).isoformat(), "blobs": [stale_sha]}
        ).encode(),
    )
    options = {"keep": 2, "max_snapshot_s": 4 * 3600.0, "sweep_s": 600.0}

    # within the grace period nothing goes
    young = await gc.collect(store, grace_s=3600, **options)  # type: ignore[arg-type]
    assert young.blobs_deleted == 0 and young.young_kept == 3
    assert young.stale_markers == 1
    # later (the clock two hours on): the unreferenced ones go, referenced and pending stay
    later = await gc.collect(
        store,
        grace_s=3600,
        clock=lambda: utcnow() + timedelta(hours=2),
        **options,  # type: ignore[arg-type]
    )
    assert set(later.deleted) == dead | {stale_sha}
    remaining = {o.key.removeprefix("blobs/") for o in await store.list("blobs/")}
    assert remaining == live | {pending_sha}
    assert [o.key for o in await store.list("gc/")] == []  # the run's flag is gone


async def test_a_collection_flag_counts_until_its_sweep_window_is_over(
    infra: dict[str, str], uid: str
) -> None:
    store = S3Store(f"kiln-flag-{uid}", endpoint_url=infra["S3_ENDPOINT_URL"])
    await store.open()
    try:
        await store.put("gc/running/other-run", b"{}")
        assert await snapshots.collections_sweeping(store, utcnow(), 600) == [
            "gc/running/other-run"
        ]
        # a flag older than the sweep window (+ slack) is a dead run's
        later = utcnow() + timedelta(seconds=600 + snapshots.CLOCK_SLACK_S + 5)
        assert await snapshots.collections_sweeping(store, later, 600) == []
    finally:
        await store.close()


async def test_python_m_kiln_snapshot_gc(infra: dict[str, str], uid: str) -> None:
    bucket = f"kiln-gccli-{uid}"
    store = S3Store(bucket, endpoint_url=infra["S3_ENDPOINT_URL"])
    await store.open()
    orphan = "blobs/" + "0" * 64
    try:
        await store.put(orphan, b"orphan", "application/octet-stream")
        env = {
            **os.environ,
            "S3_ENDPOINT_URL": infra["S3_ENDPOINT_URL"],
            "KILN_S3_BUCKET": bucket,
            "KILN_SNAPSHOT_GC_GRACE_S": "0",
        }
        await asyncio.sleep(1.1)  # S3's LastModified has a resolution of one second
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kiln_snapshot.gc",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert "deleted=1 (6 bytes)" in out.decode()
        assert await store.get(orphan) is None
    finally:
        await store.close()
