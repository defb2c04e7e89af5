"""The one manifest model and the bucket's key layout: manifests already in S3 read as they are,
a new one is the same document, every reader sees files, directories and symlinks."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from kiln_contracts import CheckpointSaved, bucket
from kiln_contracts.manifest import (
    DirEntry,
    FileEntry,
    Manifest,
    ManifestEntry,
    SymlinkEntry,
)

# A manifest exactly as the snapshot service stored it (captured from its code: json.dumps of
# the document, times in isoformat), with a directory, an empty one, a symlink inside and one
# absolute.
STORED = (
    '{"format": 1, "snapshot_id": "0f6e7a4c-3d5b-4a8e-9c1f-2b7d8e9a0c11", "build_id": '
    '"b-legacy", "user_id": "u-legacy", "iteration": 3, "reason": "files_changed", "checkpoint_at": '
    '"2026-11-20T09:30:15.123456+00:00", "created_at": "2026-12-01T09:13:44.683312+00:00", '
    '"files": 2, "bytes_total": 30, "bytes_uploaded": 30, "entries": [{"path": "run.sh", '
    '"sha256": "299001868fb8c02fd431c336c6d058f5558c5dff5b5af5e6fe04b870a6a9cbba", "size": 18, '
    '"mode": 493}, {"path": "src/app.py", "sha256": '
    '"caf026f25d7140209f98072605307a438914b9ce6f3c14b23d15d9667241de52", "size": 12, "mode": '
    '420}], "dirs": [{"path": "empty", "mode": 448}, {"path": "src", "mode": 493}], "symlinks": '
    '[{"path": "app.py", "target": "src/app.py"}, {"path": "passwd", "target": "/etc/passwd"}]}'
)


def entries_only(stored: str) -> str:
    """The same manifest as the oldest snapshots stored it: regular files only."""
    doc = json.loads(stored)
    del doc["dirs"], doc["symlinks"]
    return json.dumps(doc)


def stored_manifest(
    *,
    build_id: str,
    user_id: str,
    snapshot_id: str,
    files: dict[str, tuple[bytes, int]],
    dirs: dict[str, int] | None = None,
    symlinks: dict[str, str] | None = None,
    iteration: int = 1,
) -> bytes:
    """A manifest document written the way ``STORED`` was (no model involved): for tests that
    put one in S3 and read it back through the services."""
    entries = [
        {"path": p, "sha256": hashlib.sha256(b).hexdigest(), "size": len(b), "mode": m}
        for p, (b, m) in sorted(files.items())
    ]
    doc: dict[str, Any] = {
        "format": 1,
        "snapshot_id": snapshot_id,
        "build_id": build_id,
        "user_id": user_id,
        "iteration": iteration,
        "reason": "files_changed",
        "checkpoint_at": datetime(2026, 11, 20, 9, 30, 15, 123456, tzinfo=UTC).isoformat(),
        "created_at": datetime(2026, 12, 1, 9, 13, 44, 683312, tzinfo=UTC).isoformat(),
        "files": len(entries),
        "bytes_total": sum(e["size"] for e in entries),
        "bytes_uploaded": sum(e["size"] for e in entries),
        "entries": entries,
    }
    if dirs is not None:
        doc["dirs"] = [{"path": p, "mode": m} for p, m in sorted(dirs.items())]
    if symlinks is not None:
        doc["symlinks"] = [{"path": p, "target": t} for p, t in sorted(symlinks.items())]
    return json.dumps(doc).encode()


def test_the_helper_writes_what_the_service_stored() -> None:
    again = stored_manifest(
        build_id="b-legacy",
        user_id="u-legacy",
        snapshot_id="0f6e7a4c-3d5b-4a8e-9c1f-2b7d8e9a0c11",
        files={"src/app.py": (b"print('hi')\n", 0o644), "run.sh": (b"#!/bin/sh\necho hi\n", 0o755)},
        dirs={"src": 0o755, "empty": 0o700},
        symlinks={"app.py": "src/app.py", "passwd": "/etc/passwd"},
        iteration=3,
    )
    assert again.decode() == STORED


def test_a_stored_manifest_reads_with_its_files_directories_and_symlinks() -> None:
    m = Manifest.parse(STORED)
    assert (m.snapshot_id, m.build_id, m.user_id) == (
        "0f6e7a4c-3d5b-4a8e-9c1f-2b7d8e9a0c11",
        "b-legacy",
        "u-legacy",
    )
    assert (m.iteration, m.reason, m.files, m.bytes_total) == (3, "files_changed", 2, 30)
    assert m.checkpoint_at == datetime(2026, 11, 20, 9, 30, 15, 123456, tzinfo=UTC)
    assert [(f.path, f.size, f.mode) for f in m.entries] == [
        ("run.sh", 18, 0o755),
        ("src/app.py", 12, 0o644),
    ]
    assert m.dirs == [DirEntry(path="empty", mode=0o700), DirEntry(path="src", mode=0o755)]
    assert m.symlinks == [
        SymlinkEntry(path="app.py", target="src/app.py"),
        SymlinkEntry(path="passwd", target="/etc/passwd"),
    ]
    assert m.blobs() == {f.sha256 for f in m.entries}
    assert m.escaping_symlinks() == ["passwd"]


def test_the_oldest_manifests_have_no_directories_or_symlinks() -> None:
    m = Manifest.parse(entries_only(STORED))
    assert [f.path for f in m.entries] == ["run.sh", "src/app.py"]
    assert (m.dirs, m.symlinks) == ([], [])


def test_a_new_manifest_is_the_same_document() -> None:
    m = Manifest.parse(STORED)
    assert json.loads(m.dump()) == json.loads(STORED) | {
        "checkpoint_at": "2026-11-20T09:30:15.123456Z",
        "created_at": "2026-12-01T09:13:44.683312Z",
    }
    assert Manifest.parse(m.dump()) == m


@pytest.mark.parametrize(
    "change",
    [
        {"format": 2},
        {"surprise": 1},
        {"entries": [{"path": "a", "sha256": "0" * 64, "size": 1, "mode": 0o644, "type": "dir"}]},
        {"dirs": [{"path": "d"}]},
        {"symlinks": [{"path": "l"}]},
        {"reason": "whenever"},
    ],
)
def test_what_is_not_a_manifest_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Manifest.parse(json.dumps(json.loads(STORED) | change))


def test_a_manifest_of_the_sandboxs_listing() -> None:
    event = CheckpointSaved(build_id="b1", user_id="u1", iteration=4, reason="final")
    listing = [
        ManifestEntry.directory("d", 0o40750),
        ManifestEntry(path="d/f", sha256="a" * 64, size=3, mode=0o600),
        ManifestEntry.symlink("l", "d/f"),
        ManifestEntry(path="x", sha256="b" * 64, size=5, mode=0o755),
    ]
    m = Manifest.of(event, listing, bytes_uploaded=3)
    assert (m.snapshot_id, m.build_id, m.user_id, m.iteration, m.reason) == (
        str(event.event_id),
        "b1",
        "u1",
        4,
        "final",
    )
    assert m.checkpoint_at == event.occurred_at
    assert (m.files, m.bytes_total, m.bytes_uploaded) == (2, 8, 3)
    assert m.entries == [
        FileEntry(path="d/f", sha256="a" * 64, size=3, mode=0o600),
        FileEntry(path="x", sha256="b" * 64, size=5, mode=0o755),
    ]
    assert m.dirs == [DirEntry(path="d", mode=0o750)]
    assert m.symlinks == [SymlinkEntry(path="l", target="d/f")]


def test_the_key_layout() -> None:
    sha = hashlib.sha256(b"x").hexdigest()
    sid = str(uuid.uuid4())
    assert bucket.blob_key(sha) == f"blobs/{sha}"
    assert bucket.blob_sha256(f"blobs/{sha}") == sha
    assert bucket.blob_sha256(f"builds/{sha}") is None
    assert bucket.manifests_prefix("b1") == "builds/b1/manifests/"
    assert bucket.manifest_key("b1", sid) == f"builds/b1/manifests/{sid}.json"
    assert bucket.latest_key("b1") == "builds/b1/latest"
    assert bucket.pending_key("b1", sid) == f"pending/b1/{sid}.json"
    assert bucket.gc_running_key("r1") == "gc/running/r1"
    assert bucket.pruned_key("b1") == "builds/b1/pruned"
    assert bucket.fork_ref_key("b1", sid, "f1") == f"builds/b1/forks/{sid}/f1"
    assert bucket.fork_ref_key("b1", sid, "f1").startswith(bucket.fork_refs_prefix("b1"))
    assert bucket.parse_fork_ref_key(f"builds/b1/forks/{sid}/f1") == ("b1", sid, "f1")
    assert bucket.parse_fork_ref_key(f"builds/b1/forks/{sid}") is None
    assert bucket.parse_manifest_key(bucket.fork_ref_key("b1", sid, "f1")) is None
    assert (bucket.BLOBS_PREFIX, bucket.BUILDS_PREFIX) == ("blobs/", "builds/")
    assert (bucket.PENDING_PREFIX, bucket.GC_RUNNING_PREFIX) == ("pending/", "gc/running/")


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        ("builds/b1/manifests/s1.json", ("b1", "s1")),
        ("builds/b1/latest", None),
        ("builds/b1/manifests/s1.txt", None),
        ("builds/b1/manifests/.json", None),
        ("builds//manifests/s1.json", None),
        ("builds/b1/manifests/x/s1.json", None),
        ("pending/b1/s1.json", None),
        ("blobs/abc", None),
    ],
)
def test_manifest_keys_parse_back(key: str, parsed: tuple[str, str] | None) -> None:
    assert bucket.parse_manifest_key(key) == parsed
