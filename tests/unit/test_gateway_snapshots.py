"""The snapshot reads' plain functions: what a file is served as, which paths name an entry, which
snapshot holds an iteration's files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kiln_contracts.manifest import Manifest
from kiln_gateway import snapshots
from kiln_gateway.ports import StoredSnapshot


@pytest.mark.parametrize(
    ("path", "data", "served_as"),
    [
        ("app.py", b"print('hi')\n", "text/plain; charset=utf-8"),
        ("data.json", b"{}", "application/json; charset=utf-8"),
        ("README.md", b"# hi\n", "text/markdown; charset=utf-8"),
        # a browser would run these on the gateway's origin: never served as themselves
        ("index.html", b"<script>alert(1)</script>", "text/plain; charset=utf-8"),
        ("logo.svg", b"<svg onload='alert(1)'/>", "text/plain; charset=utf-8"),
        ("app.js", b"alert(1)", "text/plain; charset=utf-8"),
        ("page.html", b"<p>\xff\xfe</p>", "application/octet-stream"),
        ("logo.svg", b"\0<svg/>", "application/octet-stream"),
        ("logo.png", b"\x89PNG\r\n\x1a\n\0", "image/png"),
        ("no-extension", b"\0\1\2", "application/octet-stream"),
        ("empty.txt", b"", "text/plain; charset=utf-8"),
    ],
)
def test_content_type(path: str, data: bytes, served_as: str) -> None:
    assert snapshots.content_type(path, data) == served_as


@pytest.mark.parametrize(
    "path", ["", "/etc/passwd", "a/../b", "..", "./a", "a//b", "a/", "a\0b", "a/./b"]
)
def test_paths_outside_a_manifest_are_refused(path: str) -> None:
    with pytest.raises(snapshots.InvalidPath):
        snapshots.check_path(path)


def test_ordinary_paths_are_kept() -> None:
    assert snapshots.check_path("a/b.c/..d") == "a/b.c/..d"


def snapshot(iteration: int, minute: int) -> StoredSnapshot:
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minute)
    m = Manifest(
        snapshot_id=f"s{iteration}-{minute}",
        build_id="b",
        user_id="u",
        iteration=iteration,
        reason="files_changed",
        checkpoint_at=at,
        created_at=at,
        files=0,
        bytes_total=0,
        bytes_uploaded=0,
        entries=[],
    )
    return StoredSnapshot(m, at)


def test_an_iterations_files_are_the_newest_snapshot_at_or_before_it() -> None:
    kept = [snapshot(5, 9), snapshot(2, 1), snapshot(2, 3)]
    assert snapshots.at_iteration(kept, 2).manifest.snapshot_id == "s2-3"
    assert snapshots.at_iteration(kept, 4).manifest.snapshot_id == "s2-3"
    assert snapshots.at_iteration(kept, 50).manifest.snapshot_id == "s5-9"
    with pytest.raises(snapshots.SnapshotMissing, match="iterations 2, 5"):
        snapshots.at_iteration(kept, 1)


def test_unified_marks_a_missing_final_newline() -> None:
    text = snapshots.unified("f", "a\n", "a\nb", "modified")
    assert text.endswith("+b\n\\ No newline at end of file\n")
