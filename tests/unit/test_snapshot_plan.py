"""The snapshot domain with fakes: incremental uploads, manifests after blobs, coalescing, restore."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from kiln_contracts import CheckpointSaved, Envelope, SnapshotSaved, stable_id
from kiln_contracts.manifest import escapes
from kiln_contracts.messages import utcnow
from kiln_contracts.rpc import (
    ManifestEntry,
    ManifestReply,
    ManifestRequest,
    RestorePlanRequest,
    UploadReply,
    UploadRequest,
)
from kiln_runtime.errors import PermanentError, RetryLater
from kiln_snapshot import app, restores, snapshots
from kiln_snapshot.ports import StoredObject
from kiln_snapshot.settings import DEFAULT_EXCLUDES, SnapshotSettings
from kiln_snapshot.snapshots import Deps


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FakeStore:
    objects: dict[str, bytes] = field(default_factory=dict)
    puts: list[str] = field(default_factory=list)
    modified: dict[str, datetime] = field(default_factory=dict)
    meta: dict[str, dict[str, str]] = field(default_factory=dict)

    async def get(self, key: str) -> bytes | None:
        await asyncio.sleep(0)
        return self.objects.get(key)

    async def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/json",
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.objects[key] = data
        self.puts.append(key)
        self.modified[key] = utcnow()
        self.meta[key] = dict(metadata or {})

    async def metadata(self, key: str) -> dict[str, str] | None:
        return self.meta.get(key) if key in self.objects else None

    async def list(self, prefix: str) -> list[StoredObject]:
        await asyncio.sleep(0)
        return [
            StoredObject(k, len(v), self.modified.get(k, utcnow()))
            for k, v in sorted(self.objects.items())
            if k.startswith(prefix)
        ]

    async def missing(self, keys: Iterable[str]) -> set[str]:
        await asyncio.sleep(0)
        return {k for k in keys if k not in self.objects}

    async def sizes(self, keys: Iterable[str]) -> dict[str, int | None]:
        await asyncio.sleep(0)
        return {k: len(self.objects[k]) if k in self.objects else None for k in keys}

    async def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    async def presign_put(self, key: str) -> str:
        return f"fake://put/{key}"

    async def presign_get(self, key: str) -> str:
        return f"fake://get/{key}"


@dataclass
class FakeSandbox:
    store: FakeStore
    files: dict[str, bytes] = field(default_factory=dict)
    manifest_error: str = ""
    upload_error: str = ""
    drop_uploads: bool = False
    changed_during_upload: dict[str, bytes] = field(default_factory=dict)
    manifest_requests: list[ManifestRequest] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)

    async def manifest(self, request: ManifestRequest) -> ManifestReply:
        self.manifest_requests.append(request)
        await asyncio.sleep(0)
        if self.manifest_error:
            return ManifestReply(ok=False, error=self.manifest_error)
        return ManifestReply(
            entries=[
                ManifestEntry(path=p, sha256=sha(b), size=len(b), mode=0o644)
                for p, b in self.files.items()
            ]
        )

    async def upload(self, request: UploadRequest) -> UploadReply:
        if self.upload_error:
            return UploadReply(ok=False, error=self.upload_error)
        total = 0
        for up in request.uploads:
            data = self.changed_during_upload.get(up.path) or self.files[up.path]
            key = up.url.removeprefix("fake://put/")
            assert key == f"blobs/{up.sha256}"
            if not self.drop_uploads:
                self.store.objects[key] = data
            self.uploaded.append(up.sha256)
            total += len(data)
        return UploadReply(uploaded=len(request.uploads), bytes_uploaded=total)


@dataclass
class FakePublisher:
    published: list[Envelope] = field(default_factory=list)

    async def publish(self, msg: Envelope) -> None:
        self.published.append(msg)


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def sandbox(store: FakeStore) -> FakeSandbox:
    return FakeSandbox(store, files={"a.txt": b"alpha", "b/c.py": b"print(1)\n", "dup": b"alpha"})


@pytest.fixture
def deps(store: FakeStore, sandbox: FakeSandbox) -> Deps:
    return Deps(store=store, sandbox=sandbox, publisher=FakePublisher(), excludes=["node_modules"])


def checkpoint(iteration: int = 1, reason: str = "files_changed") -> CheckpointSaved:
    return CheckpointSaved(build_id="b1", user_id="u1", iteration=iteration, reason=reason)  # type: ignore[arg-type]


def published(deps: Deps) -> list[SnapshotSaved]:
    return deps.publisher.published  # type: ignore[attr-defined,no-any-return]


async def test_first_snapshot_uploads_each_distinct_blob_then_writes_the_manifest(
    deps: Deps, store: FakeStore, sandbox: FakeSandbox
) -> None:
    event = checkpoint()
    saved = await snapshots.take_snapshot(deps, event, 10)
    assert saved is not None
    assert sorted(sandbox.uploaded) == sorted({sha(b"alpha"), sha(b"print(1)\n")})
    assert sandbox.manifest_requests[0].excludes == ["node_modules"]
    sid = str(event.event_id)
    assert saved.snapshot_id == sid
    assert saved.event_id == stable_id("b1", "snapshot_saved", sid)
    assert saved.causation_id == event.event_id
    assert (saved.files, saved.bytes_total, saved.bytes_uploaded) == (3, 5 + 9 + 5, 5 + 9)
    assert published(deps) == [saved]
    # manifest before latest, and only blobs that exist are referenced
    # the pending marker first, then the manifest, then latest; the marker is gone afterwards
    assert store.puts == [
        f"pending/b1/{sid}.json",
        f"builds/b1/manifests/{sid}.json",
        "builds/b1/latest",
    ]
    assert f"pending/b1/{sid}.json" not in store.objects
    doc = json.loads(store.objects[f"builds/b1/manifests/{sid}.json"])
    assert [e["path"] for e in doc["entries"]] == ["a.txt", "b/c.py", "dup"]
    assert all(f"blobs/{e['sha256']}" in store.objects for e in doc["entries"])
    assert (doc["iteration"], doc["reason"]) == (1, "files_changed")
    assert "created_at" in doc
    assert store.objects["builds/b1/latest"] == sid.encode()


async def test_second_snapshot_uploads_only_the_changed_file(
    deps: Deps, sandbox: FakeSandbox
) -> None:
    await snapshots.take_snapshot(deps, checkpoint(1), 10)
    sandbox.uploaded.clear()
    sandbox.files["b/c.py"] = b"print(2)\n"
    saved = await snapshots.take_snapshot(deps, checkpoint(2), 11)
    assert saved is not None
    assert sandbox.uploaded == [sha(b"print(2)\n")]
    assert (saved.files, saved.bytes_uploaded) == (3, 9)


async def test_redelivered_checkpoint_republishes_the_same_event_without_work(
    deps: Deps, store: FakeStore, sandbox: FakeSandbox
) -> None:
    event = checkpoint()
    first = await snapshots.take_snapshot(deps, event, 10)
    sandbox.files["new"] = b"changed since"
    again = await snapshots.take_snapshot(deps, event, 10)
    assert again == first
    assert len(sandbox.manifest_requests) == 1
    assert published(deps) == [first, first]  # same event_id: the server drops the repeat
    assert store.puts.count("builds/b1/latest") == 1


async def test_sandbox_errors(deps: Deps, store: FakeStore, sandbox: FakeSandbox) -> None:
    sandbox.manifest_error = "workspace not found"  # retried: a sandbox may be on its way
    with pytest.raises(RetryLater, match="workspace not found"):
        await snapshots.take_snapshot(deps, checkpoint(), 1)
    sandbox.manifest_error = ""
    sandbox.upload_error = "disk on fire"
    with pytest.raises(RetryLater, match="disk on fire"):
        await snapshots.take_snapshot(deps, checkpoint(), 2)
    sandbox.upload_error = ""
    sandbox.drop_uploads = True  # says ok but the blobs never arrive
    with pytest.raises(RetryLater, match="still missing"):
        await snapshots.take_snapshot(deps, checkpoint(), 3)
    assert not [k for k in store.objects if k.startswith("builds/")]
    assert published(deps) == []


async def test_a_file_changed_during_the_upload_leaves_no_wrong_blob(
    deps: Deps, store: FakeStore, sandbox: FakeSandbox
) -> None:
    sandbox.changed_during_upload = {"b/c.py": b"print('longer')\n"}
    with pytest.raises(RetryLater, match="workspace changed"):
        await snapshots.take_snapshot(deps, checkpoint(), 1)
    assert f"blobs/{sha(b'print(1)' + bytes([10]))}" not in store.objects
    assert not [k for k in store.objects if k.startswith("builds/")]
    # the retry (workspace settled) succeeds and re-uploads only that blob
    sandbox.changed_during_upload = {}
    sandbox.uploaded.clear()
    saved = await snapshots.take_snapshot(deps, checkpoint(), 2)
    assert saved is not None and sandbox.uploaded == [sha(b"print(1)\n")]


async def test_unsafe_paths_are_refused(deps: Deps, sandbox: FakeSandbox) -> None:
    sandbox.files = {"../etc/passwd": b"x"}
    with pytest.raises(PermanentError, match="unsafe path"):
        await snapshots.take_snapshot(deps, checkpoint(), 1)


async def test_an_older_files_changed_checkpoint_is_skipped_once_a_newer_one_is_known(
    deps: Deps, sandbox: FakeSandbox
) -> None:
    deps.coalescer.seen("b1", (5, 50))
    assert await snapshots.take_snapshot(deps, checkpoint(4), 40) is None
    assert sandbox.manifest_requests == []
    # a sleep or final checkpoint is always honoured (someone waits for its SnapshotSaved)
    assert await snapshots.take_snapshot(deps, checkpoint(4, "sleep"), 41) is not None


async def test_a_backlog_of_one_build_uploads_once(deps: Deps, sandbox: FakeSandbox) -> None:
    events = [checkpoint(i) for i in range(1, 6)]
    results = await asyncio.gather(
        *(snapshots.take_snapshot(deps, e, 100 + i) for i, e in enumerate(events))
    )
    done = [r for r in results if r is not None]
    assert [r.iteration for r in done] == [5]
    assert len(sandbox.manifest_requests) == 1
    assert len(sandbox.uploaded) == 2


async def test_latest_never_moves_back(deps: Deps, store: FakeStore) -> None:
    newer = checkpoint(7, "files_changed")
    await snapshots.take_snapshot(deps, newer, 70)
    older = checkpoint(3, "sleep")
    assert await snapshots.take_snapshot(deps, older, 30) is not None
    assert store.objects["builds/b1/latest"] == str(newer.event_id).encode()


async def test_restore_plan(deps: Deps, sandbox: FakeSandbox) -> None:
    none = await restores.restore_plan(deps, RestorePlanRequest(build_id="b1"))
    assert (none.ok, none.error, none.files) == (False, "no snapshot", [])
    event = checkpoint()
    await snapshots.take_snapshot(deps, event, 1)
    plan = await restores.restore_plan(deps, RestorePlanRequest(build_id="b1"))
    assert plan.ok and plan.snapshot_id == str(event.event_id)
    assert [(f.path, f.mode) for f in plan.files] == [
        ("a.txt", 0o644),
        ("b/c.py", 0o644),
        ("dup", 0o644),
    ]
    assert plan.files[0].url == f"fake://get/blobs/{sha(b'alpha')}"


async def test_restore_plan_of_an_unreadable_snapshot_names_it(
    deps: Deps, store: FakeStore
) -> None:
    store.objects["builds/b1/latest"] = b"s-gone"
    plan = await restores.restore_plan(deps, RestorePlanRequest(build_id="b1"))
    assert (plan.ok, plan.snapshot_id) == (False, "s-gone")
    assert "missing" in plan.error


async def test_restore_plan_answers_bad_requests(deps: Deps) -> None:
    reply = await app.restore_plan_responder(deps).answer(b'{"build_id": "no such.id"}')
    assert not reply.ok and "invalid RestorePlanRequest" in reply.error


def test_excludes_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_SNAPSHOT_EXCLUDES", raising=False)
    assert SnapshotSettings().snapshot_excludes == DEFAULT_EXCLUDES
    monkeypatch.setenv("KILN_SNAPSHOT_EXCLUDES", "node_modules, .venv,,dist")
    assert SnapshotSettings().snapshot_excludes == ["node_modules", ".venv", "dist"]
    monkeypatch.setenv("KILN_SNAPSHOT_EXCLUDES", "")
    assert SnapshotSettings().snapshot_excludes == []


# ------------------------------------------------------------------ GC safety, symlinks


async def test_a_snapshot_started_while_a_collection_sweeps_waits_and_leaves_nothing() -> None:
    store = FakeStore()
    deps = make_deps(store, {"a.txt": b"a"})
    await store.put("gc/running/run-1", b"{}")
    event = CheckpointSaved(build_id="b1", user_id="u1", iteration=1, reason="files_changed")
    with pytest.raises(RetryLater, match="garbage collection is sweeping"):
        await snapshots.take_snapshot(deps, event)
    assert not [k for k in store.objects if k.startswith(("pending/", "builds/", "blobs/"))]
    await store.delete("gc/running/run-1")
    saved = await snapshots.take_snapshot(deps, event)
    assert saved is not None and saved.files == 1


async def test_a_snapshot_slower_than_its_limit_starts_again() -> None:
    store = FakeStore()
    deps = make_deps(store, {"a.txt": b"a"})
    deps.max_snapshot_s = 0.0
    event = CheckpointSaved(build_id="b1", user_id="u1", iteration=1, reason="files_changed")
    with pytest.raises(RetryLater, match="longer than"):
        await snapshots.take_snapshot(deps, event)
    assert not [k for k in store.objects if k.startswith(("pending/", "builds/"))]


@pytest.mark.parametrize(
    ("path", "links", "outside"),
    [
        ("a", {"a": "b/c"}, False),
        ("a", {"a": "/etc/passwd"}, True),
        ("d/a", {"d/a": "../x"}, False),
        ("d/a", {"d/a": "../../x"}, True),
        ("e", {"d": ".", "e": "d/.."}, True),
        ("e", {"d": "sub", "e": "d/.."}, False),
        ("loop", {"loop": "loop2", "loop2": "loop"}, True),
    ],
)
def test_symlinks_leading_outside_are_recognised(
    path: str, links: dict[str, str], outside: bool
) -> None:
    assert escapes(path, links) is outside


def make_deps(store: FakeStore, files: dict[str, bytes]) -> Deps:
    return Deps(store=store, sandbox=FakeSandbox(store, files=files), publisher=FakePublisher())


# ------------------------------------------------------------------ manifests stored before


@pytest.mark.parametrize("oldest", [False, True])
async def test_a_stored_manifest_restores_and_is_built_upon(oldest: bool) -> None:
    from tests.unit.test_manifest import STORED, entries_only

    store = FakeStore()
    doc = json.loads(STORED)
    build, sid = doc["build_id"], doc["snapshot_id"]
    store.objects[f"builds/{build}/manifests/{sid}.json"] = (
        entries_only(STORED) if oldest else STORED
    ).encode()
    store.objects[f"builds/{build}/latest"] = sid.encode()
    files = {"run.sh": b"#!/bin/sh\necho hi\n", "src/app.py": b"print('hi')\n"}
    for data in files.values():
        store.objects[f"blobs/{sha(data)}"] = data
    deps = make_deps(store, files)

    plan = await restores.restore_plan(deps, RestorePlanRequest(build_id=build))
    assert plan.ok and plan.snapshot_id == sid
    assert [(f.path, f.mode) for f in plan.files] == [("run.sh", 0o755), ("src/app.py", 0o644)]
    if oldest:
        assert (plan.dirs, plan.symlinks, plan.skipped) == ([], [], [])
    else:
        assert [(d.path, d.type, d.mode) for d in plan.dirs] == [
            ("empty", "dir", 0o700),
            ("src", "dir", 0o755),
        ]
        assert [(s.path, s.target) for s in plan.symlinks] == [("app.py", "src/app.py")]
        assert plan.skipped == ["passwd"]

    # the next snapshot takes the stored manifest's blobs as present: nothing to upload
    event = CheckpointSaved(build_id=build, user_id="u-legacy", iteration=4, reason="files_changed")
    saved = await snapshots.take_snapshot(deps, event)
    assert saved is not None and saved.bytes_uploaded == 0
    assert deps.sandbox.uploaded == []  # type: ignore[attr-defined]
    assert store.objects[f"builds/{build}/latest"] == str(event.event_id).encode()


async def test_gc_keeps_a_stored_manifests_blobs_and_stops_at_an_unreadable_one() -> None:
    from kiln_snapshot import gc
    from tests.unit.test_manifest import STORED

    store = FakeStore()
    doc = json.loads(STORED)
    store.objects[f"builds/{doc['build_id']}/manifests/{doc['snapshot_id']}.json"] = STORED.encode()
    named = {e["sha256"] for e in doc["entries"]}
    orphan = sha(b"orphan")
    for blob in [*named, orphan]:
        await store.put(f"blobs/{blob}", b"x", "application/octet-stream")
    later = utcnow() + timedelta(hours=2)
    options: dict[str, Any] = {"keep": 5, "grace_s": 60, "max_snapshot_s": 60, "sweep_s": 60}

    store.objects["builds/b2/manifests/s2.json"] = b'{"format": 1, "entries": "?"}'
    with pytest.raises(ValidationError):
        await gc.collect(store, clock=lambda: later, **options)
    assert {k for k in store.objects if k.startswith("blobs/")} == {
        f"blobs/{b}" for b in [*named, orphan]
    }
    assert not [k for k in store.objects if k.startswith("gc/")]

    del store.objects["builds/b2/manifests/s2.json"]
    report = await gc.collect(store, clock=lambda: later, **options)
    assert report.deleted == [orphan]
    assert {k for k in store.objects if k.startswith("blobs/")} == {f"blobs/{b}" for b in named}
